#include "gradreg/coupled_argmin.h"

#include <limits>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

// One task per plane (n, z) of points. The displacements run in the outer loop and the plane's points in
// the inner ones, so each pass streams one contiguous plane of the cost volume (shifted rows when
// mirrored) while the plane's best values and indices stay in L1/L2; the indices are int32 there, lanes
// of the costs' width, so the loops vectorise.
// Points [begin, end) of a run take cost c[p] (a row, or with `constant` the one value c[0], a clamped
// border) for displacement `label`: keep it where it beats the best so far.
template <typename T>
inline void relax(const T* c, bool constant, const T* u, int64_t stride, T coupling, T dz, T dy, T dx, int32_t label,
                  T* best, T* nearest, int32_t* arg, int64_t begin, int64_t end) {
  if (constant) {
    const T value = c[0];
    for (int64_t p = begin; p < end; ++p) {
      const T distance = coupled_distance(dz, dy, dx, u[p], u[stride + p], u[2 * stride + p]);
      const T v = coupled_cost(value, coupling, distance);
      if (coupled_better(v, distance, best[p], nearest[p])) {
        best[p] = v;
        nearest[p] = distance;
        arg[p] = label;
      }
    }
    return;
  }
  GR_SIMD
  for (int64_t p = begin; p < end; ++p) {
    const T distance = coupled_distance(dz, dy, dx, u[p], u[stride + p], u[2 * stride + p]);
    const T v = coupled_cost(c[p], coupling, distance);
    if (coupled_better(v, distance, best[p], nearest[p])) {
      best[p] = v;
      nearest[p] = distance;
      arg[p] = label;
    }
  }
}

// One task per plane (n, z) of points. The displacements run in the outer loop and the plane's points in
// the inner ones, so each pass streams one contiguous plane of the cost volume (shifted rows when
// mirrored) while the plane's best values and indices stay in L1/L2; the indices are int32 there, lanes
// of the costs' width, so the loops vectorise.
template <typename T>
void coupled_argmin(const T* cost, const T* field, T coupling, int64_t* index, int64_t N, int64_t D, int64_t H,
                    int64_t W, int radius, bool mirrored, int threads) {
  const int64_t side = 2 * int64_t(radius) + 1, K = side * side * side;
  const int64_t HW = H * W, DHW = D * HW, planes = N * D;
  const int team = threads > 0 ? threads : 1;
  std::vector<T> best_all(checked_count({team, HW}));  // before the parallel region: may throw
  std::vector<T> nearest_all(checked_count({team, HW}));
  std::vector<int32_t> arg_all(checked_count({team, HW}));
#pragma omp parallel num_threads(team)
  {
    T* best = best_all.data() + thread_id() * HW;
    T* nearest = nearest_all.data() + thread_id() * HW;
    int32_t* arg = arg_all.data() + thread_id() * HW;
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t n = plane / D, z = plane % D;
      const T* u = field + n * 3 * DHW + z * HW;
      for (int64_t p = 0; p < HW; ++p) {
        best[p] = nearest[p] = std::numeric_limits<T>::infinity();
        arg[p] = 0;
      }
      for (int64_t k = 0; k < K; ++k) {
        const Displacement d = cost_volume_displacement(k, radius);
        const T dz = T(d.z), dy = T(d.y), dx = T(d.x);
        const int32_t label = static_cast<int32_t>(k);
        if (!mirrored) {
          relax(cost + (n * K + k) * DHW + z * HW, false, u, DHW, coupling, dz, dy, dx, label, best, nearest, arg, 0,
                HW);
          continue;
        }
        // Row y reads source row clamp(y + dy), shifted by dx: points whose x + dx leaves the row read its
        // first or last value.
        const T* c = cost + (n * K + mirrored_channel(k, K)) * DHW + clamp_index(z + d.z, D) * HW;
        int64_t lo, hi;
        overlap_range(d.x, W, lo, hi);
        for (int64_t y = 0; y < H; ++y) {
          const T* row = c + clamp_index(y + d.y, H) * W;
          const int64_t o = y * W;
          T *best_row = best + o, *nearest_row = nearest + o;
          int32_t* arg_row = arg + o;
          if (lo > 0) relax(row, true, u + o, DHW, coupling, dz, dy, dx, label, best_row, nearest_row, arg_row, 0, lo);
          relax(row + d.x, false, u + o, DHW, coupling, dz, dy, dx, label, best_row, nearest_row, arg_row, lo, hi);
          if (hi < W)
            relax(row + W - 1, true, u + o, DHW, coupling, dz, dy, dx, label, best_row, nearest_row, arg_row, hi, W);
        }
      }
      int64_t* out = index + n * DHW + z * HW;
      for (int64_t p = 0; p < HW; ++p) out[p] = arg[p];
    }
  }
}

#define GRADREG_INSTANTIATE(T)                                                                                 \
  template void coupled_argmin<T>(const T*, const T*, T, int64_t*, int64_t, int64_t, int64_t, int64_t, int, bool, \
                                  int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
