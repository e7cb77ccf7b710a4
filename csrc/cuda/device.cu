#include <string>

#include "kernel_utils.cuh"
#include "launch.h"

namespace gradreg {
namespace cuda {

int ptx_architecture() { return GRADREG_PTX_ARCH; }

// "" when this binary can run on `device`: SASS exists for sm_80 (runs on 8.x) and sm_90
// (runs on 9.x), and PTX for compute_90 is JIT-compiled on anything newer.
std::string device_check(int device) {
  cudaDeviceProp prop;
  const cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(err);
  if (prop.major < 8)
    return "compute capability " + std::to_string(prop.major) + "." + std::to_string(prop.minor) +
           " is older than sm_80, the oldest this build targets";
  return "";
}

}  // namespace cuda
}  // namespace gradreg
