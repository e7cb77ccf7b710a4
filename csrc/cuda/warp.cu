// warp(image, flow) on the GPU, with the per-voxel math of gradreg/warp.h.
//
// The flow gradient is a gather (each output voxel differentiates its own sample). The image
// gradient is a scatter: each output voxel adds into the 8 corners it read. Two ways:
//
// * Default: atomicAdd into grad_image (zeroed first). Fast; the order in which additions land
//   varies, so the last bits of the result vary from run to run.
// * deterministic=True: bucket-then-gather, no atomics. Every source voxel is keyed by the cell
//   of its lowest corner (lo_z, lo_y, lo_x), or by an "empty" key when no corner is inside; a
//   stable radix sort (cub::DeviceRadixSort, stable by definition) orders the sources by key,
//   and a pass over the sorted keys records where each cell's run begins and ends. Then each
//   image voxel q gathers, for its 8 corner roles h in a fixed order, the sources of cell q - h
//   in sorted (= source index) order, recomputing each weight from the flow. The sort is the
//   only cross-thread step and its output is a pure function of its input, so the result is
//   bit-identical from run to run. Cost: one sort of N*D*H*W keys and the tables, in a
//   workspace of warp_workspace_bytes().
#include <climits>
#include <stdexcept>

#if !defined(GRADREG_CUDA_EMULATION)
#include <cub/device/device_radix_sort.cuh>
#endif

#include "gradreg/warp.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

struct WarpShape {
  int64_t N, C, D, H, W;
  int64_t DHW() const { return D * H * W; }
};

template <typename T, bool kNearest>
__global__ void __launch_bounds__(kBlockThreads)
    warp_forward_kernel(const T* __restrict__ image, const T* __restrict__ flow, T* __restrict__ out, WarpShape s,
                        Padding padding) {
  const int64_t DHW = s.D * s.H * s.W, rows = s.N * s.D * s.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % s.H, z = (row / s.H) % s.D, n = row / (s.D * s.H);
    const T* fz = flow + n * 3 * DHW;
    const T* fy = fz + DHW;
    const T* fx = fy + DHW;
    const T* img = image + n * s.C * DHW;
    T* o = out + n * s.C * DHW;
    for (int64_t x = threadIdx.x; x < s.W; x += blockDim.x) {
      const int64_t p = (z * s.H + y) * s.W + x;
      if (kNearest) {
        const int64_t iz = nearest_axis(T(z) + fz[p], s.D, padding);
        const int64_t iy = nearest_axis(T(y) + fy[p], s.H, padding);
        const int64_t ix = nearest_axis(T(x) + fx[p], s.W, padding);
        const bool inside = iz >= 0 && iy >= 0 && ix >= 0;
        const int64_t src = inside ? (iz * s.H + iy) * s.W + ix : 0;
        for (int64_t c = 0; c < s.C; ++c) o[c * DHW + p] = inside ? img[c * DHW + src] : T(0);
      } else {
        const LinearAxis<T> az = linear_axis(T(z) + fz[p], s.D, padding);
        const LinearAxis<T> ay = linear_axis(T(y) + fy[p], s.H, padding);
        const LinearAxis<T> ax = linear_axis(T(x) + fx[p], s.W, padding);
        for (int64_t c = 0; c < s.C; ++c) o[c * DHW + p] = trilinear_sample(img + c * DHW, az, ay, ax, s.H, s.W);
      }
    }
  }
}

// grad_flow (gathered) and, when grad_image is not null, the atomic scatter into grad_image.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    warp_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ image, const T* __restrict__ flow,
                         T* __restrict__ grad_image, T* __restrict__ grad_flow, WarpShape s, Padding padding) {
  const int64_t DHW = s.D * s.H * s.W, rows = s.N * s.D * s.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % s.H, z = (row / s.H) % s.D, n = row / (s.D * s.H);
    const T* f = flow + n * 3 * DHW;
    const T* img = image + n * s.C * DHW;
    const T* go = grad_out + n * s.C * DHW;
    for (int64_t x = threadIdx.x; x < s.W; x += blockDim.x) {
      const int64_t p = (z * s.H + y) * s.W + x;
      const LinearAxis<T> az = linear_axis(T(z) + f[p], s.D, padding);
      const LinearAxis<T> ay = linear_axis(T(y) + f[DHW + p], s.H, padding);
      const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW + p], s.W, padding);
      T gz = T(0), gy = T(0), gx = T(0);
      for (int64_t c = 0; c < s.C; ++c) {
        const T g = go[c * DHW + p];
        if (grad_flow) trilinear_coord_grad(img + c * DHW, g, az, ay, ax, s.H, s.W, gz, gy, gx);
        if (grad_image) {
          T* dst = grad_image + (n * s.C + c) * DHW;
          for_each_corner(az, ay, ax, s.H, s.W, [&](int64_t idx, T w, T, T, T) { atomicAdd(dst + idx, w * g); });
        }
      }
      if (grad_flow) {
        T* gf = grad_flow + n * 3 * DHW;
        gf[p] = gz;
        gf[DHW + p] = gy;
        gf[2 * DHW + p] = gx;
      }
    }
  }
}

