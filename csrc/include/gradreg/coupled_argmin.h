// Per-point math of coupled_argmin, the search step of the coupled convex optimisation (ConvexAdam):
//
//   index[n, p] = argmin_k  C[n, k, p] + coupling * |d_k - u[n, :, p]|^2
//
// over the K = (2r+1)^3 displacements d_k of a cost volume (cost_volume.h's order, dx fastest), with u a
// smooth field in the same steps. C is the cost volume itself or, `mirrored`, the cost of the opposite
// search read where displacement k lands: C[n, k, p] = cost[n, K-1-k, clamp(p + d_k)] (d_{K-1-k} = -d_k,
// so a moving -> fixed search costs nothing more than the fixed -> moving one it mirrors). The first
// (lowest) k of the minimum wins; a NaN never wins, and a point with no value below +inf gets index 0.
#pragma once

#include "cost_volume.h"

namespace gradreg {

#if defined(__CUDA_ARCH__)
// On the GPU, products and sums rounded one by one, as the reference rounds them: nvcc contracts
// a * b + c into an FMA by default, and its single rounding can reorder two near-equal coupled costs, so
// the CUDA kernel would pick another displacement than the reference.
__device__ __forceinline__ float coupled_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double coupled_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float coupled_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double coupled_add(double a, double b) { return __dadd_rn(a, b); }
#endif

template <typename T>
GR_HD T coupled_cost(T cost, T coupling, T dz, T dy, T dx, T uz, T uy, T ux) {
  const T ez = dz - uz, ey = dy - uy, ex = dx - ux;
#if defined(__CUDA_ARCH__)
  const T distance = coupled_add(coupled_add(coupled_mul(ez, ez), coupled_mul(ey, ey)), coupled_mul(ex, ex));
  return coupled_add(cost, coupled_mul(coupling, distance));
#else
  return cost + coupling * (ez * ez + ey * ey + ex * ex);
#endif
}

// Whether `value` replaces the best so far (strictly below: ties keep the lower k; NaN compares false).
template <typename T>
GR_HD bool coupled_better(T value, T best) {
  return value < best;
}

// The channel and the clamped coordinate that displacement k of a mirrored search reads.
GR_HD int64_t mirrored_channel(int64_t k, int64_t K) { return K - 1 - k; }

}  // namespace gradreg
