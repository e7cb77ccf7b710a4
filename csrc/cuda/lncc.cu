// lncc_loss on the GPU, with the per-voxel math of gradreg/lncc.h.
//
// The window sums are three separable passes (x, y, z) between two workspace buffers of five
// channels per item: the products (or, in the backward, the scaled coefficients) are formed into
// the first, and each pass reads one buffer and writes the other. The buffers are scratch of one
// call (lncc_workspace_bytes), not kept for the backward: what the backward needs is the per-voxel
// coefficients the forward writes (3, or 5 with the fixed image's gradient). The loss sum is a
// two-stage reduction in double with a grid fixed by the size alone, each stage in a fixed order:
// the same bits on every run.
#include <stdexcept>

#include "gradreg/lncc.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

constexpr int kMaxChannels = 5;

struct LnccShape {
  int64_t N, D, H, W;
  GR_HD int64_t DHW() const { return D * H * W; }
};

template <typename T>
struct LnccWorkspace {
  T* a;
  T* b;
  double* partials;
  uint64_t bytes;
};

template <typename T>
LnccWorkspace<T> carve(uintptr_t base, const LnccShape& s) {
  WorkspaceCarver carver(base);
  LnccWorkspace<T> ws;
  const uint64_t channels = static_cast<uint64_t>(kMaxChannels * s.N * s.DHW());
  ws.a = carver.take<T>(channels);
  ws.b = carver.take<T>(channels);
  ws.partials = carver.take<double>(static_cast<uint64_t>(sum_blocks(s.N * s.DHW())));
  ws.bytes = carver.bytes();
  return ws;
}

// buffer[(n * 5 + c) * DHW + p] = the c-th product (LnccSum order) of voxel p of item n.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    lncc_products_kernel(const T* __restrict__ warped, const T* __restrict__ fixed, int64_t fixed_batch_stride,
                         T* __restrict__ out, LnccShape s) {
  const int64_t DHW = s.DHW(), total = s.N * DHW;
  for (int64_t idx = first_index(); idx < total; idx += index_stride()) {
    const int64_t n = idx / DHW, p = idx % DHW;
    const T i = fixed[n * fixed_batch_stride + p], j = warped[idx];
    T* o = out + n * 5 * DHW + p;
    o[kSumI * DHW] = i;
    o[kSumJ * DHW] = j;
    o[kSumII * DHW] = i * i;
    o[kSumJJ * DHW] = j * j;
    o[kSumIJ * DHW] = i * j;
  }
}

// out = in summed over [-r, r] along one axis (0: z, 1: y, 2: x), zeros outside; `volumes` of D x H x W.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    box_axis_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t volumes, LnccShape s, int axis, int r) {
  const int64_t DHW = s.DHW(), total = volumes * DHW;
  const int64_t size = axis == 0 ? s.D : (axis == 1 ? s.H : s.W);
  const int64_t stride = axis == 0 ? s.H * s.W : (axis == 1 ? s.W : 1);
  for (int64_t idx = first_index(); idx < total; idx += index_stride()) {
    const int64_t p = idx % DHW;
    const int64_t coord = axis == 0 ? p / (s.H * s.W) : (axis == 1 ? (p / s.W) % s.H : p % s.W);
    const int64_t lo = max64(0, coord - r), hi = min64(size - 1, coord + r);
    const T* base = in + idx - coord * stride;
    T sum = T(0);
    for (int64_t k = lo; k <= hi; ++k) sum += base[k * stride];
    out[idx] = sum;
  }
}