// ---- deterministic image gradient: bucket by lowest-corner cell, stable sort, gather ----

// Cells are indexed in a grid of (D+1) x (H+1) x (W+1) per item: cell coordinate lo + 1, since
// a source whose lowest corner is at -1 still has its upper corner (index 0) inside.
struct CellGrid {
  int64_t D1, H1, W1;  // D + 1, H + 1, W + 1
  __device__ int64_t cell(int64_t n, int64_t lz, int64_t ly, int64_t lx) const {
    return ((n * D1 + lz + 1) * H1 + ly + 1) * W1 + lx + 1;
  }
};

// Index: uint32_t when every key (up to N * cells) fits, else uint64_t.
template <typename T, typename Index>
__global__ void __launch_bounds__(kBlockThreads)
    warp_bucket_keys_kernel(const T* __restrict__ flow, Index* __restrict__ keys, Index* __restrict__ sources,
                            WarpShape s, CellGrid grid, Index empty_key, Padding padding) {
  const int64_t DHW = s.D * s.H * s.W, rows = s.N * s.D * s.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % s.H, z = (row / s.H) % s.D, n = row / (s.D * s.H);
    const T* f = flow + n * 3 * DHW;
    for (int64_t x = threadIdx.x; x < s.W; x += blockDim.x) {
      const int64_t p = (z * s.H + y) * s.W + x;
      const LinearAxis<T> az = linear_axis(T(z) + f[p], s.D, padding);
      const LinearAxis<T> ay = linear_axis(T(y) + f[DHW + p], s.H, padding);
      const LinearAxis<T> ax = linear_axis(T(x) + f[2 * DHW + p], s.W, padding);
      // Some corner is inside iff, on every axis, lo or lo + 1 is; then lo is in [-1, n - 1].
      const bool touches = (az.lo_in || az.hi_in) && (ay.lo_in || ay.hi_in) && (ax.lo_in || ax.hi_in);
      keys[n * DHW + p] = touches ? static_cast<Index>(grid.cell(n, az.lo, ay.lo, ax.lo)) : empty_key;
      sources[n * DHW + p] = static_cast<Index>(n * DHW + p);
    }
  }
}

// begin[cell], end[cell]: the run of `cell` in the sorted keys (both pre-zeroed: empty runs).
template <typename Index>
__global__ void __launch_bounds__(kBlockThreads)
    warp_bucket_bounds_kernel(const Index* __restrict__ sorted_keys, Index* __restrict__ begin,
                              Index* __restrict__ end, int64_t count, Index empty_key) {
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const Index key = sorted_keys[i];
    if (key == empty_key) continue;
    if (i == 0 || sorted_keys[i - 1] != key) begin[key] = static_cast<Index>(i);
    if (i + 1 == count || sorted_keys[i + 1] != key) end[key] = static_cast<Index>(i + 1);
  }
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kBlockThreads)
    warp_gather_image_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ flow,
                                  const Index* __restrict__ sorted_sources, const Index* __restrict__ begin,
                                  const Index* __restrict__ end, T* __restrict__ grad_image, WarpShape s,
                                  CellGrid grid, Padding padding) {
  const int64_t DHW = s.D * s.H * s.W, rows = s.N * s.D * s.H;
  // Source coordinates are recovered in Index arithmetic (32-bit divisions when Index is 32-bit).
  const Index Wi = static_cast<Index>(s.W), Hi = static_cast<Index>(s.H), HWi = static_cast<Index>(s.H * s.W);
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % s.H, z = (row / s.H) % s.D, n = row / (s.D * s.H);
    const T* f = flow + n * 3 * DHW;
    const Index item_base = static_cast<Index>(n * DHW);
    for (int64_t x = threadIdx.x; x < s.W; x += blockDim.x) {
      const int64_t q = (z * s.H + y) * s.W + x;
      for (int64_t c = 0; c < s.C; ++c) {
        const T* go = grad_out + (n * s.C + c) * DHW;
        T acc = T(0);
        for (int corner = 0; corner < 8; ++corner) {
          const int hz = (corner >> 2) & 1, hy = (corner >> 1) & 1, hx = corner & 1;
          // Sources whose corner h is q have their lowest corner at q - h.
          const int64_t cell = grid.cell(n, z - hz, y - hy, x - hx);
          const Index stop = end[cell];
          for (Index i = begin[cell]; i < stop; ++i) {
            const Index p = sorted_sources[i] - item_base;
            const Index sx = p % Wi, sy = (p / Wi) % Hi, sz = p / HWi;
            const LinearAxis<T> az = linear_axis(T(sz) + f[p], s.D, padding);
            const LinearAxis<T> ay = linear_axis(T(sy) + f[DHW + p], s.H, padding);
            const LinearAxis<T> ax = linear_axis(T(sx) + f[2 * DHW + p], s.W, padding);
            const T wz = hz ? az.frac : T(1) - az.frac;
            const T wy = hy ? ay.frac : T(1) - ay.frac;
            const T wx = hx ? ax.frac : T(1) - ax.frac;
            acc += wz * wy * wx * go[p];
          }
        }
        grad_image[(n * s.C + c) * DHW + q] = acc;
      }
    }
  }
}

