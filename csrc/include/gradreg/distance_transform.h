// Per-line math of the exact squared Euclidean distance transform (Felzenszwalb and Huttenlocher, "Distance
// Transforms of Sampled Functions", 2012): the lower envelope of one parabola per site along a line.
//
// A 3D transform is this 1D one along each axis in turn, each pass starting from the previous pass's values,
// with the axis's squared voxel size as the weight: after the three passes every voxel holds
// min over sites s of w0 (x0 - s0)^2 + (w1 (x1 - s1)^2 + w2 (x2 - s2)^2), the squared distance in mm.
#pragma once

#include <cstdint>
#include <limits>

namespace gradreg {

// out[q] = min over p in [0, n) of weight * (q - p)^2 + f[p]; f[p] = +inf where p holds no site (out is all
// +inf when no p does). `site` (n ints) and `bound` (n + 1 doubles) are scratch; `out` must not overlap `f`.
inline void lower_envelope(const double* f, double* out, int64_t n, double weight, int64_t* site, double* bound) {
  const double inf = std::numeric_limits<double>::infinity();
  int64_t top = -1;  // the envelope's parabolas: site[0..top], parabola j lowest on (bound[j], bound[j + 1]]
  for (int64_t q = 0; q < n; ++q) {
    if (f[q] == inf) continue;
    const double lifted = f[q] + weight * double(q) * double(q);
    double crossing = -inf;  // where parabola q drops below the envelope's last one
    while (top >= 0) {
      const int64_t p = site[top];
      crossing = (lifted - (f[p] + weight * double(p) * double(p))) / (2.0 * weight * double(q - p));
      if (crossing > bound[top]) break;
      --top;  // parabola p is nowhere lowest
    }
    ++top;
    site[top] = q;
    bound[top] = top == 0 ? -inf : crossing;
  }
  if (top < 0) {
    for (int64_t q = 0; q < n; ++q) out[q] = inf;
    return;
  }
  bound[top + 1] = inf;
  int64_t j = 0;
  for (int64_t q = 0; q < n; ++q) {
    while (bound[j + 1] < double(q)) ++j;
    const double step = double(q - site[j]);
    out[q] = weight * step * step + f[site[j]];
  }
}

}  // namespace gradreg
