// The fused MIND loss's penalty sum, sum |a - b| or sum (a - b)^2, into one device scalar: a
// two-stage reduction in double with a grid fixed by numel alone, each stage in a fixed order,
// so the result is the same on every run (and on every device).
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    penalty_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t numel, bool squared,
                           double* __restrict__ partial_sums) {
  __shared__ double scratch[kBlockThreads];
  double sum = 0.0;
  for (int64_t i = first_index(); i < numel; i += index_stride()) {
    const T d = a[i] - b[i];  // in T, then widened: as the CPU core
    sum += squared ? double(d) * double(d) : (d < T(0) ? -double(d) : double(d));
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) partial_sums[blockIdx.x] = sum;
}

template <typename T>
std::string launch(uintptr_t a, uintptr_t b, int64_t numel, bool squared, uintptr_t out, uintptr_t workspace,
                   int64_t workspace_bytes, uintptr_t stream_handle) {
  if (numel < 1) return "penalty_sum: `numel` must be >= 1, got " + std::to_string(numel);
  if (!a || !b || !out || !workspace)
    return "penalty_sum: `a`, `b`, `out` and `workspace` must be device pointers, got 0";
  uint64_t needed;
  double* partials = carve_partials(workspace, numel, &needed);
  if (workspace_bytes < 0 || static_cast<uint64_t>(workspace_bytes) < needed)
    return "penalty_sum: the workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
           std::to_string(needed) + " (penalty_workspace_bytes)";
  const int64_t blocks = sum_blocks(numel);
  const cudaStream_t stream = as_stream(stream_handle);
  launch_kernel(penalty_partial_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads), stream,
                reinterpret_cast<const T*>(a), reinterpret_cast<const T*>(b), numel, squared, partials);
  std::string err = launch_error("penalty_sum (partial sums)");
  if (!err.empty()) return err;
  launch_kernel(sum_partials_kernel<T>, dim3(1), dim3(kBlockThreads), stream, static_cast<const double*>(partials),
                blocks, reinterpret_cast<T*>(out));
  return launch_error("penalty_sum (total)");
}

}  // namespace

std::string penalty_sum(bool is_double, uintptr_t a, uintptr_t b, int64_t numel, bool squared, uintptr_t out,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  return is_double ? launch<double>(a, b, numel, squared, out, workspace, workspace_bytes, stream)
                   : launch<float>(a, b, numel, squared, out, workspace, workspace_bytes, stream);
}

int64_t penalty_workspace_bytes(int64_t numel) {
  uint64_t bytes;
  carve_partials(0, numel < 1 ? 1 : numel, &bytes);
  return static_cast<int64_t>(bytes);
}

}  // namespace cuda
}  // namespace gradreg
