#include "gradreg/integrate.h"

#include <algorithm>
#include <cmath>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace integrate_detail {

template <typename T>
void scale_field(const T* in, T* out, int64_t numel, T scale, int threads) {
#pragma omp parallel for simd schedule(static) num_threads(threads)
  for (int64_t i = 0; i < numel; ++i) out[i] = in[i] * scale;
}

template <typename T>
void squaring_step(const T* u, T* next, int64_t N, const FieldGeometry& g, Padding padding, int threads) {
  const int64_t DHW = g.voxels();
  // Planes handed out two at a time: on a shared machine a thread that loses its core leaves the rest
  // to the others instead of holding up the step (each voxel is written once: same result any order).
#pragma omp parallel for collapse(2) schedule(dynamic, 2) num_threads(threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t z = 0; z < g.D; ++z)
      for (int64_t y = 0; y < g.H; ++y)
        for (int64_t x = 0; x < g.W; ++x) squaring_step_voxel(u + n * 3 * DHW, next + n * 3 * DHW, z, y, x, g, padding);
}

// u_k, from the stored field nearest below it (u_0 = v * scale, or a checkpoint u_{j * interval}) by
// the remaining steps, ping-ponging between a and b; returns the buffer that holds it.
template <typename T>
const T* recompute_field(const T* velocity, const T* checkpoints, int interval, int k, T scale, T* a, T* b, int64_t N,
                         const FieldGeometry& g, Padding padding, int threads) {
  const int64_t numel = N * 3 * g.voxels();
  const int nearest = checkpoints != nullptr ? (k / interval) * interval : 0;
  const T* src;
  if (nearest == 0) {
    scale_field(velocity, a, numel, scale, threads);
    src = a;
  } else {
    src = checkpoints + (nearest / interval - 1) * numel;
  }
  for (int step = nearest; step < k; ++step) {
    T* dst = (src == a) ? b : a;
    squaring_step(src, dst, N, g, padding, threads);
    src = dst;
  }
  return src;
}

// How far (in planes) a voxel's scatter can land from its own plane: the largest finite |u_z| rounded
// up, plus the second corner. Non-finite displacements scatter nothing; coordinates are clamped to
// [-2, D + 1] (zeros) or [0, D - 1] (border), so the bound never needs to exceed D + 3.
template <typename T>
int64_t scatter_reach(const T* u, int64_t N, const FieldGeometry& g, int threads) {
  const int64_t DHW = g.voxels();
  double largest = 0.0;
#pragma omp parallel for collapse(2) reduction(max : largest) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < DHW; ++i) {
      const double a = std::fabs(double(u[n * 3 * DHW + i]));
      if (a == a) largest = std::max(largest, std::min(a, double(g.D + 3)));  // a NaN scatters nothing
    }
  return std::min<int64_t>(static_cast<int64_t>(std::ceil(largest)) + 1, g.D + 3);
}

