// Host entry points of the CUDA core. Each takes raw device pointers, sizes and the caller's
// stream (torch's current stream, passed as an integer), and returns the launch's error string
// ("" on success) so that Python can raise it.
#pragma once

#include <cstdint>
#include <string>

namespace gradreg {
namespace cuda {

std::string gradient_magnitude_forward(bool is_double, uintptr_t vol, uintptr_t out, int64_t NC, int64_t D,
                                       int64_t H, int64_t W, double eps, uintptr_t stream);

// Compute capabilities with SASS in this binary, and the PTX one (JIT-compiled on newer GPUs).
int ptx_architecture();
std::string device_check(int device);

}  // namespace cuda
}  // namespace gradreg
