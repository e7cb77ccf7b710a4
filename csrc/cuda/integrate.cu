// integrate_velocity on the GPU, with the per-voxel math of gradreg/integrate.h (whose sampling is
// gradreg/warp.h's). The host loops over the steps as the CPU core does, with the same checkpoints:
// the forward keeps u_k for k = interval, 2 interval, ... < steps when asked, and the backward
// recomputes every other step's input from the nearest stored field below it. Each backward step
// accumulates into a zeroed buffer with atomics (the scatter part), so its last bits may vary from
// run to run.
#include "gradreg/integrate.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    scale_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t numel, T scale) {
  for (int64_t i = first_index(); i < numel; i += index_stride()) out[i] = in[i] * scale;
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    squaring_step_kernel(const T* __restrict__ u, T* __restrict__ next, int64_t N, FieldGeometry g, Padding padding) {
  const int64_t DHW = g.D * g.H * g.W, rows = N * g.D * g.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % g.H, z = (row / g.H) % g.D, n = row / (g.D * g.H);
    for (int64_t x = threadIdx.x; x < g.W; x += blockDim.x)
      squaring_step_voxel(u + n * 3 * DHW, next + n * 3 * DHW, z, y, x, g, padding);
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    squaring_grad_kernel(const T* __restrict__ u, const T* __restrict__ G, T* __restrict__ dst, int64_t N,
                         FieldGeometry g, Padding padding) {
  const int64_t DHW = g.D * g.H * g.W, rows = N * g.D * g.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % g.H, z = (row / g.H) % g.D, n = row / (g.D * g.H);
    for (int64_t x = threadIdx.x; x < g.W; x += blockDim.x) {
      const SquaringGradTerms<T> t = squaring_step_grad_terms(u + n * 3 * DHW, G + n * 3 * DHW, z, y, x, g, padding);
      const int64_t p = (z * g.H + y) * g.W + x;
      T* d = dst + n * 3 * DHW;
      for (int c = 0; c < 3; ++c) {
        T* dc = d + c * DHW;
        const T upstream = t.upstream[c];
        for_each_corner(t.az, t.ay, t.ax, g.H, g.W, [&](int64_t idx, T w, T, T, T) { atomicAdd(dc + idx, w * upstream); });
        atomicAdd(dc + p, t.direct[c]);
      }
    }
  }
}

struct Launch {
  int64_t N;
  FieldGeometry g;
  Padding padding;
  cudaStream_t stream;
  int64_t numel() const { return N * 3 * g.voxels(); }
};

template <typename T>
void scale(const Launch& l, const T* in, T* out, T factor) {
  launch_kernel(scale_kernel<T>, grid_blocks(l.numel(), kBlockThreads), dim3(kBlockThreads), l.stream, in, out,
                l.numel(), factor);
}

template <typename T>
void step(const Launch& l, const T* u, T* next) {
  launch_kernel(squaring_step_kernel<T>, row_grid(l.N * l.g.D * l.g.H), row_block(), l.stream, u, next, l.N, l.g,
                l.padding);
}

std::string check_args(const char* what, int64_t N, const FieldGeometry& g, int steps, int padding,
                       uintptr_t checkpoints, int interval) {
  int64_t numel;
  if (N < 1 || g.D < 1 || g.H < 1 || g.W < 1 || !checked_product({N, 3, g.D, g.H, g.W}, &numel))
    return std::string(what) + ": sizes must be >= 1 and their product must fit in int64";
  if (steps < 0 || steps > 30) return std::string(what) + ": `steps` must be in [0, 30]";
  if (padding != 0 && padding != 1) return std::string(what) + ": `padding` must be 0 (zeros) or 1 (border)";
  if (checkpoints && interval < 1) return std::string(what) + ": `interval` must be >= 1 with checkpoints";
  return "";
}

