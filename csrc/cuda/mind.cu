// MIND / MIND-SSC descriptors on the GPU, with the per-voxel math of gradreg/mind.h.
//
// Forward, for K channels (pairs) of an (N, 1, D, H, W) volume:
//   1. box_xy: per (n, k, z) plane, tiles of 8 x 32 voxels compute the replicate-padded box sum
//      along x then y of the squared difference of pair k, in shared memory, and store it in
//      the workspace `box` (N, K, D, H, W). The halo is walked in tile-sized chunks, so shared
//      memory stays 4 KB whatever the radius.
//   2. center (pass 1): per voxel, the box sum along z (2r+1 cached loads per channel), then
//      descriptor_center; the variance is summed per block in double, in a fixed order, into
//      per-item partial sums.
//   3. mean: one block turns the partial sums into m per item (or m of the whole batch), on the
//      device: no host sync.
//   4. center (pass 2): recomputes step 2 (cheaper than storing and re-reading K centred
//      values), then descriptor_clamped_variance and descriptor_finish; writes out, the
//      clamped variance and the flag byte.
// Backward:
//   1. grad_box: per voxel, descriptor_backward_voxel (upstream = grad_out, or the fused loss's
//      penalty derivative with its scale read from device memory), stored in the workspace.
//   2. box_xy adjoint: the adjoint of the z box is applied while loading (2r+1 loads), then the
//      adjoint of the x and y boxes in shared memory, as in forward step 1; result: the gradient
//      w.r.t. each squared-difference map, in the workspace.
//   3. vol_grad: a gather. Voxel q collects, for each pair and each of its two samples, the
//      voxels u whose sample clamp(u + offset) is q (one voxel inside the volume, a small box
//      at the edges): no atomics, deterministic.
#include <limits>
#include <stdexcept>
#include <vector>