template <typename T>
void box_sum(T* a, T* b, int64_t volumes, const LnccShape& s, int r, cudaStream_t stream) {
  const unsigned blocks = grid_blocks(volumes * s.DHW(), kBlockThreads);
  launch_kernel(box_axis_kernel<T>, blocks, dim3(kBlockThreads), stream, static_cast<const T*>(a), b, volumes, s, 2,
                r);
  launch_kernel(box_axis_kernel<T>, blocks, dim3(kBlockThreads), stream, static_cast<const T*>(b), a, volumes, s, 1,
                r);
  launch_kernel(box_axis_kernel<T>, blocks, dim3(kBlockThreads), stream, static_cast<const T*>(a), b, volumes, s, 0,
                r);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    lncc_finish_kernel(const T* __restrict__ sums, LnccShape s, LnccParams<T> params, T* __restrict__ loss_map,
                       T* __restrict__ coefficients, int count, double* __restrict__ partials) {
  __shared__ double scratch[kBlockThreads];
  const int64_t DHW = s.DHW(), total = s.N * DHW;
  double acc = 0.0;
  for (int64_t idx = first_index(); idx < total; idx += index_stride()) {
    const int64_t n = idx / DHW, p = idx % DHW;
    T local[5];
    for (int c = 0; c < 5; ++c) local[c] = sums[(n * 5 + c) * DHW + p];
    T* coef = coefficients ? coefficients + n * count * DHW + p : nullptr;
    const T value = lncc_value_and_coefficients(local, params, coef, DHW, count);
    if (loss_map) loss_map[idx] = value;
    acc += double(value);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[(n * count + k) * DHW + p] = coefficient k times the upstream gradient at (n, p).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    lncc_scale_kernel(const T* __restrict__ coefficients, int count, const T* __restrict__ grad, bool grad_is_map,
                      T* __restrict__ out, LnccShape s) {
  const int64_t DHW = s.DHW(), total = s.N * count * DHW;
  for (int64_t idx = first_index(); idx < total; idx += index_stride()) {
    const int64_t n = idx / (count * DHW), p = idx % DHW;
    out[idx] = coefficients[idx] * (grad_is_map ? grad[n * DHW + p] : grad[0]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    lncc_combine_kernel(const T* __restrict__ box, int count, const T* __restrict__ warped,
                        const T* __restrict__ fixed, int64_t fixed_batch_stride, T* __restrict__ grad_warped,
                        T* __restrict__ grad_fixed, LnccShape s) {
  const int64_t DHW = s.DHW(), total = s.N * DHW;
  for (int64_t idx = first_index(); idx < total; idx += index_stride()) {
    const int64_t n = idx / DHW, p = idx % DHW;
    const T* b = box + n * count * DHW + p;
    const T i = fixed[n * fixed_batch_stride + p], j = warped[idx];
    if (grad_warped) grad_warped[idx] = lncc_image_grad(b[kCoefJ * DHW], b[kCoefJJ * DHW], b[kCoefIJ * DHW], j, i);
    if (grad_fixed) grad_fixed[idx] = lncc_image_grad(b[kCoefI * DHW], b[kCoefII * DHW], b[kCoefIJ * DHW], i, j);
  }
}

std::string check_args(const char* what, const LnccShape& s, int window) {
  int64_t numel;
  if (s.N < 1 || s.D < 1 || s.H < 1 || s.W < 1 || !checked_product({s.N, kMaxChannels, s.D, s.H, s.W}, &numel))
    return std::string(what) + ": sizes must be >= 1 and their product must fit in int64";
  if (window < 1 || window % 2 == 0) return std::string(what) + ": `window` must be odd and >= 1";
  return "";
}

template <typename T>
std::string check_workspace(const char* what, uintptr_t workspace, int64_t workspace_bytes, const LnccShape& s,
                            LnccWorkspace<T>* ws) {
  if (!workspace) return std::string(what) + ": `workspace` must be a device pointer, got 0";
  *ws = carve<T>(workspace, s);
  if (workspace_bytes < 0 || static_cast<uint64_t>(workspace_bytes) < ws->bytes)
    return std::string(what) + ": the workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
           std::to_string(ws->bytes) + " (lncc_workspace_bytes)";
  return "";
}

template <typename T>
std::string forward(uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride, uintptr_t loss_map,
                    uintptr_t coefficients, int count, uintptr_t total, const LnccShape& s, int window, double eps,
                    double smooth_nr, bool monai, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream_handle) {
  std::string err = check_args("lncc_forward", s, window);
  if (!err.empty()) return err;
  if (!warped || !fixed || !total) return "lncc_forward: `warped`, `fixed` and `total` must be device pointers, got 0";
  if (!(count == 0 || count == 3 || count == 5)) return "lncc_forward: `coefficient_count` must be 0, 3 or 5";
  if (count && !coefficients) return "lncc_forward: `coefficients` must be a device pointer when coefficient_count > 0";
  LnccWorkspace<T> ws;
  err = check_workspace<T>("lncc_forward", workspace, workspace_bytes, s, &ws);
  if (!err.empty()) return err;
  const cudaStream_t stream = as_stream(stream_handle);
  const int64_t voxels = s.N * s.DHW();
  launch_kernel(lncc_products_kernel<T>, grid_blocks(voxels, kBlockThreads), dim3(kBlockThreads), stream,
                reinterpret_cast<const T*>(warped), reinterpret_cast<const T*>(fixed), fixed_batch_stride, ws.a, s);
  box_sum(ws.a, ws.b, 5 * s.N, s, window / 2, stream);
  err = launch_error("lncc_forward (window sums)");
  if (!err.empty()) return err;
  const LnccParams<T> params{T(int64_t(window) * window * window), T(eps), T(smooth_nr), monai};
  const int64_t blocks = sum_blocks(voxels);
  launch_kernel(lncc_finish_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads), stream,
                static_cast<const T*>(ws.b), s, params, reinterpret_cast<T*>(loss_map),
                count ? reinterpret_cast<T*>(coefficients) : static_cast<T*>(nullptr), count, ws.partials);
  err = launch_error("lncc_forward (per voxel)");
  if (!err.empty()) return err;
  launch_kernel(sum_partials_kernel<T>, dim3(1), dim3(kBlockThreads), stream, static_cast<const double*>(ws.partials),
                blocks, reinterpret_cast<T*>(total));
  return launch_error("lncc_forward (total)");
}

template <typename T>
std::string backward(uintptr_t coefficients, int count, uintptr_t grad, bool grad_is_map, uintptr_t warped,
                     uintptr_t fixed, int64_t fixed_batch_stride, uintptr_t grad_warped, uintptr_t grad_fixed,
                     const LnccShape& s, int window, uintptr_t workspace, int64_t workspace_bytes,
                     uintptr_t stream_handle) {
  std::string err = check_args("lncc_backward", s, window);
  if (!err.empty()) return err;
  if (!coefficients || !grad || !warped || !fixed)
    return "lncc_backward: `coefficients`, `grad`, `warped` and `fixed` must be device pointers, got 0";
  if (!(count == 3 || count == 5)) return "lncc_backward: `coefficient_count` must be 3 or 5";
  if (grad_fixed && count != 5) return "lncc_backward: `grad_fixed` needs the 5 coefficients";
  if (!grad_warped && !grad_fixed) return "";
  LnccWorkspace<T> ws;
  err = check_workspace<T>("lncc_backward", workspace, workspace_bytes, s, &ws);
  if (!err.empty()) return err;
  const cudaStream_t stream = as_stream(stream_handle);
  launch_kernel(lncc_scale_kernel<T>, grid_blocks(count * s.N * s.DHW(), kBlockThreads), dim3(kBlockThreads), stream,
                reinterpret_cast<const T*>(coefficients), count, reinterpret_cast<const T*>(grad), grad_is_map, ws.a,
                s);
  box_sum(ws.a, ws.b, count * s.N, s, window / 2, stream);
  err = launch_error("lncc_backward (window sums)");
  if (!err.empty()) return err;
  launch_kernel(lncc_combine_kernel<T>, grid_blocks(s.N * s.DHW(), kBlockThreads), dim3(kBlockThreads), stream,
                static_cast<const T*>(ws.b), count, reinterpret_cast<const T*>(warped),
                reinterpret_cast<const T*>(fixed), fixed_batch_stride, reinterpret_cast<T*>(grad_warped),
                reinterpret_cast<T*>(grad_fixed), s);
  return launch_error("lncc_backward (gradients)");
}

}  // namespace

std::string lncc_forward(bool is_double, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride,
                         uintptr_t loss_map, uintptr_t coefficients, int coefficient_count, uintptr_t total, int64_t N,
                         int64_t D, int64_t H, int64_t W, int window, double eps, double smooth_nr, bool monai,
                         uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  const LnccShape s{N, D, H, W};
  return is_double ? forward<double>(warped, fixed, fixed_batch_stride, loss_map, coefficients, coefficient_count,
                                     total, s, window, eps, smooth_nr, monai, workspace, workspace_bytes, stream)
                   : forward<float>(warped, fixed, fixed_batch_stride, loss_map, coefficients, coefficient_count,
                                    total, s, window, eps, smooth_nr, monai, workspace, workspace_bytes, stream);
}

std::string lncc_backward(bool is_double, uintptr_t coefficients, int coefficient_count, uintptr_t grad,
                          bool grad_is_map, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride,
                          uintptr_t grad_warped, uintptr_t grad_fixed, int64_t N, int64_t D, int64_t H, int64_t W,
                          int window, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  const LnccShape s{N, D, H, W};
  return is_double ? backward<double>(coefficients, coefficient_count, grad, grad_is_map, warped, fixed,
                                      fixed_batch_stride, grad_warped, grad_fixed, s, window, workspace,
                                      workspace_bytes, stream)
                   : backward<float>(coefficients, coefficient_count, grad, grad_is_map, warped, fixed,
                                     fixed_batch_stride, grad_warped, grad_fixed, s, window, workspace,
                                     workspace_bytes, stream);
}

int64_t lncc_workspace_bytes(bool is_double, int64_t N, int64_t D, int64_t H, int64_t W, bool backward) {
  (void)backward;  // both passes use two five-channel buffers
  const LnccShape s{N, D, H, W};
  const std::string err = check_args("lncc_workspace_bytes", s, 1);
  if (!err.empty()) throw std::invalid_argument(err);
  return static_cast<int64_t>(is_double ? carve<double>(0, s).bytes : carve<float>(0, s).bytes);
}

}  // namespace cuda
}  // namespace gradreg
