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

// Planes [lo, hi] of the image that the in-bounds z-corners of one output row's samples touch
// (lo > hi: none). One pair per (item, output plane, row): the only scratch of the image gradient.
struct PlaneReach {
  int32_t lo, hi;
};

// Also zeroes the flow gradient (grad_flow: the row's z-component, or null) of the samples that
// reach no plane: no block visits them, and they read only zeros.
template <typename T>
PlaneReach row_reach(const T* fz, int64_t z, int64_t D, int64_t W, int64_t DHW, Padding pad, T* grad_flow) {
  PlaneReach reach{static_cast<int32_t>(D), -1};
  for (int64_t i = 0; i < W; ++i) {
    const LinearAxis<T> az = linear_axis(T(z) + fz[i], D, pad);
    if (grad_flow && !az.lo_in && !az.hi_in) grad_flow[i] = grad_flow[DHW + i] = grad_flow[2 * DHW + i] = T(0);
    const int32_t lo = static_cast<int32_t>(az.lo);  // in [-2, D + 1]
    if (az.lo_in) reach.lo = std::min(reach.lo, lo), reach.hi = std::max(reach.hi, lo);
    if (az.hi_in) reach.lo = std::min(reach.lo, lo + 1), reach.hi = std::max(reach.hi, lo + 1);
  }
  return reach;
}

// The image gradient is a scatter, done here as a gather by destination: the image planes are cut
// into blocks, and the task that owns a block visits, in output order, the samples of the output
// planes that reach it (plane_reach), adding only the corners that fall inside it. Each image voxel
// therefore receives its terms in the order of a single-threaded scatter, whatever the thread count
// or block size: the result is bit-identical for every thread count, there are no atomics, and the
// scratch is one PlaneReach per output row (8 * N * D * H bytes, 1/W of a one-channel float64 image,
// whatever the thread count), no copy of the image per thread.
// The flow gradient of a sample is formed by the block that holds its first in-bounds z-corner;
// a sample with no z-corner inside reads only zeros, so its flow gradient is 0.
template <typename T>
void warp_backward(const T* grad_out, const T* image, const T* flow, T* grad_image, T* grad_flow, int64_t N,
                   int64_t C, int64_t D, int64_t H, int64_t W, int padding, int threads) {
  const int64_t HW = H * W, DHW = D * HW;
  const Padding pad = static_cast<Padding>(padding);
  std::vector<PlaneReach> reach(checked_count({N, D, H}));  // before the parallel regions: may throw
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t plane = 0; plane < N * D; ++plane) {
    const int64_t n = plane / D, z = plane % D;
    for (int64_t y = 0; y < H; ++y) {
      const int64_t offset = n * 3 * DHW + z * HW + y * W;
      reach[plane * H + y] = row_reach(flow + offset, z, D, W, DHW, pad, grad_flow ? grad_flow + offset : nullptr);
    }
  }
  // Any block size gives the same bits. A block re-reads the z-flow of the rows that reach it, so
  // blocks are large: one for a single thread, else about three per thread to balance the load.
  const int64_t block_count = threads > 1 ? 3 * int64_t(threads) : 1;
  const int64_t block_planes = std::max<int64_t>(1, (N * D + block_count - 1) / block_count);
  const int64_t blocks_per_item = (D + block_planes - 1) / block_planes;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < N * blocks_per_item; ++task) {
    const int64_t n = task / blocks_per_item;
    const int64_t z0 = (task % blocks_per_item) * block_planes, z1 = std::min(D, z0 + block_planes);
    const T* f = flow + n * 3 * DHW;
    const T* img = image + n * C * DHW;
    const T* go = grad_out + n * C * DHW;
    T* gi = grad_image ? grad_image + n * C * DHW : nullptr;
    T* gf = grad_flow ? grad_flow + n * 3 * DHW : nullptr;
    if (gi)
      for (int64_t c = 0; c < C; ++c) std::fill(gi + c * DHW + z0 * HW, gi + c * DHW + z1 * HW, T(0));
    for (int64_t row = 0; row < D * H; ++row) {
      const PlaneReach& r = reach[n * D * H + row];
      if (r.hi < z0 || r.lo >= z1) continue;
      const int64_t z = row / H, y = row % H;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t p = row * W + x;
        const LinearAxis<T> az = linear_axis(T(z) + f[p], D, pad);
        // The z-corners inside this block (the block of the other one adds that one).
        LinearAxis<T> az_block = az;
        az_block.lo_in = az.lo_in && az.lo >= z0 && az.lo < z1;
        az_block.hi_in = az.hi_in && az.lo + 1 >= z0 && az.lo + 1 < z1;
        if (!az_block.lo_in && !az_block.hi_in) continue;
        const bool owns_sample = az_block.lo_in || !az.lo_in;  // this block holds the first in-bounds z-corner
        const LinearAxis<T> ay = linear_axis(T(y) + f[DHW + p], H, pad);
        const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW + p], W, pad);
        T gz = T(0), gy = T(0), gx = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const T g = go[c * DHW + p];
          if (gf && owns_sample) trilinear_coord_grad(img + c * DHW, g, az, ay, ax, H, W, gz, gy, gx);
          if (gi) scatter_trilinear(gi + c * DHW, az_block, ay, ax, H, W, g);
        }
        if (gf && owns_sample) {
          gf[p] = gz;
          gf[DHW + p] = gy;
          gf[2 * DHW + p] = gx;
        }
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