#include "gradreg/mind.h"
#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {
namespace {

constexpr int kTileX = kRowThreadsX;
constexpr int kTileY = kRowThreadsY;
// Blocks per batch item of the center passes: fixed by the sizes alone, so the partial sums,
// and m, do not depend on the device.
constexpr int64_t kMaxCenterBlocksPerItem = 1024;
// Register cap (at most 85 per thread: 3 blocks, 24 warps per SM) for the kernels that hold K
// values per thread; without it nvcc gave the adjoint box kernel 128 registers. Under it the
// spills are a few bytes at most (-Xptxas -warn-spills), which L1 absorbs.
constexpr int kMinBlocksPerSM = 3;

// The offset-pair table, passed by value as a kernel parameter: v holds 6 offsets per channel,
// tie_rank which of equal minima carries the gradient (gradreg/mind.h).
struct PairTable {
  int v[6 * kMaxDescriptorChannels];
  int tie_rank[kMaxDescriptorChannels];
};

struct Geometry {
  int64_t N, D, H, W;
  int K, radius, dilation;
  bool subtract_min;
  __host__ __device__ int64_t HW() const { return H * W; }
  __host__ __device__ int64_t DHW() const { return D * H * W; }
};

template <typename T>
__host__ __device__ T inverse_box_volume(int radius) {
  const double side = 2.0 * radius + 1.0;
  return T(1.0 / (side * side * side));
}

// #{t in [-r, r] : clamp(j + t, n) == q}: how many taps of the replicate-padded box centred at
// j read position q. The adjoint of the box: out[q] = sum_j box_multiplicity(j, q) * in[j].
__device__ __forceinline__ int64_t box_multiplicity(int64_t j, int64_t q, int64_t n, int64_t r) {
  const int64_t t_lo = q == 0 ? -r : max64(-r, q - j);
  const int64_t t_hi = q == n - 1 ? r : min64(r, q - j);
  return t_hi >= t_lo ? t_hi - t_lo + 1 : 0;
}

// One axis of the box, as "output o reads positions [lo, hi] with weights". Forward: positions
// o - r .. o + r, each read at clamp(position), weight 1. Adjoint: in-range positions only,
// weighted by box_multiplicity.
template <bool kAdjoint>
struct BoxWindow {
  __device__ static int64_t lo(int64_t o, int64_t r) { return kAdjoint ? max64(0, o - r) : o - r; }
  __device__ static int64_t hi(int64_t o, int64_t n, int64_t r) { return kAdjoint ? min64(n - 1, o + r) : o + r; }
  template <typename T>
  __device__ static T weighted(T value, int64_t j, int64_t o, int64_t n, int64_t r) {
    return kAdjoint ? T(box_multiplicity(j, o, n, r)) * value : value;
  }
};

// The (forward or adjoint) box along y and x of one plane, for the kTileY x kTileX outputs at
// (y0, x0); one thread per output. source(y, x) gives the plane's input at in-range (y, x).
// Rows of the y-halo and columns of the x-halo are visited in tile-sized chunks: chunk holds
// the inputs of one (row chunk, column chunk), rows the x-sums of one row chunk. Every thread
// of the block must call this (it synchronises); threads outside the plane compute but do not
// store.
template <typename T, bool kAdjoint, typename Source>
__device__ void box_xy_tile(const Source& source, T* __restrict__ dst_plane, int64_t y0, int64_t x0, int64_t H,
                            int64_t W, int64_t r, T (*chunk)[kTileX], T (*rows)[kTileX]) {
  using Window = BoxWindow<kAdjoint>;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t x = x0 + tx, y = y0 + ty;
  const int64_t x_lo = Window::lo(x, r), x_hi = Window::hi(x, W, r);
  const int64_t y_lo = Window::lo(y, r), y_hi = Window::hi(y, H, r);
  T total = T(0);
  for (int64_t row0 = y0 - r; row0 < y0 + kTileY + r; row0 += kTileY) {
    const int64_t source_y = clamp_index(row0 + ty, H);
    T row_sum = T(0);  // x-sum of row row0 + ty at column x
    for (int64_t col0 = x0 - r; col0 < x0 + kTileX + r; col0 += kTileX) {
      chunk[ty][tx] = source(source_y, clamp_index(col0 + tx, W));
      __syncthreads();
      const int64_t j_end = min64(x_hi, col0 + kTileX - 1);
      for (int64_t j = max64(x_lo, col0); j <= j_end; ++j)
        row_sum += Window::weighted(chunk[ty][j - col0], j, x, W, r);
      __syncthreads();
    }
    rows[ty][tx] = row_sum;
    __syncthreads();
    const int64_t j_end = min64(y_hi, row0 + kTileY - 1);
    for (int64_t j = max64(y_lo, row0); j <= j_end; ++j) total += Window::weighted(rows[j - row0][tx], j, y, H, r);
    __syncthreads();
  }
  if (y < H && x < W) dst_plane[y * W + x] = total;
}

// Tiles are (n, k, z, tile row, tile column), walked grid-stride by whole blocks.
struct PlaneTile {
  int64_t n, k, z, y0, x0;
};

__device__ __forceinline__ PlaneTile plane_tile(int64_t tile, const Geometry& g) {
  const int64_t tiles_x = (g.W + kTileX - 1) / kTileX, tiles_y = (g.H + kTileY - 1) / kTileY;
  PlaneTile t;
  t.x0 = (tile % tiles_x) * kTileX;
  t.y0 = ((tile / tiles_x) % tiles_y) * kTileY;
  const int64_t plane = tile / (tiles_x * tiles_y);
  t.z = plane % g.D;
  t.k = (plane / g.D) % g.K;
  t.n = plane / (g.D * g.K);
  return t;
}

__host__ __device__ int64_t plane_tiles(const Geometry& g) {
  return g.N * g.K * g.D * ((g.H + kTileY - 1) / kTileY) * ((g.W + kTileX - 1) / kTileX);
}

template <typename T>
struct SquaredDifferenceSource {
  const T* vol;  // the item's volume
  int64_t z, D, H, W;
  int pair[6];
  int dilation;
  __device__ T operator()(int64_t y, int64_t x) const {
    return descriptor_squared_difference(vol, z, y, x, D, H, W, pair, dilation);
  }
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    descriptor_box_xy_kernel(const T* __restrict__ vol, T* __restrict__ box, Geometry g, PairTable table) {
  __shared__ T chunk[kTileY][kTileX];
  __shared__ T rows[kTileY][kTileX];
  const int64_t tiles = plane_tiles(g);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const PlaneTile t = plane_tile(tile, g);
    SquaredDifferenceSource<T> source{vol + t.n * g.DHW(), t.z, g.D, g.H, g.W, {}, g.dilation};
    for (int i = 0; i < 6; ++i) source.pair[i] = table.v[6 * t.k + i];
    box_xy_tile<T, false>(source, box + ((t.n * g.K + t.k) * g.D + t.z) * g.HW(), t.y0, t.x0, g.H, g.W, g.radius,
                          chunk, rows);
  }
}

// The adjoint of the z box of one (n, k) channel at plane z, evaluated on load.
template <typename T>
struct AdjointZSource {
  const T* grad;  // the channel's gradient w.r.t. its box sums
  int64_t z, D, H, W, r;
  __device__ T operator()(int64_t y, int64_t x) const {
    T acc = T(0);
    const int64_t i_end = min64(D - 1, z + r);
    for (int64_t i = max64(0, z - r); i <= i_end; ++i)
      acc += T(box_multiplicity(i, z, D, r)) * grad[(i * H + y) * W + x];
    return acc;
  }
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    descriptor_box_xyz_adjoint_kernel(const T* __restrict__ grad_box, T* __restrict__ grad_squared, Geometry g) {
  __shared__ T chunk[kTileY][kTileX];
  __shared__ T rows[kTileY][kTileX];
  const int64_t tiles = plane_tiles(g);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const PlaneTile t = plane_tile(tile, g);
    const int64_t channel = (t.n * g.K + t.k) * g.DHW();
    const AdjointZSource<T> source{grad_box + channel, t.z, g.D, g.H, g.W, g.radius};
    box_xy_tile<T, true>(source, grad_squared + channel + t.z * g.HW(), t.y0, t.x0, g.H, g.W, g.radius, chunk, rows);
  }
}

// Blocks are (row block within the item, item): the partial sums are per item.
inline int64_t center_blocks_per_item(const Geometry& g) {
  const int64_t cap = kMaxCenterBlocksPerItem < kMaxBlocks ? kMaxCenterBlocksPerItem : kMaxBlocks;
  const int64_t blocks = (g.D * g.H + kRowThreadsY - 1) / kRowThreadsY;
  return blocks < cap ? blocks : cap;
}

inline unsigned item_grid_y(int64_t N) { return static_cast<unsigned>(N < 65535 ? N : 65535); }

// kStaticK > 0: K known at compile time (the loops unroll, values stay in registers); 0: g.K.
// kFinish false: pass 1 (partial sums of the variance); true: pass 2 (the descriptor).
template <typename T, int kStaticK, bool kFinish>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    descriptor_center_kernel(const T* __restrict__ box, T* __restrict__ out, T* __restrict__ variance,
                             uint8_t* __restrict__ flags, double* __restrict__ partial_sums,
                             const double* __restrict__ m_per_item, Geometry g, PairTable table) {
  __shared__ double scratch[kBlockThreads];
  const int K = kStaticK > 0 ? kStaticK : g.K;
  const int64_t HW = g.HW(), DHW = g.DHW(), item_rows = g.D * g.H, r = g.radius;
  const T inv_box = inverse_box_volume<T>(g.radius);
  const T tiny = std::numeric_limits<T>::min();
  constexpr int kLoop = kStaticK > 0 ? kStaticK : kMaxDescriptorChannels;
  for (int64_t n = blockIdx.y; n < g.N; n += gridDim.y) {
    double thread_sum = 0.0;
    const T m = kFinish ? T(m_per_item[n]) : T(0);
    for (int64_t row = first_row(); row < item_rows; row += row_stride()) {
      const int64_t y = row % g.H, z = row / g.H;
      const int64_t z_lo = z - r, z_hi = z + r;
      // Rolled loops over voxels and taps, unrolled over channels: K independent loads per tap
      // (unrolling more costs registers, hence occupancy, for no extra bandwidth).
      GRADREG_NO_UNROLL
      for (int64_t x = threadIdx.x; x < g.W; x += blockDim.x) {
        const int64_t p = (z * g.H + y) * g.W + x;
        const T* voxel_box = box + n * K * DHW + y * g.W + x;
        T values[kMaxDescriptorChannels];
        GR_UNROLL
        for (int k = 0; k < kLoop; ++k) values[k] = T(0);
        GRADREG_NO_UNROLL
        for (int64_t zz = z_lo; zz <= z_hi; ++zz) {  // the z box, in the CPU core's order
          const T* tap = voxel_box + clamp_index(zz, g.D) * HW;
          GR_UNROLL
          for (int k = 0; k < kLoop; ++k) {
            if (k >= K) break;
            values[k] += tap[k * DHW];
          }
        }
        uint8_t flag;
        const T v = descriptor_center(values, int64_t(1), K, inv_box, g.subtract_min, table.tie_rank, flag);
        if (kFinish) {
          const T vc = descriptor_clamped_variance(v, m, tiny, flag);
          descriptor_finish(values, int64_t(1), K, vc);
          GR_UNROLL
          for (int k = 0; k < kLoop; ++k) {
            if (k >= K) break;
            out[(n * K + k) * DHW + p] = values[k];
          }
          variance[n * DHW + p] = vc;
          flags[n * DHW + p] = flag;
        } else {
          thread_sum += static_cast<double>(v);
        }
      }
    }
    if (!kFinish) {
      const double block_total = block_sum(thread_sum, scratch);
      if (threadIdx.x == 0 && threadIdx.y == 0) partial_sums[n * gridDim.x + blockIdx.x] = block_total;
    }
  }
}

// One block: per-item sums of the partial sums, then m per item (per_item) or m of the batch.
__global__ void __launch_bounds__(kBlockThreads)
    descriptor_mean_kernel(const double* __restrict__ partial_sums, double* __restrict__ m_per_item, int64_t N,
                           int64_t blocks_per_item, int64_t DHW, bool per_item) {
  __shared__ double scratch[kBlockThreads];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  for (int64_t n = 0; n < N; ++n) {
    double s = 0.0;
    for (int64_t i = tid; i < blocks_per_item; i += kBlockThreads) s += partial_sums[n * blocks_per_item + i];
    s = block_sum(s, scratch);
    if (tid == 0) m_per_item[n] = s;
  }
  if (tid == 0) {
    double total = 0.0;
    for (int64_t n = 0; n < N; ++n) total += m_per_item[n];
    for (int64_t n = 0; n < N; ++n)
      m_per_item[n] = per_item ? m_per_item[n] / double(DHW) : total / double(N * DHW);
  }
}

// Presents one voxel's K channels, held in local arrays (channel stride 1), to the header's
// descriptor_backward_voxel, whose upstream functor still reads global memory: k -> p + k * cs.
// (Handing it the global arrays directly would make its several read-modify-write sweeps over
// grad_box global-memory traffic.)
template <typename Upstream>
struct ChannelUpstream {
  Upstream upstream;
  int64_t p, cs;
  template <typename T>
  __device__ T operator()(int64_t k, T o) const {
    return upstream(p + k * cs, o);
  }
};

// Backward step 1. kPenalty: upstream is the fused loss's penalty derivative against the target
// descriptor, scaled by the device scalar *scale; else upstream is the tensor grad_out.
template <typename T, int kStaticK, bool kPenalty>
__global__ void __launch_bounds__(kBlockThreads)
    descriptor_grad_box_kernel(const T* __restrict__ upstream /* grad_out, or the target descriptor */,
                               const T* __restrict__ scale, bool squared, const T* __restrict__ out,
                               const T* __restrict__ variance, const uint8_t* __restrict__ flags,
                               T* __restrict__ grad_box, Geometry g) {
  const int K = kStaticK > 0 ? kStaticK : g.K;
  const int64_t DHW = g.DHW(), rows = g.N * g.D * g.H;
  const T inv_box = inverse_box_volume<T>(g.radius);
  const T tiny = std::numeric_limits<T>::min();
  const T penalty_scale = kPenalty ? *scale : T(0);
  constexpr int kLoop = kStaticK > 0 ? kStaticK : kMaxDescriptorChannels;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % g.H, z = (row / g.H) % g.D, n = row / (g.D * g.H);
    const int64_t channels = n * K * DHW;
    for (int64_t x = threadIdx.x; x < g.W; x += blockDim.x) {
      const int64_t p = (z * g.H + y) * g.W + x;
      T values[kMaxDescriptorChannels], grads[kMaxDescriptorChannels];
      GR_UNROLL
      for (int k = 0; k < kLoop; ++k) {
        if (k >= K) break;
        values[k] = out[channels + p + k * DHW];
      }
      const T vc = variance[n * DHW + p];
      const uint8_t flag = flags[n * DHW + p];
      if constexpr (kPenalty) {
        const ChannelUpstream<UpstreamFromPenalty<T>> up{{upstream + channels, penalty_scale, squared}, p, DHW};
        descriptor_backward_voxel(values, int64_t(0), int64_t(1), K, vc, flag, tiny, inv_box, g.subtract_min, up,
                                  grads);
      } else {
        const ChannelUpstream<UpstreamFromTensor<T>> up{{upstream + channels}, p, DHW};
        descriptor_backward_voxel(values, int64_t(0), int64_t(1), K, vc, flag, tiny, inv_box, g.subtract_min, up,
                                  grads);
      }
      GR_UNROLL
      for (int k = 0; k < kLoop; ++k) {
        if (k >= K) break;
        grad_box[channels + p + k * DHW] = grads[k];
      }
    }
  }
}

