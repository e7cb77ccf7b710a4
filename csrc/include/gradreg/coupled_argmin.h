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

template <typename T>
GR_HD T coupled_cost(T cost, T coupling, T dz, T dy, T dx, T uz, T uy, T ux) {
  const T ez = dz - uz, ey = dy - uy, ex = dx - ux;
  return cost + coupling * (ez * ez + ey * ey + ex * ex);
}

// Whether `value` replaces the best so far (strictly below: ties keep the lower k; NaN compares false).
template <typename T>
GR_HD bool coupled_better(T value, T best) {
  return value < best;
}

// The channel and the clamped coordinate that displacement k of a mirrored search reads.
GR_HD int64_t mirrored_channel(int64_t k, int64_t K) { return K - 1 - k; }

}  // namespace gradreg
