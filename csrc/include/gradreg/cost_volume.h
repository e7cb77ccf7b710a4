// Per-voxel math of the MIND cost volume, the discrete search step of deeds / ConvexAdam:
//
//   cost[n, k, q] = (1 / |B(q)|) * sum_{x in B(q)} sum_c (fixed[n, c, x] - moving[n, c, x + s * d_k])^2
//
// B(q) is the g x g x g block of voxels of control point q (clipped at the far edges), `moving` is
// zero outside the volume, and d_k runs over the (2r+1)^3 integer displacements in [-r, r]^3 with dx
// fastest: k = ((dz + r) * (2r + 1) + (dy + r)) * (2r + 1) + (dx + r), axes in (D, H, W) order.
#pragma once

#include "common.h"

namespace gradreg {

// The displacement (in steps of `spacing` voxels) of channel k, per axis.
struct Displacement {
  int64_t z, y, x;
};

GR_HD Displacement cost_volume_displacement(int64_t k, int64_t radius) {
  const int64_t side = 2 * radius + 1;
  return Displacement{k / (side * side) - radius, (k / side) % side - radius, k % side - radius};
}

GR_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The half-open range [lo, hi) of coordinates c in [0, n) whose partner c + offset is also in [0, n).
GR_HD void overlap_range(int64_t offset, int64_t n, int64_t& lo, int64_t& hi) {
  lo = offset < 0 ? -offset : 0;
  hi = offset > 0 ? n - offset : n;
  if (lo > n) lo = n;
  if (hi < lo) hi = lo;
}

// The voxels of block q along an axis of n voxels with blocks of g: [q * g, min(n, q * g + g)).
GR_HD int64_t block_begin(int64_t q, int64_t g) { return q * g; }
GR_HD int64_t block_end(int64_t q, int64_t g, int64_t n) { return q * g + g < n ? q * g + g : n; }

// One voxel's, one channel's term, and its derivative w.r.t. the fixed value (the moving value's
// derivative is its negative) times the upstream weight `w` = grad_out / |B(q)|. A moving sample
// outside the volume enters as m = 0.
template <typename T>
GR_HD T cost_term(T f, T m) {
  const T d = f - m;
  return d * d;
}

template <typename T>
GR_HD T cost_term_grad(T w, T f, T m) {
  return T(2) * w * (f - m);
}

}  // namespace gradreg