// The deterministic path's buffers, in workspace order.
template <typename Index>
struct BucketWorkspace {
  Index *keys, *sources, *sorted_keys, *sorted_sources, *begin, *end;
  void* sort_temp;
  size_t sort_temp_bytes;
  uint64_t total_bytes;
};

template <typename Index>
cudaError_t sort_buckets(void* temp, size_t& temp_bytes, const Index* keys, Index* sorted_keys,
                         const Index* sources, Index* sorted_sources, int64_t count, int end_bit,
                         cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, sorted_keys, sources, sorted_sources,
                                         static_cast<Index>(count), 0, end_bit, stream);
}

int bits_for(uint64_t value) {  // bits needed to represent value (>= 1)
  int bits = 0;
  while (bits < 64 && (value >> bits) != 0) ++bits;
  return bits < 1 ? 1 : bits;
}

// Sizes the buffers (base 0) or places them (real base); "" or an error.
template <typename Index>
std::string carve_buckets(uintptr_t base, int64_t count, int64_t cells, int end_bit, BucketWorkspace<Index>* ws) {
  size_t temp_bytes = 0;
  const cudaError_t err = sort_buckets<Index>(nullptr, temp_bytes, nullptr, nullptr, nullptr, nullptr, count, end_bit,
                                              nullptr);
  if (err != cudaSuccess) return call_error("warp: sizing the radix sort", err);
  WorkspaceCarver carver(base);
  ws->keys = carver.take<Index>(count);
  ws->sources = carver.take<Index>(count);
  ws->sorted_keys = carver.take<Index>(count);
  ws->sorted_sources = carver.take<Index>(count);
  ws->begin = carver.take<Index>(cells);
  ws->end = carver.take<Index>(cells);
  ws->sort_temp = carver.take<unsigned char>(temp_bytes);
  ws->sort_temp_bytes = temp_bytes;
  ws->total_bytes = carver.bytes();
  return "";
}

// Sizes of the deterministic path: items, total cells (= the empty key), key bits.
struct BucketSizes {
  int64_t count, cells;
  int end_bit;
  bool wide;  // keys need 64 bits
};

std::string bucket_sizes(const WarpShape& s, BucketSizes* out) {
  int64_t count, cells;
  if (!checked_product({s.N, s.D, s.H, s.W}, &count) || !checked_product({s.N, s.D + 1, s.H + 1, s.W + 1}, &cells))
    return "warp: sizes too large";
  out->count = count;
  out->cells = cells;
  out->end_bit = bits_for(static_cast<uint64_t>(cells));
  out->wide = static_cast<uint64_t>(cells) > UINT32_MAX;
  return "";
}

std::string check_shape(const char* op, const WarpShape& s) {
  int64_t total;
  if (s.N < 1 || s.C < 1 || s.D < 1 || s.H < 1 || s.W < 1 || !checked_product({s.N, s.C + 3, s.D, s.H, s.W}, &total))
    return std::string(op) + ": sizes must be >= 1 with a product that fits int64, got N=" + std::to_string(s.N) +
           " C=" + std::to_string(s.C) + " D=" + std::to_string(s.D) + " H=" + std::to_string(s.H) +
           " W=" + std::to_string(s.W);
  return "";
}

