// OpenMP helpers of the CPU core. The thread count comes from the caller (torch's setting),
// so the core follows torch.set_num_threads.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gradreg {
namespace cpu {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// [begin, end) of a static, deterministic split of `count` items among `parts`.
inline void static_chunk(int64_t count, int part, int parts, int64_t& begin, int64_t& end) {
  const int64_t base = count / parts, extra = count % parts;
  begin = part * base + (part < extra ? part : extra);
  end = begin + base + (part < extra ? 1 : 0);
}

// The element count of a scratch buffer, a product of sizes, with the overflow checked: a size that
// does not fit is a std::length_error (a Python ValueError), never a wrapped, too small allocation.
// Scratch is allocated before the parallel regions that use it, where a std::bad_alloc becomes a
// Python MemoryError; thrown inside an OpenMP region it would abort the process.
inline size_t checked_count(std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t f : factors)
    if (f < 0 || __builtin_mul_overflow(product, f, &product) || product > (int64_t(1) << 60))
      throw std::length_error("gradreg_fast._C: a scratch buffer of these sizes does not fit in memory");
  return static_cast<size_t>(product);
}

}  // namespace cpu
}  // namespace gradreg
