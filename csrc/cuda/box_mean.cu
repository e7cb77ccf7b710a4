// The 3x3x3 in-volume mean on the GPU (gradreg/box_mean.h): one launch per 1D stage (the axes longer than
// one voxel, D, H, W, `passes` times; reversed for the adjoint), ping-ponging between `out` and the caller's
// workspace so that the last stage lands in `out`. Each thread writes its own elements: no atomics.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "gradreg/box_mean.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

// Rows are (nc, z, y). Coordinate and stride along `axis` (0: D, 1: H, 2: W) select the 1D mean's neighbours.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    box_stage_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t D, int64_t H, int64_t W,
                     int axis, bool adjoint) {
  const int64_t n = axis == 0 ? D : (axis == 1 ? H : W);
  const int64_t s = axis == 0 ? H * W : (axis == 1 ? W : 1);
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % H, z = (row / H) % D;
    for (int64_t x = threadIdx.x; x < W; x += blockDim.x) {
      const int64_t i = row * W + x;
      const int64_t c = axis == 0 ? z : (axis == 1 ? y : x);
      out[i] = box_axis(in + i, c, n, s, adjoint);
    }
  }
}

// No axis longer than one voxel, or no pass: the mean is the volume itself.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    box_copy_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t W) {
  for (int64_t row = first_row(); row < rows; row += row_stride())
    for (int64_t x = threadIdx.x; x < W; x += blockDim.x) out[row * W + x] = in[row * W + x];
}

template <typename T>
std::string launch(uintptr_t in, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W, int passes, bool adjoint,
                   uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  int64_t total;
  if (NC < 1 || D < 1 || H < 1 || W < 1 || passes < 0 || !checked_product({NC, D, H, W}, &total))
    return "box_mean_forward: sizes must be >= 1 with a product that fits int64 and `passes` >= 0, got NC=" +
           std::to_string(NC) + " D=" + std::to_string(D) + " H=" + std::to_string(H) + " W=" + std::to_string(W) +
           " passes=" + std::to_string(passes);
  if (!in || !out) return "box_mean_forward: `in` and `out` must be device pointers, got 0";
  const std::vector<int> axes = box_stages(D, H, W, passes, adjoint);
  const int64_t stages = static_cast<int64_t>(axes.size());
  const int64_t rows = NC * D * H;
  if (stages == 0) {
    launch_kernel(box_copy_kernel<T>, row_grid(rows), row_block(), as_stream(stream), reinterpret_cast<const T*>(in),
                  reinterpret_cast<T*>(out), rows, W);
    return launch_error("box_mean_forward");
  }
  if (stages > 1 && (!workspace || workspace_bytes < total * int64_t(sizeof(T))))
    return "box_mean_forward: the workspace must hold " + std::to_string(total * int64_t(sizeof(T))) +
           " bytes, got " + std::to_string(workspace_bytes);
  T* scratch = reinterpret_cast<T*>(workspace);
  const T* source = reinterpret_cast<const T*>(in);
  for (int64_t k = 0; k < stages; ++k) {
    // Stage k writes `out` when an even number of stages follows it.
    T* target = (stages - 1 - k) % 2 == 0 ? reinterpret_cast<T*>(out) : scratch;
    launch_kernel(box_stage_kernel<T>, row_grid(rows), row_block(), as_stream(stream), source, target, rows, D, H, W,
                  axes[k], adjoint);
    std::string err = launch_error("box_mean_forward");
    if (!err.empty()) return err;
    source = target;
  }
  return "";
}

}  // namespace

int64_t box_mean_workspace_bytes(bool is_double, int64_t NC, int64_t D, int64_t H, int64_t W) {
  int64_t total;
  if (NC < 1 || D < 1 || H < 1 || W < 1 || !checked_product({NC, D, H, W, is_double ? 8 : 4}, &total))
    throw std::invalid_argument("box_mean_workspace_bytes: sizes must be >= 1 with a product that fits int64");
  return total;
}

std::string box_mean_forward(bool is_double, uintptr_t in, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W,
                             int passes, bool adjoint, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  return is_double ? launch<double>(in, out, NC, D, H, W, passes, adjoint, workspace, workspace_bytes, stream)
                   : launch<float>(in, out, NC, D, H, W, passes, adjoint, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace gradreg