std::string check_padding(const char* op, int padding) {
  if (padding != static_cast<int>(Padding::Zeros) && padding != static_cast<int>(Padding::Border))
    return std::string(op) + ": `padding` must be 0 (zeros) or 1 (border), got " + std::to_string(padding);
  return "";
}

template <typename T, typename Index>
std::string deterministic_image_grad(const T* grad_out, const T* flow, T* grad_image, const WarpShape& s,
                                     const BucketSizes& sizes, Padding padding, uintptr_t workspace,
                                     int64_t workspace_bytes, cudaStream_t stream) {
  BucketWorkspace<Index> ws;
  std::string err = carve_buckets<Index>(workspace, sizes.count, sizes.cells, sizes.end_bit, &ws);
  if (!err.empty()) return err;
  if (static_cast<uint64_t>(workspace_bytes) < ws.total_bytes)
    return "warp_backward: the workspace has " + std::to_string(workspace_bytes) + " bytes, deterministic=True needs " +
           std::to_string(ws.total_bytes) + " (warp_workspace_bytes)";
  const Index empty_key = static_cast<Index>(sizes.cells);
  const CellGrid grid{s.D + 1, s.H + 1, s.W + 1};
  const int64_t rows = s.N * s.D * s.H;
  launch_kernel(warp_bucket_keys_kernel<T, Index>, row_grid(rows), row_block(), stream, flow, ws.keys, ws.sources, s,
                grid, empty_key, padding);
  err = launch_error("warp_backward (bucket keys)");
  if (!err.empty()) return err;
  size_t temp_bytes = ws.sort_temp_bytes;
  err = call_error("warp_backward (radix sort)",
                   sort_buckets<Index>(ws.sort_temp, temp_bytes, ws.keys, ws.sorted_keys, ws.sources,
                                       ws.sorted_sources, sizes.count, sizes.end_bit, stream));
  if (!err.empty()) return err;
  const size_t bounds_bytes = sizeof(Index) * static_cast<size_t>(sizes.cells);
  err = call_error("warp_backward (clearing bucket bounds)", cudaMemsetAsync(ws.begin, 0, bounds_bytes, stream));
  if (err.empty())
    err = call_error("warp_backward (clearing bucket bounds)", cudaMemsetAsync(ws.end, 0, bounds_bytes, stream));
  if (!err.empty()) return err;
  launch_kernel(warp_bucket_bounds_kernel<Index>, grid_blocks(sizes.count, kBlockThreads), dim3(kBlockThreads),
                stream, ws.sorted_keys, ws.begin, ws.end, sizes.count, empty_key);
  err = launch_error("warp_backward (bucket bounds)");
  if (!err.empty()) return err;
  launch_kernel(warp_gather_image_grad_kernel<T, Index>, row_grid(rows), row_block(), stream, grad_out, flow,
                ws.sorted_sources, ws.begin, ws.end, grad_image, s, grid, padding);
  return launch_error("warp_backward (image gradient gather)");
}

template <typename T>
std::string launch_forward(uintptr_t image, uintptr_t flow, uintptr_t out, const WarpShape& s, bool nearest,
                           int padding, uintptr_t stream) {
  std::string err = check_shape("warp_forward", s);
  if (err.empty()) err = check_padding("warp_forward", padding);
  if (!err.empty()) return err;
  if (!image || !flow || !out) return "warp_forward: `image`, `flow` and `out` must be device pointers, got 0";
  const unsigned blocks = row_grid(s.N * s.D * s.H);
  const Padding pad = static_cast<Padding>(padding);
  if (nearest)
    launch_kernel(warp_forward_kernel<T, true>, blocks, row_block(), as_stream(stream),
                  reinterpret_cast<const T*>(image), reinterpret_cast<const T*>(flow), reinterpret_cast<T*>(out), s,
                  pad);
  else
    launch_kernel(warp_forward_kernel<T, false>, blocks, row_block(), as_stream(stream),
                  reinterpret_cast<const T*>(image), reinterpret_cast<const T*>(flow), reinterpret_cast<T*>(out), s,
                  pad);
  return launch_error("warp_forward");
}

