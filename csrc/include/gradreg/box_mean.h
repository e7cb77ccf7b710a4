// Per-voxel math of box_mean: the mean over the voxels of a 3x3x3 window that lie inside the volume.
//
// The window is a box, so its in-volume part is a box too and the mean factors into three 1D means, one
// along each axis: out[i] = (sum of v[j], j in {i-1, i, i+1} inside [0, n)) / count(i). Borders average
// fewer voxels, so a constant stays constant. A pass applies the 1D mean along D, then H, then W.
//
// The adjoint (the backward) of one 1D mean B = C^-1 S (S: the in-volume 3-sum, symmetric; C: the counts)
// is S C^-1: out[i] = sum of g[j] / count(j) over the same neighbours. Sums run left to right,
// ((left + centre) + right), in every backend, so they round alike.
#pragma once

#include <algorithm>
#include <vector>

#include "common.h"

namespace gradreg {

// Voxels the 1D window at i of an axis of n holds inside the axis.
GR_HD int64_t box_count(int64_t i, int64_t n) { return n == 1 ? 1 : ((i == 0 || i == n - 1) ? 2 : 3); }

// The mean at an edge (two voxels, `first` before `second` along the axis) and inside (three).
template <typename T>
GR_HD T box_mean_edge(T first, T second) {
  return (first + second) / T(2);
}
template <typename T>
GR_HD T box_mean_inner(T left, T centre, T right) {
  return ((left + centre) + right) / T(3);
}

// The adjoint at an edge and inside: each neighbour's value divided by that neighbour's own count.
template <typename T>
GR_HD T box_adjoint_edge(T first, T first_count, T second, T second_count) {
  return first / first_count + second / second_count;
}
template <typename T>
GR_HD T box_adjoint_inner(T left, T left_count, T centre, T centre_count, T right, T right_count) {
  return (left / left_count + centre / centre_count) + right / right_count;
}

// One output element of the 1D mean (or its adjoint) along an axis of n elements with stride s: `v` points
// at element i; v[-s] and v[s] are read only where they lie inside the axis.
template <typename T>
GR_HD T box_axis(const T* v, int64_t i, int64_t n, int64_t s, bool adjoint) {
  if (n == 1) return v[0];
  if (!adjoint) {
    if (i == 0) return box_mean_edge(v[0], v[s]);
    if (i == n - 1) return box_mean_edge(v[-s], v[0]);
    return box_mean_inner(v[-s], v[0], v[s]);
  }
  const T centre = T(box_count(i, n));
  if (i == 0) return box_adjoint_edge(v[0], centre, v[s], T(box_count(1, n)));
  if (i == n - 1) return box_adjoint_edge(v[-s], T(box_count(n - 2, n)), v[0], centre);
  return box_adjoint_inner(v[-s], T(box_count(i - 1, n)), v[0], centre, v[s], T(box_count(i + 1, n)));
}

// The axes (0: D, 1: H, 2: W) of the 1D stages, in the order they run: those longer than one voxel, D, H, W,
// `passes` times; reversed for the adjoint. Host code (the launchers of every backend).
inline std::vector<int> box_stages(int64_t D, int64_t H, int64_t W, int passes, bool adjoint) {
  std::vector<int> axes;
  for (int p = 0; p < passes; ++p)
    for (int axis = 0; axis < 3; ++axis)
      if ((axis == 0 ? D : axis == 1 ? H : W) > 1) axes.push_back(axis);
  if (adjoint) std::reverse(axes.begin(), axes.end());
  return axes;
}

}  // namespace gradreg
