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
// into a zeroed buffer (slab by slab on the CPU, with atomics on the GPU).
#pragma once

#include "warp.h"

namespace gradreg {

struct FieldGeometry {
  int64_t D, H, W;
  GR_HD int64_t voxels() const { return D * H * W; }
};

template <typename T>
GR_HD void sample_axes(const T* u, int64_t p, int64_t z, int64_t y, int64_t x, const FieldGeometry& g,
                       Padding padding, LinearAxis<T>& az, LinearAxis<T>& ay, LinearAxis<T>& ax) {
  const int64_t DHW = g.D * g.H * g.W;
  az = linear_axis(T(z) + u[p], g.D, padding);
  ay = linear_axis(T(y) + u[DHW + p], g.H, padding);
  ax = linear_axis(T(x) + u[2 * DHW + p], g.W, padding);
}

// Where the forward writes u_k, k = 0 (the scaled velocity) .. steps: 0 = the output, 1 = the one
// scratch field, 2 + j = checkpoint j (u_k for k = (j + 1) interval; `checkpoints` of them, or none).
// Planned from the last step back so that u_steps lands in the output and no step writes the field it
// reads: two fields besides the checkpoints. (Host code.)
inline int forward_target(int k, int steps, int interval, int checkpoints) {
  int target = 0;  // u_steps
  for (int j = steps - 1; j >= k; --j) {
    if (j > 0 && checkpoints > 0 && j % interval == 0 && j / interval <= checkpoints)
      target = 2 + j / interval - 1;
    else
      target = (target == 1) ? 0 : 1;
  }
  return target;
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

// Voxel p's contribution to d/du_k: the sample's axes (for the scatter part, which the caller adds
// onto the corners: privately on the CPU, atomically on the GPU), the upstream value of each channel
// it scatters, and the direct part at p.
template <typename T>
struct SquaringGradTerms {
  LinearAxis<T> az, ay, ax;
  T upstream[3];
  T direct[3];
};

template <typename T>
GR_HD SquaringGradTerms<T> squaring_step_grad_terms(const T* u, const T* G, int64_t z, int64_t y, int64_t x,
                                                    const FieldGeometry& g, Padding padding) {
  const int64_t DHW = g.D * g.H * g.W, p = (z * g.H + y) * g.W + x;
  SquaringGradTerms<T> t;
  sample_axes(u, p, z, y, x, g, padding, t.az, t.ay, t.ax);
  T gz = T(0), gy = T(0), gx = T(0);
GR_UNROLL
  for (int c = 0; c < 3; ++c) {
    t.upstream[c] = G[c * DHW + p];
    trilinear_coord_grad(u + c * DHW, t.upstream[c], t.az, t.ay, t.ax, g.H, g.W, gz, gy, gx);
  }
  t.direct[0] = t.upstream[0] + gz;
  t.direct[1] = t.upstream[1] + gy;
  t.direct[2] = t.upstream[2] + gx;
  return t;
}

}  // namespace gradreg
