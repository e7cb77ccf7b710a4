// Per-voxel math of integrate_velocity (scaling and squaring, VoxelMorph's VecInt): with
// u_0 = v / 2^steps, each step is u_{k+1}(p) = u_k(p) + u_k sampled trilinearly at p + u_k(p), i.e.
// u + warp(u, u) with warp's conventions (voxel units, channel k along spatial axis k, zeros or
// border padding). The sampling is warp.h's; only the chaining is written here.
//
// Backward of one step, given G = d(loss)/d(u_{k+1}):
//   d/du_k(p) = G(p)                                   (the identity term)
//             + sum_c G_c(p) d(sample_c)/d(coordinate)  (u_k as the flow, at p)
//             + sum over voxels q that sample p of G(q) times p's trilinear weight  (u_k as the image)
// The first two live at p ("direct"); the third is a scatter, so the kernels accumulate every part
// into a zeroed buffer (per thread, or with atomics).
#pragma once

#include "warp.h"

namespace gradreg {

struct FieldGeometry {
  int64_t D, H, W;
  int64_t voxels() const { return D * H * W; }
};

template <typename T>
GR_HD void sample_axes(const T* u, int64_t p, int64_t z, int64_t y, int64_t x, const FieldGeometry& g,
                       Padding padding, LinearAxis<T>& az, LinearAxis<T>& ay, LinearAxis<T>& ax) {
  const int64_t DHW = g.D * g.H * g.W;
  az = linear_axis(T(z) + u[p], g.D, padding);
  ay = linear_axis(T(y) + u[DHW + p], g.H, padding);
  ax = linear_axis(T(x) + u[2 * DHW + p], g.W, padding);
}

// next(p) = u(p) + u(p + u(p)) for the three channels of one item's field.
template <typename T>
GR_HD void squaring_step_voxel(const T* u, T* next, int64_t z, int64_t y, int64_t x, const FieldGeometry& g,
                               Padding padding) {
  const int64_t DHW = g.D * g.H * g.W, p = (z * g.H + y) * g.W + x;
  LinearAxis<T> az, ay, ax;
  sample_axes(u, p, z, y, x, g, padding, az, ay, ax);
GR_UNROLL
  for (int c = 0; c < 3; ++c) next[c * DHW + p] = u[c * DHW + p] + trilinear_sample(u + c * DHW, az, ay, ax, g.H, g.W);
}

// Both parts of voxel p's contribution to d/du_k, added into dst (which starts at zero): the direct
// part at p, the scatter part at the corners p samples. Axes and corners are formed once for both.
template <typename T>
GR_HD void squaring_step_grad_voxel(const T* u, const T* G, T* dst, int64_t z, int64_t y, int64_t x,
                                    const FieldGeometry& g, Padding padding) {
  const int64_t DHW = g.D * g.H * g.W, p = (z * g.H + y) * g.W + x;
  LinearAxis<T> az, ay, ax;
  sample_axes(u, p, z, y, x, g, padding, az, ay, ax);
  T gz = T(0), gy = T(0), gx = T(0);
GR_UNROLL
  for (int c = 0; c < 3; ++c) {
    const T upstream = G[c * DHW + p];
    trilinear_coord_grad(u + c * DHW, upstream, az, ay, ax, g.H, g.W, gz, gy, gx);
    scatter_trilinear(dst + c * DHW, az, ay, ax, g.H, g.W, upstream);
  }
  dst[p] += G[p] + gz;
  dst[DHW + p] += G[DHW + p] + gy;
  dst[2 * DHW + p] += G[2 * DHW + p] + gx;
}

}  // namespace gradreg
