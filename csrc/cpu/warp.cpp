#include "gradreg/warp.h"

#include <algorithm>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

template <typename T>
void warp_forward(const T* image, const T* flow, T* out, int64_t N, int64_t C, int64_t D, int64_t H,
                  int64_t W, bool nearest, int padding, int threads) {
  const int64_t DHW = D * H * W;
  const Padding pad = static_cast<Padding>(padding);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t z = 0; z < D; ++z) {
      const T* fz = flow + (n * 3 + 0) * DHW;
      const T* fy = flow + (n * 3 + 1) * DHW;
      const T* fx = flow + (n * 3 + 2) * DHW;
      const T* img = image + n * C * DHW;
      T* o = out + n * C * DHW;
      for (int64_t y = 0; y < H; ++y) {
        for (int64_t x = 0; x < W; ++x) {
          const int64_t p = (z * H + y) * W + x;
          if (nearest) {
            const int64_t iz = nearest_axis(T(z) + fz[p], D, pad);
            const int64_t iy = nearest_axis(T(y) + fy[p], H, pad);
            const int64_t ix = nearest_axis(T(x) + fx[p], W, pad);
            const bool inside = iz >= 0 && iy >= 0 && ix >= 0;
            const int64_t src = (iz * H + iy) * W + ix;
            for (int64_t c = 0; c < C; ++c) o[c * DHW + p] = inside ? img[c * DHW + src] : T(0);
          } else {
            const LinearAxis<T> az = linear_axis(T(z) + fz[p], D, pad);
            const LinearAxis<T> ay = linear_axis(T(y) + fy[p], H, pad);
            const LinearAxis<T> ax = linear_axis(T(x) + fx[p], W, pad);
            for (int64_t c = 0; c < C; ++c) o[c * DHW + p] = trilinear_sample(img + c * DHW, az, ay, ax, H, W);
          }
        }
      }
    }
  }
}

// The image gradient is a scatter. Each thread adds into a private buffer over a fixed,
// contiguous share of the output voxels, and the buffers are summed in thread order: the
// result is bit-identical from run to run for a given thread count, so this one path serves
// deterministic=True and False.
template <typename T>
void warp_backward(const T* grad_out, const T* image, const T* flow, T* grad_image, T* grad_flow, int64_t N,
                   int64_t C, int64_t D, int64_t H, int64_t W, int padding, int threads) {
  const int64_t DHW = D * H * W;
  const int64_t image_numel = N * C * DHW;
  const Padding pad = static_cast<Padding>(padding);
  const int64_t rows = N * D * H;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  std::vector<std::vector<T>> private_grads(grad_image ? threads - 1 : 0);
  if (grad_image) std::fill(grad_image, grad_image + image_numel, T(0));

#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id(), parts = team_size();
    T* accum = grad_image;
    if (grad_image && tid > 0) {
      private_grads[tid - 1].assign(image_numel, T(0));
      accum = private_grads[tid - 1].data();
    }
    int64_t begin, end;
    static_chunk(rows, tid, parts, begin, end);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (D * H), z = (r / H) % D, y = r % H;
      const T* f = flow + n * 3 * DHW;
      const T* img = image + n * C * DHW;
      const T* go = grad_out + n * C * DHW;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t p = (z * H + y) * W + x;
        const LinearAxis<T> az = linear_axis(T(z) + f[p], D, pad);
        const LinearAxis<T> ay = linear_axis(T(y) + f[DHW + p], H, pad);
        const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW + p], W, pad);
        T gz = T(0), gy = T(0), gx = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const T g = go[c * DHW + p];
          if (grad_flow) trilinear_coord_grad(img + c * DHW, g, az, ay, ax, H, W, gz, gy, gx);
          if (accum) scatter_trilinear(accum + (n * C + c) * DHW, az, ay, ax, H, W, g);
        }
        if (grad_flow) {
          T* gf = grad_flow + n * 3 * DHW;
          gf[p] = gz;
          gf[DHW + p] = gy;
          gf[2 * DHW + p] = gx;
        }
      }
    }
#pragma omp barrier
    if (grad_image && parts > 1) {
      int64_t b, e;
      static_chunk(image_numel, tid, parts, b, e);
      for (int t = 0; t < parts - 1; ++t) {  // the team may be smaller than asked for
        const T* buffer = private_grads[t].data();
        for (int64_t i = b; i < e; ++i) grad_image[i] += buffer[i];
      }
    }
  }
}

#define GRADREG_INSTANTIATE(T)                                                                            \
  template void warp_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int, \
                                int);                                                                     \
  template void warp_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t,     \
                                 int64_t, int, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