template <typename T>
std::string forward(uintptr_t velocity, uintptr_t out_ptr, uintptr_t scratch, uintptr_t checkpoints_ptr, int interval,
                    int64_t N, const FieldGeometry& g, int steps, int padding, uintptr_t stream) {
  std::string err = check_args("integrate_forward", N, g, steps, padding, checkpoints_ptr, interval);
  if (!err.empty()) return err;
  if (!velocity || !out_ptr || !scratch)
    return "integrate_forward: `velocity`, `out` and `scratch` must be device pointers, got 0";
  const Launch l{N, g, static_cast<Padding>(padding), as_stream(stream)};
  const T factor = T(1) / T(int64_t(1) << steps);
  T* out = reinterpret_cast<T*>(out_ptr);
  T* checkpoints = reinterpret_cast<T*>(checkpoints_ptr);
  const int count = checkpoints != nullptr ? (steps - 1) / interval : 0;
  T* scratch_field = reinterpret_cast<T*>(scratch);
  auto field = [&](int target) {
    return target == 0 ? out : (target == 1 ? scratch_field : checkpoints + (target - 2) * l.numel());
  };
  scale(l, reinterpret_cast<const T*>(velocity), field(forward_target(0, steps, interval, count)), factor);
  for (int k = 1; k <= steps; ++k)
    step(l, static_cast<const T*>(field(forward_target(k - 1, steps, interval, count))),
         field(forward_target(k, steps, interval, count)));
  return launch_error("integrate_forward");
}

template <typename T>
std::string backward(uintptr_t velocity_ptr, uintptr_t checkpoints_ptr, int interval, uintptr_t grad_out,
                     uintptr_t grad_velocity_ptr, uintptr_t scratch, int64_t N, const FieldGeometry& g, int steps,
                     int padding, uintptr_t stream) {
  std::string err = check_args("integrate_backward", N, g, steps, padding, checkpoints_ptr, interval);
  if (!err.empty()) return err;
  if (!velocity_ptr || !grad_out || !grad_velocity_ptr || !scratch)
    return "integrate_backward: `velocity`, `grad_out`, `grad_velocity` and `scratch` must be device pointers, got 0";
  const Launch l{N, g, static_cast<Padding>(padding), as_stream(stream)};
  const T factor = T(1) / T(int64_t(1) << steps);
  const T* velocity = reinterpret_cast<const T*>(velocity_ptr);
  const T* checkpoints = reinterpret_cast<const T*>(checkpoints_ptr);
  T* grad_velocity = reinterpret_cast<T*>(grad_velocity_ptr);
  T* field_a = reinterpret_cast<T*>(scratch);
  T* field_b = field_a + l.numel();
  T* grad_spare = field_b + l.numel();
  const T* G = reinterpret_cast<const T*>(grad_out);
  for (int k = steps - 1; k >= 0; --k) {
    const int nearest = checkpoints ? (k / interval) * interval : 0;
    const T* u;
    if (nearest == 0) {
      scale(l, velocity, field_a, factor);
      u = field_a;
    } else {
      u = checkpoints + (nearest / interval - 1) * l.numel();
    }
    for (int j = nearest; j < k; ++j) {
      T* dst = (u == field_a) ? field_b : field_a;
      step(l, u, dst);
      u = dst;
    }
    T* dst = (k % 2 == 0) ? grad_velocity : grad_spare;
    err = call_error("integrate_backward (clearing)",
                     cudaMemsetAsync(dst, 0, sizeof(T) * static_cast<size_t>(l.numel()), l.stream));
    if (!err.empty()) return err;
    launch_kernel(squaring_grad_kernel<T>, row_grid(l.N * g.D * g.H), row_block(), l.stream, u, G, dst, l.N, g,
                  l.padding);
    err = launch_error("integrate_backward");
    if (!err.empty()) return err;
    G = dst;
  }
  scale(l, G, grad_velocity, factor);
  return launch_error("integrate_backward");
}

}  // namespace

std::string integrate_forward(bool is_double, uintptr_t velocity, uintptr_t out, uintptr_t scratch,
                              uintptr_t checkpoints, int interval, int64_t N, int64_t D, int64_t H, int64_t W,
                              int steps, int padding, uintptr_t stream) {
  const FieldGeometry g{D, H, W};
  return is_double ? forward<double>(velocity, out, scratch, checkpoints, interval, N, g, steps, padding, stream)
                   : forward<float>(velocity, out, scratch, checkpoints, interval, N, g, steps, padding, stream);
}

std::string integrate_backward(bool is_double, uintptr_t velocity, uintptr_t checkpoints, int interval,
                               uintptr_t grad_out, uintptr_t grad_velocity, uintptr_t scratch, int64_t N, int64_t D,
                               int64_t H, int64_t W, int steps, int padding, uintptr_t stream) {
  const FieldGeometry g{D, H, W};
  return is_double ? backward<double>(velocity, checkpoints, interval, grad_out, grad_velocity, scratch, N, g, steps,
                                      padding, stream)
                   : backward<float>(velocity, checkpoints, interval, grad_out, grad_velocity, scratch, N, g, steps,
                                     padding, stream);
}

}  // namespace cuda
}  // namespace gradreg