// d/du_k from G = d/du_{k+1} into `out`. The scatter of a voxel at plane z lands within `reach`
// planes of z, so slabs of 2 * reach planes, taken every other one, never write the same voxel:
// the even slabs (of every item) run in parallel, then the odd ones, each slab by one thread in
// voxel order, accumulating straight into `out`. No per-thread copy exists, and the result is the
// same bits whatever the thread count.
template <typename T>
void squaring_step_backward(const T* u, const T* G, T* out, int64_t N, const FieldGeometry& g, Padding padding,
                            int threads) {
  const int64_t DHW = g.voxels(), numel = N * 3 * DHW;
  const int64_t slab = std::max<int64_t>(1, 2 * scatter_reach(u, N, g, threads));
  const int64_t slabs = (g.D + slab - 1) / slab, pairs = (slabs + 1) / 2;
#pragma omp parallel for simd schedule(static) num_threads(threads)
  for (int64_t i = 0; i < numel; ++i) out[i] = T(0);
  for (int phase = 0; phase < 2; ++phase) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t unit = 0; unit < N * pairs; ++unit) {
      const int64_t n = unit / pairs, s = 2 * (unit % pairs) + phase;
      if (s >= slabs) continue;
      const T* un = u + n * 3 * DHW;
      const T* Gn = G + n * 3 * DHW;
      T* dst = out + n * 3 * DHW;
      const int64_t z_end = std::min<int64_t>(g.D, (s + 1) * slab);
      for (int64_t z = s * slab; z < z_end; ++z)
        for (int64_t y = 0; y < g.H; ++y)
          for (int64_t x = 0; x < g.W; ++x) {
            const SquaringGradTerms<T> t = squaring_step_grad_terms(un, Gn, z, y, x, g, padding);
            const int64_t p = (z * g.H + y) * g.W + x;
            for (int c = 0; c < 3; ++c) {
              scatter_trilinear(dst + c * DHW, t.az, t.ay, t.ax, g.H, g.W, t.upstream[c]);
              dst[c * DHW + p] += t.direct[c];
            }
          }
    }
  }
}

}  // namespace integrate_detail

template <typename T>
void integrate_forward(const T* velocity, T* out, T* scratch, T* checkpoints, int interval, int64_t N, int64_t D,
                       int64_t H, int64_t W, int steps, int padding, int threads) {
  using namespace integrate_detail;
  const FieldGeometry g{D, H, W};
  const Padding pad = static_cast<Padding>(padding);
  const int64_t numel = N * 3 * g.voxels();
  const T scale = T(1) / T(int64_t(1) << steps);  // a power of two: v * scale is exactly v / 2^steps
  const int count = checkpoints != nullptr ? (steps - 1) / interval : 0;
  auto field = [&](int target) {
    return target == 0 ? out : (target == 1 ? scratch : checkpoints + (target - 2) * numel);
  };
  scale_field(velocity, field(forward_target(0, steps, interval, count)), numel, scale, threads);
  for (int k = 1; k <= steps; ++k)
    squaring_step(static_cast<const T*>(field(forward_target(k - 1, steps, interval, count))),
                  field(forward_target(k, steps, interval, count)), N, g, pad, threads);
}

template <typename T>
void integrate_backward(const T* velocity, const T* checkpoints, int interval, const T* grad_out, T* grad_velocity,
                        T* scratch, int64_t N, int64_t D, int64_t H, int64_t W, int steps, int padding, int threads) {
  using namespace integrate_detail;
  const FieldGeometry g{D, H, W};
  const Padding pad = static_cast<Padding>(padding);
  const int64_t numel = N * 3 * g.voxels();
  const T scale = T(1) / T(int64_t(1) << steps);
  T* field_a = scratch;
  T* field_b = scratch + numel;
  T* grad_spare = scratch + 2 * numel;
  const T* G = grad_out;
  // Each step's input field is recomputed from the nearest stored one below it (the velocity, or a
  // checkpoint the forward kept), never stored for the whole chain.
  for (int k = steps - 1; k >= 0; --k) {
    const T* u = recompute_field(velocity, checkpoints, interval, k, scale, field_a, field_b, N, g, pad, threads);
    T* dst = (k % 2 == 0) ? grad_velocity : grad_spare;  // the last step (k = 0) lands in grad_velocity
    squaring_step_backward(u, G, dst, N, g, pad, threads);
    G = dst;
  }
  scale_field(G, grad_velocity, numel, scale, threads);
}

#define GRADREG_INSTANTIATE(T)                                                                                     \
  template void integrate_forward<T>(const T*, T*, T*, T*, int, int64_t, int64_t, int64_t, int64_t, int, int,   \
                                     int);                                                                      \
  template void integrate_backward<T>(const T*, const T*, int, const T*, T*, T*, int64_t, int64_t, int64_t,     \
                                      int64_t, int, int, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
