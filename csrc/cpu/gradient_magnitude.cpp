#include "gradreg/gradient_magnitude.h"

#include <algorithm>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

template <typename T>
void gradient_magnitude_forward(const T* vol, T* out, int64_t NC, int64_t D, int64_t H, int64_t W,
                                T eps, int threads) {
  const int64_t HW = H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t nc = 0; nc < NC; ++nc) {
    for (int64_t z = 0; z < D; ++z) {
      const T* v = vol + nc * D * HW;
      T* o = out + nc * D * HW;
      const int64_t bz = step_back(z, HW), fz = step_forward(z, D, HW);
      for (int64_t y = 0; y < H; ++y) {
        const int64_t by = step_back(y, W), fy = step_forward(y, H, W);
        const int64_t row = (z * H + y) * W;
        o[row] = grad_mag_forward(v, row, bz, fz, by, fy, int64_t(0), step_forward(0, W, 1), eps);
#pragma omp simd
        for (int64_t x = 1; x < W - 1; ++x)  // interior: both x-neighbours exist
          o[row + x] = grad_mag_forward(v, row + x, bz, fz, by, fy, int64_t(1), int64_t(1), eps);
        if (W > 1) o[row + W - 1] = grad_mag_forward(v, row + W - 1, bz, fz, by, fy, int64_t(1), int64_t(0), eps);
      }
    }
  }
}

template <typename T>
void gradient_magnitude_backward(const T* grad_out, const T* vol, const T* out, T* grad_vol, int64_t NC,
                                 int64_t D, int64_t H, int64_t W, int threads) {
  const int64_t DHW = D * H * W, HW = H * W;
  // grad_out / out once per voxel into grad_vol's own storage would alias the result, so a
  // separate buffer: the gather below reads each scale six times.
  std::vector<T> scale(NC * DHW);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < NC * DHW; ++i) scale[i] = grad_mag_scale(grad_out[i], out[i]);
#pragma omp for collapse(2) schedule(static)
    for (int64_t nc = 0; nc < NC; ++nc) {
      for (int64_t z = 0; z < D; ++z) {
        const T* v = vol + nc * DHW;
        const T* r = scale.data() + nc * DHW;
        T* g = grad_vol + nc * DHW;
        const bool z_inside = z >= 2 && z <= D - 3;
        for (int64_t y = 0; y < H; ++y) {
          const int64_t row = (z * H + y) * W;
          const bool row_inside = z_inside && y >= 2 && y <= H - 3;
          const int64_t x_lo = row_inside ? std::min<int64_t>(2, W) : W;
          const int64_t x_hi = row_inside ? std::max<int64_t>(x_lo, W - 2) : W;
          for (int64_t x = 0; x < x_lo; ++x) g[row + x] = grad_mag_backward(v, r, row + x, z, y, x, D, H, W);
#pragma omp simd
          for (int64_t x = x_lo; x < x_hi; ++x) g[row + x] = grad_mag_backward_interior(v, r, row + x, HW, W);
          for (int64_t x = x_hi; x < W; ++x) g[row + x] = grad_mag_backward(v, r, row + x, z, y, x, D, H, W);
        }
      }
    }
  }
}

#define GRADREG_INSTANTIATE(T)                                                                     \
  template void gradient_magnitude_forward<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, T, int); \
  template void gradient_magnitude_backward<T>(const T*, const T*, const T*, T*, int64_t, int64_t,  \
                                               int64_t, int64_t, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
