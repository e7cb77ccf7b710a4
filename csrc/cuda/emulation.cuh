// A CPU emulator of the small part of CUDA that the kernels in this folder use, so that their
// logic (indexing, tiling, __syncthreads placement, grid-stride loops, workspace layout) can be
// tested on machines without a GPU: compile the .cu files as C++20 with
// -DGRADREG_CUDA_EMULATION (tests/test_cuda.py does). Never part of the real build.
//
// Model: a launch runs its blocks one after another, in one OS thread. A block's threads are
// fibers run round-robin (started with makecontext, then switched with _setjmp/_longjmp, which
// unlike swapcontext make no system call): each runs until it reaches __syncthreads or returns; when
// all wait, all resume; when some wait and others have returned, the launch fails with
// cudaErrorLaunchFailure (a divergent barrier, undefined behaviour on a GPU). __shared__ arrays
// become function statics (one block at a time uses them). Atomics are plain read-modify-writes
// (one OS thread). cub::DeviceRadixSort::SortPairs is a std::stable_sort with the same contract
// (stable, sorts on bits [begin_bit, end_bit)). Not modelled: warps, memory ordering, timing.
#pragma once

#if !defined(GRADREG_CUDA_EMULATION)
#error "emulation.cuh is only for the CPU emulation build (-DGRADREG_CUDA_EMULATION)"
#endif

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719
};

struct cudaDeviceProp {
  int major = 9, minor = 0;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gradreg_emulation {

inline cudaError_t last_error = cudaSuccess;

// The fibers of the running block.
struct Fibers {
  static constexpr size_t kStackBytes = 256 * 1024;
  jmp_buf scheduler;
  struct Resume {
    jmp_buf at;
  };
  std::vector<Resume> resume;  // where each fiber waits in __syncthreads
  std::vector<ucontext_t> start;
  std::vector<std::vector<char>> stacks;
  std::vector<int> state;  // kNew, kRunnable (released from a barrier), kWaiting, kDone
  unsigned current = 0;
  std::function<void()> body;
};
enum { kNew = 0, kRunnable = 1, kWaiting = 2, kDone = 3 };
inline Fibers fibers;

inline void fiber_entry() {
  fibers.body();
  fibers.state[fibers.current] = kDone;
  _longjmp(fibers.scheduler, 1);
}

}  // namespace gradreg_emulation

inline void __syncthreads() {
  using namespace gradreg_emulation;
  fibers.state[fibers.current] = kWaiting;
  if (!_setjmp(fibers.resume[fibers.current].at)) _longjmp(fibers.scheduler, 1);
}

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = gradreg_emulation::last_error;
  gradreg_emulation::last_error = cudaSuccess;
  return err;
}

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator: divergent __syncthreads)";
  }
  return "unknown error";
}

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *prop = cudaDeviceProp();
  return cudaSuccess;
}

namespace gradreg_emulation {

template <typename... Params>
void run_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Params... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  gridDim = grid;
  blockDim = block;
  fibers.body = [&] { kernel(args...); };
  fibers.resume.resize(threads);
  fibers.start.resize(threads);
  fibers.stacks.resize(threads);
  for (auto& stack : fibers.stacks) stack.resize(Fibers::kStackBytes);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        fibers.state.assign(threads, kNew);
        for (;;) {  // rounds: run every fiber up to its next barrier or its end
          // The loop index is a global: a local one would not survive the _longjmp back here.
          for (fibers.current = 0; fibers.current < threads; ++fibers.current) {
            const unsigned t = fibers.current;
            const int state = fibers.state[t];
            if (state != kNew && state != kRunnable) continue;
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            if (_setjmp(fibers.scheduler)) continue;  // the fiber came back (barrier or end)
            if (state == kRunnable) _longjmp(fibers.resume[t].at, 1);
            ucontext_t here;
            ucontext_t& start = fibers.start[t];
            getcontext(&start);
            start.uc_stack.ss_sp = fibers.stacks[t].data();
            start.uc_stack.ss_size = Fibers::kStackBytes;
            start.uc_link = nullptr;  // fiber_entry never returns
            makecontext(&start, fiber_entry, 0);
            swapcontext(&here, &start);
          }
          const auto waiting = std::count(fibers.state.begin(), fibers.state.end(), int(kWaiting));
          if (waiting == 0) break;  // every fiber returned
          if (waiting != static_cast<long>(threads)) {
            last_error = cudaErrorLaunchFailure;  // __syncthreads not reached by the whole block
            return;
          }
          std::fill(fibers.state.begin(), fibers.state.end(), int(kRunnable));
        }
      }
}

}  // namespace gradreg_emulation

namespace cub {

struct DeviceRadixSort {
  template <typename KeyT, typename ValueT, typename NumItemsT>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const KeyT* keys_in, KeyT* keys_out,
                               const ValueT* values_in, ValueT* values_out, NumItemsT num_items, int begin_bit = 0,
                               int end_bit = sizeof(KeyT) * 8, cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 1;
      return cudaSuccess;
    }
    const int bits = end_bit - begin_bit;
    const KeyT mask = bits >= int(sizeof(KeyT) * 8) ? ~KeyT(0) : KeyT((KeyT(1) << bits) - 1);
    auto digit = [&](KeyT k) { return KeyT((k >> begin_bit) & mask); };
    std::vector<size_t> order(static_cast<size_t>(num_items));
    std::iota(order.begin(), order.end(), size_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digit(keys_in[a]) < digit(keys_in[b]); });
    for (size_t i = 0; i < order.size(); ++i) {
      keys_out[i] = keys_in[order[i]];
      values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};

}  // namespace cub
