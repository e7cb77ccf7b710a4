// warped_sq_diff(moving, fixed, flow, weight) on the GPU, with the per-voxel math of
// gradreg/warped_sq_diff.h: each thread samples its voxels' C channels once, writes their flow
// gradient (when asked) and adds their weighted squared differences in double. The block sums
// (block_sum, a fixed tree) go to one partial per block and a single block adds those: the grid
// is fixed by the voxel count alone, so the value is the same on every run.
#include "gradreg/warped_sq_diff.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {


struct SqDiffShape {
  int64_t N, C, D, H, W;
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    warped_sq_diff_kernel(const T* __restrict__ moving, const T* __restrict__ fixed, const T* __restrict__ flow,
                          const T* __restrict__ weight, T* __restrict__ grad_flow, SqDiffShape s, Padding padding,
                          double* __restrict__ partials) {
  __shared__ double scratch[kBlockThreads];
  const int64_t HW = s.H * s.W, DHW = s.D * HW, voxels = s.N * DHW;
  double acc = 0.0;
  for (int64_t idx = first_index(); idx < voxels; idx += index_stride()) {
    const int64_t n = idx / DHW, p = idx % DHW;
    const int64_t z = p / HW, y = (p / s.W) % s.H, x = p % s.W;
    const T* f = flow + n * 3 * DHW + p;
    T* gf = grad_flow ? grad_flow + n * 3 * DHW + p : nullptr;
    const T w = weight ? weight[idx] : T(1);
    if (!(w != T(0))) {  // weight 0: adds nothing, zero gradient (as the CPU core)
      if (gf) gf[0] = gf[DHW] = gf[2 * DHW] = T(0);
      continue;
    }
    const LinearAxis<T> az = linear_axis(T(z) + f[0], s.D, padding);
    const LinearAxis<T> ay = linear_axis(T(y) + f[DHW], s.H, padding);
    const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW], s.W, padding);
    const T voxel = warped_sq_diff_voxel(moving + n * s.C * DHW, fixed + n * s.C * DHW + p, s.C, DHW, az, ay, ax,
                                         s.H, s.W, w, gf, DHW);
    acc += double(w * voxel);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0 && threadIdx.y == 0) partials[blockIdx.x] = acc;
}

template <typename T>
std::string launch(uintptr_t moving, uintptr_t fixed, uintptr_t flow, uintptr_t weight, uintptr_t grad_flow,
                   uintptr_t total, const SqDiffShape& s, int padding, uintptr_t workspace, int64_t workspace_bytes,
                   uintptr_t stream_handle) {
  int64_t numel;
  if (s.N < 1 || s.C < 1 || s.D < 1 || s.H < 1 || s.W < 1 || !checked_product({s.N, s.C, s.D, s.H, s.W}, &numel) ||
      !checked_product({s.N, 3, s.D, s.H, s.W}, &numel))
    return "warped_sq_diff_forward: sizes must be >= 1 and their product must fit in int64";
  if (padding != 0 && padding != 1) return "warped_sq_diff_forward: `padding` must be 0 (zeros) or 1 (border)";
  if (!moving || !fixed || !flow || !total || !workspace)
    return "warped_sq_diff_forward: `moving`, `fixed`, `flow`, `total` and `workspace` must be device pointers, got 0";
  const int64_t voxels = s.N * s.D * s.H * s.W;
  uint64_t needed;
  double* partials = carve_partials(workspace, voxels, &needed);
  if (workspace_bytes < 0 || static_cast<uint64_t>(workspace_bytes) < needed)
    return "warped_sq_diff_forward: the workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
           std::to_string(needed) + " (warped_sq_diff_workspace_bytes)";
  const int64_t blocks = sum_blocks(voxels);
  const cudaStream_t stream = as_stream(stream_handle);
  launch_kernel(warped_sq_diff_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads), stream,
                reinterpret_cast<const T*>(moving), reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(flow),
                reinterpret_cast<const T*>(weight), reinterpret_cast<T*>(grad_flow), s, static_cast<Padding>(padding),
                partials);
  std::string err = launch_error("warped_sq_diff_forward (per voxel)");
  if (!err.empty()) return err;
  launch_kernel(sum_partials_kernel<T>, dim3(1), dim3(kBlockThreads), stream,
                static_cast<const double*>(partials), blocks, reinterpret_cast<T*>(total));
  return launch_error("warped_sq_diff_forward (total)");
}

}  // namespace

std::string warped_sq_diff_forward(bool is_double, uintptr_t moving, uintptr_t fixed, uintptr_t flow,
                                   uintptr_t weight, uintptr_t grad_flow, uintptr_t total, int64_t N, int64_t C,
                                   int64_t D, int64_t H, int64_t W, int padding, uintptr_t workspace,
                                   int64_t workspace_bytes, uintptr_t stream) {
  const SqDiffShape s{N, C, D, H, W};
  return is_double ? launch<double>(moving, fixed, flow, weight, grad_flow, total, s, padding, workspace,
                                    workspace_bytes, stream)
                   : launch<float>(moving, fixed, flow, weight, grad_flow, total, s, padding, workspace,
                                   workspace_bytes, stream);
}

int64_t warped_sq_diff_workspace_bytes(int64_t N, int64_t D, int64_t H, int64_t W) {
  uint64_t bytes;
  const int64_t voxels = N * D * H * W;
  carve_partials(0, voxels < 1 ? 1 : voxels, &bytes);
  return static_cast<int64_t>(bytes);
}

}  // namespace cuda
}  // namespace gradreg
