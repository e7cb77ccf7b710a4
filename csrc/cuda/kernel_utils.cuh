// Launch shapes, grid-stride loops, fixed-order reductions, workspace carving and error strings
// shared by the CUDA kernels. Kernel files include this instead of <cuda_runtime.h>, so that the
// same sources also compile for the CPU emulator (emulation.cuh) that tests them without a GPU.
#pragma once

#if defined(GRADREG_CUDA_EMULATION)
#include "emulation.cuh"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <string>

// Keeps a loop rolled (nvcc unrolls on its own, which can cost registers and occupancy).
#if defined(__CUDACC__)
#define GRADREG_NO_UNROLL _Pragma("unroll 1")
#else
#define GRADREG_NO_UNROLL
#endif

namespace gradreg {
namespace cuda {

// Voxel kernels use blocks of 32 x 8 threads: threadIdx.x walks along a row (coalesced),
// threadIdx.y picks one of the block's rows. Rows are (item, z, y) triples, so the divisions
// that recover z and y happen once per row, not once per voxel.
constexpr int kRowThreadsX = 32;
constexpr int kRowThreadsY = 8;
constexpr int kBlockThreads = kRowThreadsX * kRowThreadsY;

// Every grid is capped: kernels use grid-stride loops, so any size runs within the grid limits.
#if defined(GRADREG_CUDA_EMULATION) && defined(GRADREG_EMULATION_MAX_BLOCKS)
constexpr int64_t kMaxBlocks = GRADREG_EMULATION_MAX_BLOCKS;  // tiny, to exercise the strides
#else
constexpr int64_t kMaxBlocks = int64_t(1) << 16;
#endif

inline unsigned grid_blocks(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

inline dim3 row_block() { return dim3(kRowThreadsX, kRowThreadsY); }
inline unsigned row_grid(int64_t rows) { return grid_blocks(rows, kRowThreadsY); }

// Grid-stride over rows with row blocks; each thread then strides along x by blockDim.x.
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ int64_t row_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.y; }

// 1D grid-stride loop bounds.
__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t index_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Sum of one value per thread of a kBlockThreads-thread block, in a fixed tree order (so the
// result does not depend on scheduling). Every thread must call it; every thread gets the sum.
__device__ __forceinline__ double block_sum(double value, double* scratch /* kBlockThreads */) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  scratch[tid] = value;
  __syncthreads();
  for (int half = kBlockThreads / 2; half > 0; half >>= 1) {
    if (tid < half) scratch[tid] += scratch[tid + half];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // scratch is reused by the caller's next call
  return total;
}

// "" when the launches since the last check succeeded, else "<what>: <CUDA error>".
inline std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

inline std::string call_error(const char* what, cudaError_t err) {
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// kernel<<<grid, block, 0, stream>>>(args...); under the emulator, runs it on CPU fibers.
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#if defined(GRADREG_CUDA_EMULATION)
  ::gradreg_emulation::run_kernel(kernel, grid, block, stream, static_cast<Params>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
#endif
}

// Carves typed buffers out of the caller's workspace (one torch uint8 tensor). Every buffer
// starts on a kAlign boundary. bytes() is the size the layout needs from any base address: the
// buffers plus kAlign of slack for aligning the first. The same sequence of take() calls sizes
// the workspace (any base, e.g. 0) and places the buffers (the real base).
class WorkspaceCarver {
 public:
  static constexpr uintptr_t kAlign = 256;
  explicit WorkspaceCarver(uintptr_t base) : begin_(round_up(base)), cursor_(begin_) {}
  template <typename U>
  U* take(uint64_t count) {
    U* p = reinterpret_cast<U*>(cursor_);
    cursor_ = round_up(cursor_ + count * sizeof(U));
    return p;
  }
  uint64_t bytes() const { return cursor_ - begin_ + kAlign; }

 private:
  static uintptr_t round_up(uintptr_t v) { return (v + kAlign - 1) & ~(kAlign - 1); }
  uintptr_t begin_, cursor_;
};

// Deterministic sums of a grid-stride kernel: each block adds its threads' values with block_sum and
// writes one double partial, then sum_partials_kernel (one block) adds the partials in index order.
// The block count depends on the item count alone, so the result is the same on every run.
constexpr int64_t kMaxSumBlocks = 1024;

inline int64_t sum_blocks(int64_t items) {
  const int64_t cap = kMaxSumBlocks < kMaxBlocks ? kMaxSumBlocks : kMaxBlocks;
  const int64_t blocks = (items + kBlockThreads - 1) / kBlockThreads;
  return blocks < 1 ? 1 : (blocks < cap ? blocks : cap);
}

// The partials of sum_blocks(items) blocks carved from a workspace at `base` (0: only measure it).
inline double* carve_partials(uintptr_t base, int64_t items, uint64_t* bytes) {
  WorkspaceCarver carver(base);
  double* partials = carver.take<double>(static_cast<uint64_t>(sum_blocks(items)));
  *bytes = carver.bytes();
  return partials;
}

namespace {  // one copy of the kernel per translation unit

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t count, T* __restrict__ out) {
  __shared__ double scratch[kBlockThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kBlockThreads) sum += partials[i];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *out = static_cast<T>(sum);
}

}  // namespace

// Products of sizes that cannot overflow int64 (tensor sizes can't, but these entry points are
// plain functions: check rather than trust).
inline bool checked_product(std::initializer_list<int64_t> factors, int64_t* product) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(p, f, &p)) return false;
  }
  *product = p;
  return true;
}

}  // namespace cuda
}  // namespace gradreg
