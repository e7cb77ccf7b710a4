// Gradient magnitude on the GPU: forward (gradreg/gradient_magnitude.h) and a gather-based
// backward without atomics.
#include "gradreg/gradient_magnitude.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

// Rows are (nc, z, y); HW and W are the z and y strides.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    gradient_magnitude_forward_kernel(const T* __restrict__ vol, T* __restrict__ out, int64_t rows, int64_t D,
                                      int64_t H, int64_t W, T eps) {
  const int64_t HW = H * W;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % H, z = (row / H) % D;
    const int64_t bz = step_back(z, HW), fz = step_forward(z, D, HW);
    const int64_t by = step_back(y, W), fy = step_forward(y, H, W);
    for (int64_t x = threadIdx.x; x < W; x += blockDim.x) {
      const int64_t i = row * W + x;
      out[i] = grad_mag_forward(vol, i, bz, fz, by, fy, step_back(x, int64_t(1)), step_forward(x, W, int64_t(1)),
                                eps);
    }
  }
}

// The header's grad_mag_backward reads a precomputed scale array (grad_out / out per voxel; the
// CPU core fills one so that its inner loop vectorises). On the GPU that array would cost an extra
// write and read of the whole volume, and grad_vol cannot hold it (the gather reads neighbours'
// scales while other threads write grad_vol). So this mirrors grad_mag_backward_axis with each
// scale formed where it is read, from grad_out and out (neighbour loads come from cache).
template <typename T>
__device__ __forceinline__ T scale_at(const T* __restrict__ grad_out, const T* __restrict__ out, int64_t p) {
  return grad_mag_scale(grad_out[p], out[p]);
}

template <typename T>
__device__ __forceinline__ T backward_axis(const T* __restrict__ v, const T* __restrict__ grad_out,
                                           const T* __restrict__ out, int64_t q, int64_t c, int64_t n, int64_t s) {
  T acc = T(0);
  if (c >= 1) {  // q - s reads q as its forward neighbour
    const int64_t p = q - s;
    acc += scale_at(grad_out, out, p) * (v[q] - v[p - step_back(c - 1, s)]);
  }
  if (c <= n - 2) {  // q + s reads q as its backward neighbour
    const int64_t p = q + s;
    acc -= scale_at(grad_out, out, p) * (v[p + step_forward(c + 1, n, s)] - v[q]);
  }
  if (c == n - 1 || c == 0) {  // an edge voxel is its own missing neighbour
    const T self = scale_at(grad_out, out, q) * (v[q + step_forward(c, n, s)] - v[q - step_back(c, s)]);
    if (c == n - 1) acc += self;
    if (c == 0) acc -= self;
  }
  return acc;
}

// Each thread gathers d(loss)/dV[q] from the (up to 7) voxels whose differences read q: no atomics.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    gradient_magnitude_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ vol,
                                       const T* __restrict__ out, T* __restrict__ grad_vol, int64_t rows, int64_t D,
                                       int64_t H, int64_t W) {
  const int64_t HW = H * W, DHW = D * HW;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % H, z = (row / H) % D, nc = row / (D * H);
    const T* v = vol + nc * DHW;
    const T* go = grad_out + nc * DHW;
    const T* o = out + nc * DHW;
    for (int64_t x = threadIdx.x; x < W; x += blockDim.x) {
      const int64_t q = (z * H + y) * W + x;
      grad_vol[nc * DHW + q] = backward_axis(v, go, o, q, z, D, HW) + backward_axis(v, go, o, q, y, H, W) +
                               backward_axis(v, go, o, q, x, W, int64_t(1));
    }
  }
}

std::string check_sizes(const char* op, int64_t NC, int64_t D, int64_t H, int64_t W, int64_t* rows) {
  int64_t total;
  if (NC < 1 || D < 1 || H < 1 || W < 1 || !checked_product({NC, D, H, W}, &total))
    return std::string(op) + ": sizes must be >= 1 with a product that fits int64, got NC=" + std::to_string(NC) +
           " D=" + std::to_string(D) + " H=" + std::to_string(H) + " W=" + std::to_string(W);
  *rows = NC * D * H;
  return "";
}

template <typename T>
std::string launch_forward(uintptr_t vol, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W, T eps,
                           uintptr_t stream) {
  int64_t rows;
  std::string err = check_sizes("gradient_magnitude_forward", NC, D, H, W, &rows);
  if (!err.empty()) return err;
  if (!vol || !out) return "gradient_magnitude_forward: `vol` and `out` must be device pointers, got 0";
  launch_kernel(gradient_magnitude_forward_kernel<T>, row_grid(rows), row_block(), as_stream(stream),
                reinterpret_cast<const T*>(vol), reinterpret_cast<T*>(out), rows, D, H, W, eps);
  return launch_error("gradient_magnitude_forward");
}

template <typename T>
std::string launch_backward(uintptr_t grad_out, uintptr_t vol, uintptr_t out, uintptr_t grad_vol, int64_t NC,
                            int64_t D, int64_t H, int64_t W, uintptr_t stream) {
  int64_t rows;
  std::string err = check_sizes("gradient_magnitude_backward", NC, D, H, W, &rows);
  if (!err.empty()) return err;
  if (!grad_out || !vol || !out || !grad_vol)
    return "gradient_magnitude_backward: `grad_out`, `vol`, `out` and `grad_vol` must be device pointers, got 0";
  launch_kernel(gradient_magnitude_backward_kernel<T>, row_grid(rows), row_block(), as_stream(stream),
                reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(vol), reinterpret_cast<const T*>(out),
                reinterpret_cast<T*>(grad_vol), rows, D, H, W);
  return launch_error("gradient_magnitude_backward");
}

}  // namespace

std::string gradient_magnitude_forward(bool is_double, uintptr_t vol, uintptr_t out, int64_t NC, int64_t D,
                                       int64_t H, int64_t W, double eps, uintptr_t stream) {
  return is_double ? launch_forward<double>(vol, out, NC, D, H, W, eps, stream)
                   : launch_forward<float>(vol, out, NC, D, H, W, static_cast<float>(eps), stream);
}

std::string gradient_magnitude_backward(bool is_double, uintptr_t grad_out, uintptr_t vol, uintptr_t out,
                                        uintptr_t grad_vol, int64_t NC, int64_t D, int64_t H, int64_t W,
                                        uintptr_t stream) {
  return is_double ? launch_backward<double>(grad_out, vol, out, grad_vol, NC, D, H, W, stream)
                   : launch_backward<float>(grad_out, vol, out, grad_vol, NC, D, H, W, stream);
}

}  // namespace cuda
}  // namespace gradreg
