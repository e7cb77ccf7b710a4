// The MIND cost volume on the GPU (gradreg/cost_volume.h): one thread per output element in the
// forward, and gather-based gradients (one thread per descriptor element, looping over the
// displacements) without atomics, so the backward is deterministic.
#include "gradreg/cost_volume.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

struct Sizes {
  int64_t N, C, D, H, W, K, Dq, Hq, Wq;
  int radius, spacing, grid;
};

__device__ __forceinline__ int64_t block_voxels(const Sizes& s, int64_t qz, int64_t qy, int64_t qx) {
  return (block_end(qz, s.grid, s.D) - block_begin(qz, s.grid)) *
         (block_end(qy, s.grid, s.H) - block_begin(qy, s.grid)) *
         (block_end(qx, s.grid, s.W) - block_begin(qx, s.grid));
}

// Output elements in (n, k, qz, qy, qx) order, qx fastest: with grid 1, neighbouring threads read
// neighbouring voxels of both descriptors.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    cost_volume_forward_kernel(const T* __restrict__ fixed, const T* __restrict__ moving, T* __restrict__ out,
                               Sizes s, int64_t total) {
  const int64_t HW = s.H * s.W, DHW = s.D * HW;
  for (int64_t i = first_index(); i < total; i += index_stride()) {
    const int64_t qx = i % s.Wq, qy = (i / s.Wq) % s.Hq, qz = (i / (s.Wq * s.Hq)) % s.Dq;
    const int64_t k = (i / (s.Wq * s.Hq * s.Dq)) % s.K, n = i / (s.Wq * s.Hq * s.Dq * s.K);
    const Displacement d = cost_volume_displacement(k, s.radius);
    const int64_t oz = s.spacing * d.z, oy = s.spacing * d.y, ox = s.spacing * d.x;
    T sum = T(0);
    for (int64_t z = block_begin(qz, s.grid), z1 = block_end(qz, s.grid, s.D); z < z1; ++z) {
      const int64_t zm = z + oz;
      for (int64_t y = block_begin(qy, s.grid), y1 = block_end(qy, s.grid, s.H); y < y1; ++y) {
        const int64_t ym = y + oy;
        const bool row_inside = zm >= 0 && zm < s.D && ym >= 0 && ym < s.H;
        for (int64_t x = block_begin(qx, s.grid), x1 = block_end(qx, s.grid, s.W); x < x1; ++x) {
          const int64_t xm = x + ox;
          const bool inside = row_inside && xm >= 0 && xm < s.W;
          const int64_t p = z * HW + y * s.W + x, pm = zm * HW + ym * s.W + xm;
          for (int64_t c = 0; c < s.C; ++c) {
            const int64_t channel = (n * s.C + c) * DHW;
            sum += cost_term(fixed[channel + p], inside ? moving[channel + pm] : T(0));
          }
        }
      }
    }
    out[i] = sum / T(block_voxels(s, qz, qy, qx));
  }
}

// grad_out[n, k, q] / |B(q)| for the control point q of voxel (z, y, x).
template <typename T>
__device__ __forceinline__ T upstream_weight(const T* __restrict__ grad_out, const Sizes& s, int64_t n, int64_t k,
                                             int64_t z, int64_t y, int64_t x) {
  const int64_t qz = z / s.grid, qy = y / s.grid, qx = x / s.grid;
  return grad_out[(((n * s.K + k) * s.Dq + qz) * s.Hq + qy) * s.Wq + qx] / T(block_voxels(s, qz, qy, qx));
}

// Elements in (n, c, z, y, x) order. Fixed voxel x gathers 2 w_k(x) (f(x) - m(x + s d_k)) over every
// k (m = 0 outside); moving voxel y gathers 2 w_k(y - s d_k) (m(y) - f(y - s d_k)) over the k whose
// source exists.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    cost_volume_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ fixed,
                                const T* __restrict__ moving, T* __restrict__ grad, Sizes s, int64_t total,
                                bool wrt_moving) {
  const int64_t HW = s.H * s.W, DHW = s.D * HW;
  for (int64_t i = first_index(); i < total; i += index_stride()) {
    const int64_t x = i % s.W, y = (i / s.W) % s.H, z = (i / HW) % s.D;
    const int64_t channel = i - (z * HW + y * s.W + x), n = i / (s.C * DHW);
    const T own = wrt_moving ? moving[i] : fixed[i];
    const T* other = wrt_moving ? fixed : moving;
    const int64_t sign = wrt_moving ? -1 : 1;  // the partner sits at x + s d_k (fixed) or y - s d_k (moving)
    T acc = T(0);
    GRADREG_NO_UNROLL
    for (int64_t k = 0; k < s.K; ++k) {
      const Displacement d = cost_volume_displacement(k, s.radius);
      const int64_t step = sign * s.spacing;
      const int64_t pz = z + step * d.z, py = y + step * d.y, px = x + step * d.x;
      const bool inside = pz >= 0 && pz < s.D && py >= 0 && py < s.H && px >= 0 && px < s.W;
      if (wrt_moving) {
        if (inside)
          acc += cost_term_grad(upstream_weight(grad_out, s, n, k, pz, py, px), own,
                                other[channel + (pz * HW + py * s.W + px)]);
      } else {
        acc += cost_term_grad(upstream_weight(grad_out, s, n, k, z, y, x), own,
                              inside ? other[channel + (pz * HW + py * s.W + px)] : T(0));
      }
    }
    grad[i] = acc;
  }
}

