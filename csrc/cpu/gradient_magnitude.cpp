#include "gradreg/gradient_magnitude.h"

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
  const int64_t DHW = D * H * W;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t nc = 0; nc < NC; ++nc) {
    for (int64_t z = 0; z < D; ++z) {
      const int64_t base = nc * DHW;
      for (int64_t y = 0; y < H; ++y) {
        const int64_t row = (z * H + y) * W;
        for (int64_t x = 0; x < W; ++x)
          grad_vol[base + row + x] =
              grad_mag_backward(vol + base, grad_out + base, out + base, row + x, z, y, x, D, H, W);
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
