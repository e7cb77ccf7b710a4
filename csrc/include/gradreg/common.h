// Definitions shared by the host (C++/OpenMP) and device (CUDA) builds.
// Nothing here includes torch: every kernel sees raw pointers and sizes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GR_HD __host__ __device__ __forceinline__
#define GR_UNROLL _Pragma("unroll")
#define GR_SIMD
#else
#define GR_HD inline
#define GR_UNROLL
// For loops over the lanes of a CPU block: the compiler cannot prove that the block's output
// does not alias its inputs, and without this it leaves such loops scalar. Only where OpenMP is on
// (the emulated CUDA build of the tests compiles the shared headers without it).
#if defined(_OPENMP)
#define GR_SIMD _Pragma("omp simd")
#else
#define GR_SIMD
#endif
#endif

namespace gradreg {

#if !defined(__CUDACC__)
// nvcc provides float and double overloads of these in the global namespace; g++ needs std's.
using std::exp;
using std::floor;
using std::isfinite;
using std::log;
using std::nearbyint;
using std::sqrt;
#endif

// a * b rounded to T before it is used: never fused into an FMA with the add or subtract it feeds.
// nvcc fuses by default (--fmad=true), host compilers may (clang's -ffp-contract=on, GCC's gnu modes).
// Fusing is more accurate in general, but breaks differences that must cancel exactly: the local
// covariance S_IJ - (S_J / n) S_I of a one-voxel window is I J - J I, 0 only if both products are
// rounded alike (an H200 gave 6e-9 instead of 0 there). The empty asm makes the host compiler treat the
// rounded product as an unknown value it cannot fuse.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float product_rounded(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product_rounded(double a, double b) { return __dmul_rn(a, b); }
#else
template <typename T>
inline T product_rounded(T a, T b) {
  T p = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#endif
  return p;
}
#endif

GR_HD int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

// Distance to the previous / next voxel along an axis, 0 at the edge: replicate padding
// without a padded copy.
GR_HD int64_t step_back(int64_t c, int64_t stride) { return c > 0 ? stride : 0; }
GR_HD int64_t step_forward(int64_t c, int64_t n, int64_t stride) { return c < n - 1 ? stride : 0; }

}  // namespace gradreg
