#include "gradreg/warped_sq_diff.h"

#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

// One task per output row. Each row's weighted sum is kept in its own slot (in double) and the slots
// are added in row order at the end, so the value has the same bits for every thread count. The flow
// gradient of a voxel is local (its own sample only), so each row writes its own part of grad_flow:
// no scratch, no atomics. Voxels of weight 0 are skipped: they add exactly 0 and get a zero gradient.
template <typename T>
double warped_sq_diff_forward(const T* moving, const T* fixed, const T* flow, const T* weight, T* grad_flow,
                              int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding, int threads) {
  const int64_t HW = H * W, DHW = D * HW;
  const Padding pad = static_cast<Padding>(padding);
  std::vector<double> row_sums(checked_count({N, D, H}));  // before the parallel region: may throw
  const int64_t rows = N * D * H;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / (D * H), z = (row / H) % D, y = row % H;
    const int64_t offset = z * HW + y * W;
    const T* f = flow + n * 3 * DHW + offset;
    const T* wt = weight ? weight + n * DHW + offset : nullptr;
    const T* mov = moving + n * C * DHW;
    const T* fix = fixed + n * C * DHW + offset;
    T* gf = grad_flow ? grad_flow + n * 3 * DHW + offset : nullptr;
    double sum = 0.0;
    for (int64_t x = 0; x < W; ++x) {
      const T w = wt ? wt[x] : T(1);
      if (!(w != T(0))) {  // weight 0 (the engine's mask outside the fixed field of view)
        if (gf) gf[x] = gf[DHW + x] = gf[2 * DHW + x] = T(0);
        continue;
      }
      const LinearAxis<T> az = linear_axis(T(z) + f[x], D, pad);
      const LinearAxis<T> ay = linear_axis(T(y) + f[DHW + x], H, pad);
      const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW + x], W, pad);
      const T voxel = warped_sq_diff_voxel(mov, fix + x, C, DHW, az, ay, ax, H, W, w, gf ? gf + x : nullptr, DHW);
      sum += static_cast<double>(w * voxel);
    }
    row_sums[row] = sum;
  }
  double total = 0.0;
  for (const double s : row_sums) total += s;
  return total;
}

#define GRADREG_INSTANTIATE(T)                                                                                    \
  template double warped_sq_diff_forward<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                            int64_t, int64_t, int, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
