#include <cuda_runtime.h>

#include "gradreg/gradient_magnitude.h"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

// One thread per voxel, x fastest so that warps read contiguous rows.
template <typename T>
__global__ void gradient_magnitude_forward_kernel(const T* __restrict__ vol, T* __restrict__ out, int64_t total,
                                                  int64_t D, int64_t H, int64_t W, T eps) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= total) return;
  const int64_t x = i % W, y = (i / W) % H, z = (i / (W * H)) % D;
  const int64_t HW = H * W;
  out[i] = grad_mag_forward(vol, i, step_back(z, HW), step_forward(z, D, HW), step_back(y, W),
                            step_forward(y, H, W), step_back(x, int64_t(1)), step_forward(x, W, int64_t(1)), eps);
}

template <typename T>
std::string launch_forward(uintptr_t vol, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W, T eps,
                           uintptr_t stream) {
  const int64_t total = NC * D * H * W;
  if (total == 0) return "";
  constexpr int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  gradient_magnitude_forward_kernel<T><<<static_cast<unsigned>(blocks), threads, 0,
                                         reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const T*>(vol), reinterpret_cast<T*>(out), total, D, H, W, eps);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

std::string gradient_magnitude_forward(bool is_double, uintptr_t vol, uintptr_t out, int64_t NC, int64_t D,
                                       int64_t H, int64_t W, double eps, uintptr_t stream) {
  return is_double ? launch_forward<double>(vol, out, NC, D, H, W, eps, stream)
                   : launch_forward<float>(vol, out, NC, D, H, W, static_cast<float>(eps), stream);
}

}  // namespace cuda
}  // namespace gradreg
