// OpenMP helpers of the CPU core. The thread count comes from the caller (torch's setting),
// so the core follows torch.set_num_threads.
#pragma once

#include <cstdint>
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

}  // namespace cpu
}  // namespace gradreg
