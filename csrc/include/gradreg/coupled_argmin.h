// Per-point math of coupled_argmin, the search step of the coupled convex optimisation (ConvexAdam):
//
//   index[n, p] = argmin_k  C[n, k, p] + coupling * |d_k - u[n, :, p]|^2
//
// over the K = (2r+1)^3 displacements d_k of a cost volume (cost_volume.h's order, dx fastest), with u a
// smooth field in the same steps. C is the cost volume itself or, `mirrored`, the cost of the opposite
// search read where displacement k lands: C[n, k, p] = cost[n, K-1-k, clamp(p + d_k)] (d_{K-1-k} = -d_k,
// so a moving -> fixed search costs nothing more than the fixed -> moving one it mirrors).
//
// A NaN coupled cost counts as +inf. Of equal coupled costs, the displacement nearest u wins, then the lowest
// k: without a coupling (the first search of the convex stage) a flat cost (uniform regions, points outside
// the loss box) then keeps u instead of jumping to d_0 = (-r, -r, -r), which the smoothing would spread.
#pragma once

#include <cmath>

#include "cost_volume.h"

namespace gradreg {

// Every product is rounded alone, as the reference rounds it: a fused multiply-add rounds once and can turn two
// equal coupled costs or distances into unequal ones, so a kernel would break a tie another way than the
// reference. On the GPU by product_rounded (nvcc contracts by default); on the CPU the AVX2+FMA copy is compiled
// without contraction (isa_avx2.cpp), since product_rounded's barrier would stop these loops vectorising.
template <typename T>
GR_HD T coupled_distance(T dz, T dy, T dx, T uz, T uy, T ux) {
  const T ez = dz - uz, ey = dy - uy, ex = dx - ux;
#if defined(__CUDA_ARCH__)
  return product_rounded(ez, ez) + product_rounded(ey, ey) + product_rounded(ex, ex);
#else
  return ez * ez + ey * ey + ex * ex;
#endif
}

// cost + coupling * distance, NaN made +inf (so a NaN never beats a number and ties with +inf).
template <typename T>
GR_HD T coupled_cost(T cost, T coupling, T distance) {
#if defined(__CUDA_ARCH__)
  const T value = cost + product_rounded(coupling, distance);
#else
  const T value = cost + coupling * distance;
#endif
  return value != value ? T(INFINITY) : value;
}

// Whether (value, distance) replaces the best so far: a lower coupled cost, or an equal one nearer u (k runs
// upwards and strict comparisons keep the earlier k). Start from (+inf, +inf) and index 0.
template <typename T>
GR_HD bool coupled_better(T value, T distance, T best, T best_distance) {
  return value < best || (value == best && distance < best_distance);
}

// The channel and the clamped coordinate that displacement k of a mirrored search reads.
GR_HD int64_t mirrored_channel(int64_t k, int64_t K) { return K - 1 - k; }

}  // namespace gradreg