// Voxels u with clamp(u + shift, n) == q along one axis: [lo, hi] (empty when lo > hi).
__device__ __forceinline__ void preimage(int64_t q, int64_t n, int64_t shift, int64_t& lo, int64_t& hi) {
  lo = q == 0 ? 0 : max64(0, q - shift);
  hi = q == n - 1 ? n - 1 : min64(n - 1, q - shift);
}

// sum over u with clamp(u + s) == q of (v[q] - v[clamp(u + other)]) * grad_squared[u]: the part of
// d(loss)/dv[q] from the samples of one pair that land on q (times 1/2).
template <typename T>
__device__ T pair_sample_gradient(const T* __restrict__ v, const T* __restrict__ grad_squared, T vq, int64_t z,
                                  int64_t y, int64_t x, const int64_t s[3], const int64_t other[3], int64_t D,
                                  int64_t H, int64_t W) {
  int64_t z_lo, z_hi, y_lo, y_hi, x_lo, x_hi;
  preimage(z, D, s[0], z_lo, z_hi);
  preimage(y, H, s[1], y_lo, y_hi);
  preimage(x, W, s[2], x_lo, x_hi);
  T acc = T(0);
  for (int64_t uz = z_lo; uz <= z_hi; ++uz) {
    const int64_t oz = clamp_index(uz + other[0], D);
    for (int64_t uy = y_lo; uy <= y_hi; ++uy) {
      const int64_t oy = clamp_index(uy + other[1], H);
      for (int64_t ux = x_lo; ux <= x_hi; ++ux) {
        const int64_t ox = clamp_index(ux + other[2], W);
        acc += (vq - v[(oz * H + oy) * W + ox]) * grad_squared[(uz * H + uy) * W + ux];
      }
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    descriptor_vol_grad_kernel(const T* __restrict__ vol, const T* __restrict__ grad_squared,
                               T* __restrict__ grad_vol, Geometry g, PairTable table) {
  const int64_t DHW = g.DHW(), rows = g.N * g.D * g.H;
  for (int64_t row = first_row(); row < rows; row += row_stride()) {
    const int64_t y = row % g.H, z = (row / g.H) % g.D, n = row / (g.D * g.H);
    const T* v = vol + n * DHW;
    for (int64_t x = threadIdx.x; x < g.W; x += blockDim.x) {
      const int64_t q = (z * g.H + y) * g.W + x;
      const T vq = v[q];
      T acc = T(0);
      for (int k = 0; k < g.K; ++k) {
        int64_t a[3], b[3];
        for (int i = 0; i < 3; ++i) {
          a[i] = static_cast<int64_t>(g.dilation) * table.v[6 * k + i];
          b[i] = static_cast<int64_t>(g.dilation) * table.v[6 * k + 3 + i];
        }
        const T* gs = grad_squared + (n * g.K + k) * DHW;
        // (v[ia] - v[ib])^2 differentiates to +2 (v[q] - v[ib]) where ia == q and to
        // +2 (v[q] - v[ia]) where ib == q.
        acc += pair_sample_gradient(v, gs, vq, z, y, x, a, b, g.D, g.H, g.W);
        acc += pair_sample_gradient(v, gs, vq, z, y, x, b, a, g.D, g.H, g.W);
      }
      grad_vol[n * DHW + q] = T(2) * acc;
    }
  }
}

// ---- host side ----

struct ForwardWorkspace {
  void* box;
  double* partial_sums;
  double* m_per_item;
  uint64_t bytes;
};

struct BackwardWorkspace {
  void* grad_box;
  void* grad_squared;
  uint64_t bytes;
};

ForwardWorkspace carve_forward(uintptr_t base, const Geometry& g, size_t item_bytes) {
  WorkspaceCarver carver(base);
  ForwardWorkspace ws;
  ws.box = carver.take<unsigned char>(static_cast<uint64_t>(g.N * g.K * g.DHW()) * item_bytes);
  ws.partial_sums = carver.take<double>(static_cast<uint64_t>(g.N * center_blocks_per_item(g)));
  ws.m_per_item = carver.take<double>(static_cast<uint64_t>(g.N));
  ws.bytes = carver.bytes();
  return ws;
}

BackwardWorkspace carve_backward(uintptr_t base, const Geometry& g, size_t item_bytes) {
  WorkspaceCarver carver(base);
  BackwardWorkspace ws;
  ws.grad_box = carver.take<unsigned char>(static_cast<uint64_t>(g.N * g.K * g.DHW()) * item_bytes);
  ws.grad_squared = carver.take<unsigned char>(static_cast<uint64_t>(g.N * g.K * g.DHW()) * item_bytes);
  ws.bytes = carver.bytes();
  return ws;
}

// Validates the sizes and the pair table; fills g and table.
std::string make_geometry(const char* op, int64_t N, int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs,
                          int radius, int dilation, bool subtract_min, Geometry* g, PairTable* table) {
  const std::string where(op);
  if (pairs.empty() || pairs.size() % 7 != 0 || pairs.size() > 7 * size_t(kMaxDescriptorChannels))
    return where + ": `pairs` must hold 7 ints per channel (6 offsets, a tie rank) for 1 to " +
           std::to_string(kMaxDescriptorChannels) + " channels, got " + std::to_string(pairs.size()) + " ints";
  const int K = static_cast<int>(pairs.size() / 7);
  if (radius < 0) return where + ": `radius` must be >= 0, got " + std::to_string(radius);
  if (dilation < 1) return where + ": `dilation` must be >= 1, got " + std::to_string(dilation);
  for (int i = 0; i < 6 * K; ++i)
    if (pairs[i] < -1 || pairs[i] > 1)
      return where + ": `pairs` offsets must be -1, 0 or 1, got " + std::to_string(pairs[i]);
  bool rank_seen[kMaxDescriptorChannels] = {};
  for (int k = 0; k < K; ++k) {
    const int rank = pairs[6 * K + k];
    if (rank < 0 || rank >= K || rank_seen[rank])
      return where + ": the tie ranks of `pairs` must be a permutation of 0.." + std::to_string(K - 1);
    rank_seen[rank] = true;
  }
  int64_t total;
  if (N < 1 || D < 1 || H < 1 || W < 1 || !checked_product({N, int64_t(K), D, H, W}, &total) ||
      !checked_product({total, int64_t(8)}, &total))
    return where + ": sizes must be >= 1 with a product that fits int64, got N=" + std::to_string(N) +
           " D=" + std::to_string(D) + " H=" + std::to_string(H) + " W=" + std::to_string(W);
  *g = Geometry{N, D, H, W, K, radius, dilation, subtract_min};
  for (int i = 0; i < 6 * kMaxDescriptorChannels; ++i) table->v[i] = i < 6 * K ? pairs[i] : 0;
  for (int k = 0; k < kMaxDescriptorChannels; ++k) table->tie_rank[k] = k < K ? pairs[6 * K + k] : k;
  return "";
}

std::string check_workspace(const char* op, uintptr_t workspace, int64_t workspace_bytes, uint64_t needed) {
  if (!workspace) return std::string(op) + ": `workspace` must be a device pointer, got 0";
  if (workspace_bytes < 0 || static_cast<uint64_t>(workspace_bytes) < needed)
    return std::string(op) + ": the workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
           std::to_string(needed) + " (descriptor_workspace_bytes)";
  return "";
}

unsigned tile_grid(const Geometry& g) { return grid_blocks(plane_tiles(g), 1); }

template <typename T, int kStaticK>
void launch_center(bool finish, const T* box, T* out, T* variance, uint8_t* flags, double* partial_sums,
                   const double* m_per_item, const Geometry& g, const PairTable& table, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(center_blocks_per_item(g)), item_grid_y(g.N));
  if (finish)
    launch_kernel(descriptor_center_kernel<T, kStaticK, true>, grid, row_block(), stream, box, out, variance, flags,
                  partial_sums, m_per_item, g, table);
  else
    launch_kernel(descriptor_center_kernel<T, kStaticK, false>, grid, row_block(), stream, box, out, variance, flags,
                  partial_sums, m_per_item, g, table);
}

template <typename T>
void launch_center_any_k(bool finish, const T* box, T* out, T* variance, uint8_t* flags, double* partial_sums,
                         const double* m_per_item, const Geometry& g, const PairTable& table, cudaStream_t stream) {
  if (g.K == 12)
    launch_center<T, 12>(finish, box, out, variance, flags, partial_sums, m_per_item, g, table, stream);
  else if (g.K == 6)
    launch_center<T, 6>(finish, box, out, variance, flags, partial_sums, m_per_item, g, table, stream);
  else
    launch_center<T, 0>(finish, box, out, variance, flags, partial_sums, m_per_item, g, table, stream);
}

template <typename T>
std::string forward(uintptr_t vol_ptr, uintptr_t out_ptr, uintptr_t variance_ptr, uintptr_t flags_ptr, int64_t N,
                    int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius, int dilation,
                    bool subtract_min, bool per_item, uintptr_t workspace, int64_t workspace_bytes,
                    uintptr_t stream_handle) {
  Geometry g;
  PairTable table;
  std::string err =
      make_geometry("descriptor_forward", N, D, H, W, pairs, radius, dilation, subtract_min, &g, &table);
  if (!err.empty()) return err;
  if (!vol_ptr || !out_ptr || !variance_ptr || !flags_ptr)
    return "descriptor_forward: `vol`, `out`, `variance` and `flags` must be device pointers, got 0";
  const ForwardWorkspace ws = carve_forward(workspace, g, sizeof(T));
  err = check_workspace("descriptor_forward", workspace, workspace_bytes, ws.bytes);
  if (!err.empty()) return err;
  const cudaStream_t stream = as_stream(stream_handle);
  const T* vol = reinterpret_cast<const T*>(vol_ptr);
  T* out = reinterpret_cast<T*>(out_ptr);
  T* variance = reinterpret_cast<T*>(variance_ptr);
  uint8_t* flags = reinterpret_cast<uint8_t*>(flags_ptr);
  T* box = static_cast<T*>(ws.box);

  launch_kernel(descriptor_box_xy_kernel<T>, tile_grid(g), row_block(), stream, vol, box, g, table);
  if (!(err = launch_error("descriptor_forward (box filter)")).empty()) return err;
  launch_center_any_k<T>(false, box, out, variance, flags, ws.partial_sums, ws.m_per_item, g, table, stream);
  if (!(err = launch_error("descriptor_forward (variance sums)")).empty()) return err;
  launch_kernel(descriptor_mean_kernel, dim3(1), dim3(kBlockThreads), stream, ws.partial_sums, ws.m_per_item, g.N,
                center_blocks_per_item(g), g.DHW(), per_item);
  if (!(err = launch_error("descriptor_forward (mean variance)")).empty()) return err;
  launch_center_any_k<T>(true, box, out, variance, flags, ws.partial_sums, ws.m_per_item, g, table, stream);
  return launch_error("descriptor_forward (descriptor)");
}

template <typename T, bool kPenalty>
void launch_grad_box(const T* upstream, const T* scale, bool squared, const T* out, const T* variance,
                     const uint8_t* flags, T* grad_box, const Geometry& g, cudaStream_t stream) {
  const unsigned blocks = row_grid(g.N * g.D * g.H);
  if (g.K == 12)
    launch_kernel(descriptor_grad_box_kernel<T, 12, kPenalty>, blocks, row_block(), stream, upstream, scale, squared,
                  out, variance, flags, grad_box, g);
  else if (g.K == 6)
    launch_kernel(descriptor_grad_box_kernel<T, 6, kPenalty>, blocks, row_block(), stream, upstream, scale, squared,
                  out, variance, flags, grad_box, g);
  else
    launch_kernel(descriptor_grad_box_kernel<T, 0, kPenalty>, blocks, row_block(), stream, upstream, scale, squared,
                  out, variance, flags, grad_box, g);
}

// Shared by descriptor_backward (kPenalty false: upstream = grad_out) and
// descriptor_loss_backward (kPenalty true: upstream = target, scaled by *scale).
template <typename T, bool kPenalty>
std::string backward(const char* op, uintptr_t upstream_ptr, uintptr_t scale_ptr, bool squared, uintptr_t out_ptr,
                     uintptr_t vol_ptr, uintptr_t variance_ptr, uintptr_t flags_ptr, uintptr_t grad_vol_ptr,
                     int64_t N, int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
                     int dilation, bool subtract_min, uintptr_t workspace, int64_t workspace_bytes,
                     uintptr_t stream_handle) {
  Geometry g;
  PairTable table;
  std::string err = make_geometry(op, N, D, H, W, pairs, radius, dilation, subtract_min, &g, &table);
  if (!err.empty()) return err;
  if (!upstream_ptr || !out_ptr || !vol_ptr || !variance_ptr || !flags_ptr || !grad_vol_ptr || (kPenalty && !scale_ptr))
    return std::string(op) + ": every tensor argument must be a device pointer, got 0";
  const BackwardWorkspace ws = carve_backward(workspace, g, sizeof(T));
  err = check_workspace(op, workspace, workspace_bytes, ws.bytes);
  if (!err.empty()) return err;
  const cudaStream_t stream = as_stream(stream_handle);
  T* grad_box = static_cast<T*>(ws.grad_box);
  T* grad_squared = static_cast<T*>(ws.grad_squared);

  launch_grad_box<T, kPenalty>(reinterpret_cast<const T*>(upstream_ptr), reinterpret_cast<const T*>(scale_ptr),
                               squared, reinterpret_cast<const T*>(out_ptr), reinterpret_cast<const T*>(variance_ptr),
                               reinterpret_cast<const uint8_t*>(flags_ptr), grad_box, g, stream);
  if (!(err = launch_error((std::string(op) + " (descriptor gradient)").c_str())).empty()) return err;
  launch_kernel(descriptor_box_xyz_adjoint_kernel<T>, tile_grid(g), row_block(), stream,
                static_cast<const T*>(grad_box), grad_squared, g);
  if (!(err = launch_error((std::string(op) + " (box filter adjoint)").c_str())).empty()) return err;
  launch_kernel(descriptor_vol_grad_kernel<T>, row_grid(g.N * g.D * g.H), row_block(), stream,
                reinterpret_cast<const T*>(vol_ptr), static_cast<const T*>(grad_squared),
                reinterpret_cast<T*>(grad_vol_ptr), g, table);
  return launch_error((std::string(op) + " (volume gradient)").c_str());
}

}  // namespace

std::string descriptor_forward(bool is_double, uintptr_t vol, uintptr_t out, uintptr_t variance, uintptr_t flags,
                               int64_t N, int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
                               int dilation, bool subtract_min, bool per_item, uintptr_t workspace,
                               int64_t workspace_bytes, uintptr_t stream) {
  return is_double ? forward<double>(vol, out, variance, flags, N, D, H, W, pairs, radius, dilation, subtract_min,
                                     per_item, workspace, workspace_bytes, stream)
                   : forward<float>(vol, out, variance, flags, N, D, H, W, pairs, radius, dilation, subtract_min,
                                    per_item, workspace, workspace_bytes, stream);
}

std::string descriptor_backward(bool is_double, uintptr_t grad_out, uintptr_t out, uintptr_t vol, uintptr_t variance,
                                uintptr_t flags, uintptr_t grad_vol, int64_t N, int64_t D, int64_t H, int64_t W,
                                const std::vector<int>& pairs, int radius, int dilation, bool subtract_min,
                                uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  const char* op = "descriptor_backward";
  return is_double ? backward<double, false>(op, grad_out, 0, false, out, vol, variance, flags, grad_vol, N, D, H, W,
                                             pairs, radius, dilation, subtract_min, workspace, workspace_bytes, stream)
                   : backward<float, false>(op, grad_out, 0, false, out, vol, variance, flags, grad_vol, N, D, H, W,
                                            pairs, radius, dilation, subtract_min, workspace, workspace_bytes, stream);
}

std::string descriptor_loss_backward(bool is_double, uintptr_t scale, bool squared, uintptr_t target, uintptr_t out,
                                     uintptr_t vol, uintptr_t variance, uintptr_t flags, uintptr_t grad_vol, int64_t N,
                                     int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
                                     int dilation, bool subtract_min, uintptr_t workspace, int64_t workspace_bytes,
                                     uintptr_t stream) {
  const char* op = "descriptor_loss_backward";
  return is_double ? backward<double, true>(op, target, scale, squared, out, vol, variance, flags, grad_vol, N, D, H,
                                            W, pairs, radius, dilation, subtract_min, workspace, workspace_bytes,
                                            stream)
                   : backward<float, true>(op, target, scale, squared, out, vol, variance, flags, grad_vol, N, D, H, W,
                                           pairs, radius, dilation, subtract_min, workspace, workspace_bytes, stream);
}

int64_t descriptor_workspace_bytes(bool is_double, int64_t N, int64_t D, int64_t H, int64_t W, int64_t K,
                                   bool backward) {
  int64_t total;
  if (N < 1 || D < 1 || H < 1 || W < 1 || K < 1 || K > kMaxDescriptorChannels ||
      !checked_product({N, K, D, H, W, int64_t(16)}, &total))
    throw std::invalid_argument("descriptor_workspace_bytes: sizes must be >= 1 (K <= " +
                                std::to_string(kMaxDescriptorChannels) + ") with a product that fits int64");
  const Geometry g{N, D, H, W, static_cast<int>(K), 0, 1, false};
  const size_t item_bytes = is_double ? sizeof(double) : sizeof(float);
  const uint64_t bytes = backward ? carve_backward(0, g, item_bytes).bytes : carve_forward(0, g, item_bytes).bytes;
  return static_cast<int64_t>(bytes);
}

}  // namespace cuda
}  // namespace gradreg