template <typename T>
std::string launch_backward(uintptr_t grad_out_ptr, uintptr_t image_ptr, uintptr_t flow_ptr, uintptr_t grad_image_ptr,
                            uintptr_t grad_flow_ptr, const WarpShape& s, int padding, bool deterministic,
                            uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream_handle) {
  std::string err = check_shape("warp_backward", s);
  if (err.empty()) err = check_padding("warp_backward", padding);
  if (!err.empty()) return err;
  if (!grad_out_ptr || !image_ptr || !flow_ptr)
    return "warp_backward: `grad_out`, `image` and `flow` must be device pointers, got 0";
  if (!grad_image_ptr && !grad_flow_ptr) return "";  // nothing asked for
  const T* grad_out = reinterpret_cast<const T*>(grad_out_ptr);
  const T* image = reinterpret_cast<const T*>(image_ptr);
  const T* flow = reinterpret_cast<const T*>(flow_ptr);
  T* grad_image = reinterpret_cast<T*>(grad_image_ptr);
  T* grad_flow = reinterpret_cast<T*>(grad_flow_ptr);
  const cudaStream_t stream = as_stream(stream_handle);
  const Padding pad = static_cast<Padding>(padding);
  const unsigned blocks = row_grid(s.N * s.D * s.H);

  if (grad_image && deterministic) {
    if (!workspace) return "warp_backward: deterministic=True needs a workspace (warp_workspace_bytes), got 0";
    BucketSizes sizes;
    err = bucket_sizes(s, &sizes);
    if (!err.empty()) return err;
    err = sizes.wide ? deterministic_image_grad<T, uint64_t>(grad_out, flow, grad_image, s, sizes, pad, workspace,
                                                               workspace_bytes, stream)
                     : deterministic_image_grad<T, uint32_t>(grad_out, flow, grad_image, s, sizes, pad, workspace,
                                                               workspace_bytes, stream);
    if (!err.empty()) return err;
    grad_image = nullptr;  // done; the kernel below only computes grad_flow
  } else if (grad_image) {
    err = call_error("warp_backward (clearing grad_image)",
                     cudaMemsetAsync(grad_image, 0, sizeof(T) * static_cast<size_t>(s.N * s.C * s.DHW()), stream));
    if (!err.empty()) return err;
  }
  if (grad_image || grad_flow) {
    launch_kernel(warp_backward_kernel<T>, blocks, row_block(), stream, grad_out, image, flow, grad_image, grad_flow, s,
                  pad);
    return launch_error("warp_backward");
  }
  return "";
}

}  // namespace

std::string warp_forward(bool is_double, uintptr_t image, uintptr_t flow, uintptr_t out, int64_t N, int64_t C,
                         int64_t D, int64_t H, int64_t W, bool nearest, int padding, uintptr_t stream) {
  const WarpShape s{N, C, D, H, W};
  return is_double ? launch_forward<double>(image, flow, out, s, nearest, padding, stream)
                   : launch_forward<float>(image, flow, out, s, nearest, padding, stream);
}

std::string warp_backward(bool is_double, uintptr_t grad_out, uintptr_t image, uintptr_t flow, uintptr_t grad_image,
                          uintptr_t grad_flow, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding,
                          bool deterministic, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  const WarpShape s{N, C, D, H, W};
  return is_double ? launch_backward<double>(grad_out, image, flow, grad_image, grad_flow, s, padding, deterministic,
                                             workspace, workspace_bytes, stream)
                   : launch_backward<float>(grad_out, image, flow, grad_image, grad_flow, s, padding, deterministic,
                                            workspace, workspace_bytes, stream);
}

int64_t warp_workspace_bytes(int64_t N, int64_t D, int64_t H, int64_t W, bool deterministic) {
  if (!deterministic) return 0;
  const WarpShape s{N, 1, D, H, W};
  std::string err = check_shape("warp_workspace_bytes", s);
  if (!err.empty()) throw std::invalid_argument(err);
  BucketSizes sizes;
  err = bucket_sizes(s, &sizes);
  if (!err.empty()) throw std::invalid_argument(err);
  uint64_t bytes = 0;
  if (sizes.wide) {
    BucketWorkspace<uint64_t> ws;
    err = carve_buckets<uint64_t>(0, sizes.count, sizes.cells, sizes.end_bit, &ws);
    if (err.empty()) bytes = ws.total_bytes;
  } else {
    BucketWorkspace<uint32_t> ws;
    err = carve_buckets<uint32_t>(0, sizes.count, sizes.cells, sizes.end_bit, &ws);
    if (err.empty()) bytes = ws.total_bytes;
  }
  if (!err.empty()) throw std::runtime_error(err);
  return static_cast<int64_t>(bytes);
}

}  // namespace cuda
}  // namespace gradreg
