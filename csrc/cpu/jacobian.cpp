#include "gradreg/jacobian.h"

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

void jacobian_determinant(const double* u, double* out, int64_t D, int64_t H, int64_t W, int threads) {
  const int64_t rows = D * H;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t d = r / H, h = r % H;
    double* o = out + r * W;
    for (int64_t w = 0; w < W; ++w) o[w] = jacobian_determinant_at(u, d, h, w, D, H, W);
  }
}

}  // namespace cpu
}  // namespace gradreg
