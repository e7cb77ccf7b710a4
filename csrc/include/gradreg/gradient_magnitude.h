// Per-voxel math of the gradient magnitude G(V) = sqrt(gz^2 + gy^2 + gx^2 + eps),
// g_a = V(x + e_a) - V(x - e_a) (eq. 1 of Xu et al., no division by 2), replicate edges.
#pragma once

#include "common.h"

namespace gradreg {

// `back_*` / `fwd_*` are the element distances to the neighbours (0 at an edge).
template <typename T>
GR_HD T grad_mag_forward(const T* v, int64_t i, int64_t back_z, int64_t fwd_z, int64_t back_y,
                         int64_t fwd_y, int64_t back_x, int64_t fwd_x, T eps) {
  const T gz = v[i + fwd_z] - v[i - back_z];
  const T gy = v[i + fwd_y] - v[i - back_y];
  const T gx = v[i + fwd_x] - v[i - back_x];
  return sqrt(gz * gz + gy * gy + gx * gx + eps);
}

// grad_out / out: the derivative of the loss w.r.t. each g_a is this times g_a. 0 where out == 0
// (only possible with eps == 0), which picks the zero subgradient of sqrt at 0 instead of a NaN.
template <typename T>
GR_HD T grad_mag_scale(T grad_out, T out) {
  return out > T(0) ? grad_out / out : T(0);
}

// Contribution to d(loss)/dV[q] of the central differences along one axis, at coordinate c (of
// n) with element stride s; scale[p] = grad_mag_scale at voxel p. It gathers from the voxels
// whose difference reads q, so the backward needs no scatter: voxel q-s reads q as its forward
// neighbour, q+s as its backward neighbour, and an edge voxel reads itself.
template <typename T>
GR_HD T grad_mag_backward_axis(const T* v, const T* scale, int64_t q, int64_t c, int64_t n, int64_t s) {
  T acc = T(0);
  if (c >= 1) {
    const int64_t p = q - s;
    acc += scale[p] * (v[q] - v[p - step_back(c - 1, s)]);
  }
  if (c <= n - 2) {
    const int64_t p = q + s;
    acc -= scale[p] * (v[p + step_forward(c + 1, n, s)] - v[q]);
  }
  if (c == n - 1 || c == 0) {
    // The edge voxel is its own missing neighbour: it enters its own difference with + at the
    // far edge and - at the near edge (both, cancelling, when n == 1).
    const T self = scale[q] * (v[q + step_forward(c, n, s)] - v[q - step_back(c, s)]);
    if (c == n - 1) acc += self;
    if (c == 0) acc -= self;
  }
  return acc;
}

template <typename T>
GR_HD T grad_mag_backward(const T* v, const T* scale, int64_t q, int64_t z, int64_t y, int64_t x, int64_t D,
                          int64_t H, int64_t W) {
  return grad_mag_backward_axis(v, scale, q, z, D, H * W) + grad_mag_backward_axis(v, scale, q, y, H, W) +
         grad_mag_backward_axis(v, scale, q, x, W, int64_t(1));
}

// The same where every neighbour used above is 2 voxels or more from an edge along each axis
// (2 <= c <= n-3): branch-free, so the CPU loop vectorises.
template <typename T>
GR_HD T grad_mag_backward_interior(const T* v, const T* scale, int64_t q, int64_t HW, int64_t W) {
  T acc = T(0);
  const int64_t strides[3] = {HW, W, 1};
  for (int a = 0; a < 3; ++a) {
    const int64_t s = strides[a];
    acc += scale[q - s] * (v[q] - v[q - 2 * s]) - scale[q + s] * (v[q + 2 * s] - v[q]);
  }
  return acc;
}

}  // namespace gradreg
