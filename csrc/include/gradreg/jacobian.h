// Per-voxel math of the Jacobian determinant det(I + grad u) of the map x -> x + u(x) (metrics.regularity).
//
// Derivatives are numpy.gradient's: (u[i + 1] - u[i - 1]) / 2 inside, u[1] - u[0] and u[n - 1] - u[n - 2] at the
// borders (axes of at least 2 voxels). The determinant is the cofactor expansion along the first row in the
// order of metrics.jacobian_determinant's numpy expression, every product rounded on its own (no fused
// multiply-add), so the two give the same doubles.
#pragma once

#include <cstdint>

#include "common.h"

namespace gradreg {

// d u / d x at coordinate c of an axis of n voxels, for u's value at p and the axis's stride s.
GR_HD double axis_derivative(const double* p, int64_t c, int64_t n, int64_t s) {
  if (c == 0) return p[s] - p[0];
  if (c == n - 1) return p[0] - p[-s];
  return (p[s] - p[-s]) / 2.0;
}

// det(I + grad u) at voxel v = (d, h, w) of a (3, D, H, W) field u, channel k along axis k.
GR_HD double jacobian_determinant_at(const double* u, int64_t d, int64_t h, int64_t w, int64_t D, int64_t H,
                                     int64_t W) {
  const int64_t plane = H * W, channel = D * plane, v = (d * H + h) * W + w;
  double j[3][3];
  for (int i = 0; i < 3; ++i) {
    const double* p = u + i * channel + v;
    // + 0.0 off the diagonal as numpy adds it (it turns -0.0 into 0.0)
    j[i][0] = axis_derivative(p, d, D, plane) + (i == 0 ? 1.0 : 0.0);
    j[i][1] = axis_derivative(p, h, H, W) + (i == 1 ? 1.0 : 0.0);
    j[i][2] = axis_derivative(p, w, W, 1) + (i == 2 ? 1.0 : 0.0);
  }
  const double minor0 = product_rounded(j[1][1], j[2][2]) - product_rounded(j[1][2], j[2][1]);
  const double minor1 = product_rounded(j[1][0], j[2][2]) - product_rounded(j[1][2], j[2][0]);
  const double minor2 = product_rounded(j[1][0], j[2][1]) - product_rounded(j[1][1], j[2][0]);
  return (product_rounded(j[0][0], minor0) - product_rounded(j[0][1], minor1)) + product_rounded(j[0][2], minor2);
}

}  // namespace gradreg
