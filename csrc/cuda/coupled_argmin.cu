// coupled_argmin on the GPU (gradreg/coupled_argmin.h): one thread per point, looping over the K
// displacements with the best value and index in registers. Points are in (n, z, y, x) order, x fastest,
// so at every k neighbouring threads read neighbouring values of one cost plane (mirrored: of one
// shifted, clamped row), and the field and the index are read and written once per point.
#include <cmath>

#include "gradreg/coupled_argmin.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

struct Sizes {
  int64_t N, D, H, W, K;
  int radius;
};

// The displacements run as three nested loops with k counted alongside, in cost_volume_displacement's
// order (dx fastest): the same k -> d_k map, without its int64 divisions (subroutines on a GPU) in a loop
// whose other work is one load and a few flops per displacement. All three stay rolled: nvcc's unrolling
// of the dx loop took the mirrored kernels from 32-40 to 61-72 registers (sm_80/sm_90), and whether its
// extra loads in flight would pay for the lost occupancy is not measured.
template <typename T, bool kMirrored>
__global__ void __launch_bounds__(kBlockThreads)
    coupled_argmin_kernel(const T* __restrict__ cost, const T* __restrict__ field, T coupling,
                          int64_t* __restrict__ index, Sizes s, int64_t total) {
  const int64_t HW = s.H * s.W, DHW = s.D * HW;
  const int r = s.radius;
  for (int64_t i = first_index(); i < total; i += index_stride()) {
    const int64_t n = i / DHW, p = i - n * DHW;
    const int64_t zy = kMirrored ? p / s.W : 0, x = p - zy * s.W;  // (z, y) only where mirrored reads them
    const int64_t z = kMirrored ? zy / s.H : 0, y = zy - z * s.H;
    const T* u = field + n * 3 * DHW + p;
    const T uz = u[0], uy = u[DHW], ux = u[2 * DHW];
    const T* c = cost + n * s.K * DHW;
    T best = static_cast<T>(INFINITY), nearest = static_cast<T>(INFINITY);
    int64_t arg = 0;
    int64_t k = 0;
    GRADREG_NO_UNROLL
    for (int dz = -r; dz <= r; ++dz) {
      const int64_t row_z = kMirrored ? clamp_index(z + dz, s.D) * HW : 0;
      GRADREG_NO_UNROLL
      for (int dy = -r; dy <= r; ++dy) {
        const int64_t row = kMirrored ? row_z + clamp_index(y + dy, s.H) * s.W : 0;
        GRADREG_NO_UNROLL
        for (int dx = -r; dx <= r; ++dx, ++k) {
          const T value = kMirrored ? c[mirrored_channel(k, s.K) * DHW + row + clamp_index(x + dx, s.W)]
                                    : c[k * DHW + p];
          const T distance = coupled_distance(T(dz), T(dy), T(dx), uz, uy, ux);
          const T v = coupled_cost(value, coupling, distance);
          if (coupled_better(v, distance, best, nearest)) {
            best = v;
            nearest = distance;
            arg = k;
          }
        }
      }
    }
    index[i] = arg;
  }
}

template <typename T>
std::string launch_forward(uintptr_t cost, uintptr_t field, double coupling, uintptr_t index, int64_t N, int64_t D,
                           int64_t H, int64_t W, int radius, bool mirrored, uintptr_t stream) {
  const char* op = "coupled_argmin_forward";
  if (radius < 0 || radius > 32)
    return std::string(op) + ": `radius` must be in [0, 32], got " + std::to_string(radius);
  const int64_t side = 2 * int64_t(radius) + 1, K = side * side * side;
  int64_t costs, fields, points;
  // Every offset the kernel forms lies inside the cost volume or the field (K = 1 has fewer costs than
  // field values), so both sizes fitting int64 means no offset overflows.
  if (N < 1 || D < 1 || H < 1 || W < 1 || !checked_product({N, K, D, H, W}, &costs) ||
      !checked_product({N, 3, D, H, W}, &fields) || !checked_product({N, D, H, W}, &points))
    return std::string(op) + ": sizes must be >= 1 with a product that fits int64, got N=" + std::to_string(N) +
           " D=" + std::to_string(D) + " H=" + std::to_string(H) + " W=" + std::to_string(W) +
           " K=" + std::to_string(K);
  if (!std::isfinite(coupling) || coupling < 0)
    return std::string(op) + ": `coupling` must be finite and >= 0, got " + std::to_string(coupling);
  if (!cost || !field || !index)
    return std::string(op) + ": `cost`, `field` and `index` must be device pointers, got 0";
  const auto kernel = mirrored ? coupled_argmin_kernel<T, true> : coupled_argmin_kernel<T, false>;
  launch_kernel(kernel, dim3(grid_blocks(points, kBlockThreads)), dim3(kBlockThreads), as_stream(stream),
                reinterpret_cast<const T*>(cost), reinterpret_cast<const T*>(field), static_cast<T>(coupling),
                reinterpret_cast<int64_t*>(index), Sizes{N, D, H, W, K, radius}, points);
  return launch_error(op);
}

}  // namespace

std::string coupled_argmin_forward(bool is_double, uintptr_t cost, uintptr_t field, double coupling, uintptr_t index,
                                   int64_t N, int64_t D, int64_t H, int64_t W, int radius, bool mirrored,
                                   uintptr_t stream) {
  return is_double ? launch_forward<double>(cost, field, coupling, index, N, D, H, W, radius, mirrored, stream)
                   : launch_forward<float>(cost, field, coupling, index, N, D, H, W, radius, mirrored, stream);
}

}  // namespace cuda
}  // namespace gradreg