std::string check_arguments(const char* op, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius,
                            int spacing, int grid, Sizes* s, int64_t* inputs, int64_t* outputs) {
  if (radius < 0 || radius > 32)
    return std::string(op) + ": `radius` must be in [0, 32], got " + std::to_string(radius);
  if (spacing < 1) return std::string(op) + ": `spacing` must be >= 1, got " + std::to_string(spacing);
  if (grid < 1) return std::string(op) + ": `grid` must be >= 1, got " + std::to_string(grid);
  if (int64_t(spacing) * radius > 4096)
    return std::string(op) + ": `spacing` * `radius` must be at most 4096, got " + std::to_string(spacing) + " * " +
           std::to_string(radius);
  const int64_t side = 2 * int64_t(radius) + 1;
  *s = Sizes{N, C, D, H, W, side * side * side, 0, 0, 0, radius, spacing, grid};
  if (N < 1 || C < 1 || D < 1 || H < 1 || W < 1 || !checked_product({N, C, D, H, W}, inputs))
    return std::string(op) + ": sizes must be >= 1 with a product that fits int64, got N=" + std::to_string(N) +
           " C=" + std::to_string(C) + " D=" + std::to_string(D) + " H=" + std::to_string(H) +
           " W=" + std::to_string(W);
  s->Dq = ceil_div(D, grid);
  s->Hq = ceil_div(H, grid);
  s->Wq = ceil_div(W, grid);
  if (!checked_product({N, s->K, s->Dq, s->Hq, s->Wq}, outputs))
    return std::string(op) + ": the output size does not fit int64";
  return "";
}

template <typename T>
std::string launch_forward(uintptr_t fixed, uintptr_t moving, uintptr_t out, int64_t N, int64_t C, int64_t D,
                           int64_t H, int64_t W, int radius, int spacing, int grid, uintptr_t stream) {
  Sizes s;
  int64_t inputs, outputs;
  std::string err =
      check_arguments("cost_volume_forward", N, C, D, H, W, radius, spacing, grid, &s, &inputs, &outputs);
  if (!err.empty()) return err;
  if (!fixed || !moving || !out)
    return "cost_volume_forward: `fixed`, `moving` and `out` must be device pointers, got 0";
  launch_kernel(cost_volume_forward_kernel<T>, dim3(grid_blocks(outputs, kBlockThreads)), dim3(kBlockThreads),
                as_stream(stream), reinterpret_cast<const T*>(fixed), reinterpret_cast<const T*>(moving),
                reinterpret_cast<T*>(out), s, outputs);
  return launch_error("cost_volume_forward");
}

template <typename T>
std::string launch_backward(uintptr_t grad_out, uintptr_t fixed, uintptr_t moving, uintptr_t grad_fixed,
                            uintptr_t grad_moving, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius,
                            int spacing, int grid, uintptr_t stream) {
  Sizes s;
  int64_t inputs, outputs;
  std::string err =
      check_arguments("cost_volume_backward", N, C, D, H, W, radius, spacing, grid, &s, &inputs, &outputs);
  if (!err.empty()) return err;
  if (!grad_out || !fixed || !moving)
    return "cost_volume_backward: `grad_out`, `fixed` and `moving` must be device pointers, got 0";
  const uintptr_t targets[2] = {grad_fixed, grad_moving};
  for (int wrt_moving = 0; wrt_moving < 2; ++wrt_moving) {
    if (!targets[wrt_moving]) continue;  // not needed
    launch_kernel(cost_volume_backward_kernel<T>, dim3(grid_blocks(inputs, kBlockThreads)), dim3(kBlockThreads),
                  as_stream(stream), reinterpret_cast<const T*>(grad_out), reinterpret_cast<const T*>(fixed),
                  reinterpret_cast<const T*>(moving), reinterpret_cast<T*>(targets[wrt_moving]), s, inputs,
                  wrt_moving == 1);
  }
  return launch_error("cost_volume_backward");
}

}  // namespace

std::string cost_volume_forward(bool is_double, uintptr_t fixed, uintptr_t moving, uintptr_t out, int64_t N,
                                int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing, int grid,
                                uintptr_t stream) {
  return is_double ? launch_forward<double>(fixed, moving, out, N, C, D, H, W, radius, spacing, grid, stream)
                   : launch_forward<float>(fixed, moving, out, N, C, D, H, W, radius, spacing, grid, stream);
}

std::string cost_volume_backward(bool is_double, uintptr_t grad_out, uintptr_t fixed, uintptr_t moving,
                                 uintptr_t grad_fixed, uintptr_t grad_moving, int64_t N, int64_t C, int64_t D,
                                 int64_t H, int64_t W, int radius, int spacing, int grid, uintptr_t stream) {
  return is_double ? launch_backward<double>(grad_out, fixed, moving, grad_fixed, grad_moving, N, C, D, H, W, radius,
                                             spacing, grid, stream)
                   : launch_backward<float>(grad_out, fixed, moving, grad_fixed, grad_moving, N, C, D, H, W, radius,
                                            spacing, grid, stream);
}

}  // namespace cuda
}  // namespace gradreg
