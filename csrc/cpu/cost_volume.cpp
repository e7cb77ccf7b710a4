#include "gradreg/cost_volume.h"

#include <algorithm>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace {

struct Geometry {
  int64_t N, C, D, H, W, K, Dq, Hq, Wq, radius, spacing, grid;
  Geometry(int64_t n, int64_t c, int64_t d, int64_t h, int64_t w, int r, int s, int g)
      : N(n), C(c), D(d), H(h), W(w), K((2 * int64_t(r) + 1) * (2 * int64_t(r) + 1) * (2 * int64_t(r) + 1)),
        Dq(ceil_div(d, g)), Hq(ceil_div(h, g)), Wq(ceil_div(w, g)), radius(r), spacing(s), grid(g) {}
  // The voxel count of control point (qz, qy, qx)'s block.
  int64_t block_voxels(int64_t qz, int64_t qy, int64_t qx) const {
    return (block_end(qz, grid, D) - block_begin(qz, grid)) * (block_end(qy, grid, H) - block_begin(qy, grid)) *
           (block_end(qx, grid, W) - block_begin(qx, grid));
  }
};

// w[x] = grad_out[n, k, z / g, y / g, x / g] / |B| for a voxel row (z, y): the upstream weight each
// voxel of the row receives, spread from its control point.
template <typename T>
inline void weight_row(T* w, const T* grad_out, const Geometry& g, int64_t n, int64_t k, int64_t z, int64_t y) {
  const int64_t qz = z / g.grid, qy = y / g.grid;
  const T* go = grad_out + ((n * g.K + k) * g.Dq + qz) * g.Hq * g.Wq + qy * g.Wq;
  if (g.grid == 1) {  // blocks of one voxel: a plain copy (the common case, vectorised)
    std::copy_n(go, g.W, w);
    return;
  }
  for (int64_t qx = 0; qx < g.Wq; ++qx) {
    const T value = go[qx] / T(g.block_voxels(qz, qy, qx));
    for (int64_t x = block_begin(qx, g.grid), end = block_end(qx, g.grid, g.W); x < end; ++x) w[x] = value;
  }
}

}  // namespace

// One task per (item, control-point row, dz, dy), dy fastest, so that a thread's consecutive tasks
// re-read the same fixed rows from cache. The 2r+1 displacements along x share each moving row: it is
// copied once into a zero-padded row buffer, so the x loop of every dx reads it without bounds checks
// (samples outside the volume read the zero padding). Each dx sums its block rows' terms per voxel
// into its own row accumulator, averaged over each block along x at the end. Moving rows outside the
// volume contribute f^2 to every dx, summed once into a shared row.
template <typename T>
void cost_volume_forward(const T* fixed, const T* moving, T* out, int64_t N, int64_t C, int64_t D, int64_t H,
                         int64_t W, int radius, int spacing, int grid, int threads) {
  const Geometry g(N, C, D, H, W, radius, spacing, grid);
  const int64_t side = 2 * int64_t(radius) + 1, reach = int64_t(spacing) * radius;
  const int64_t HW = H * W, tasks = N * g.Dq * g.Hq * side * side;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(side * W), unmatched(W);
    std::vector<T> padded(W + 2 * reach, T(0));  // only [reach, reach + W) is ever written
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t dy = t % side - radius, dz = (t / side) % side - radius;
      const int64_t qy = (t / (side * side)) % g.Hq, qz = (t / (side * side * g.Hq)) % g.Dq;
      const int64_t n = t / (side * side * g.Hq * g.Dq);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(unmatched.begin(), unmatched.end(), T(0));
      const int64_t z0 = block_begin(qz, grid), z1 = block_end(qz, grid, D);
      const int64_t y0 = block_begin(qy, grid), y1 = block_end(qy, grid, H);
      for (int64_t z = z0; z < z1; ++z) {
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t zm = z + spacing * dz, ym = y + spacing * dy;
          const bool inside = zm >= 0 && zm < D && ym >= 0 && ym < H;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t channel = (n * C + c) * D * HW;
            const T* f = fixed + channel + z * HW + y * W;
            if (!inside) {
              T* u = unmatched.data();
              GR_SIMD
              for (int64_t x = 0; x < W; ++x) u[x] += cost_term(f[x], T(0));
              continue;
            }
            std::copy_n(moving + channel + zm * HW + ym * W, W, padded.data() + reach);
            for (int64_t j = 0; j < side; ++j) {
              const T* m = padded.data() + reach + spacing * (j - radius);  // m[x] = moving(x + s dx), 0 outside
              T* a = acc.data() + j * W;
              GR_SIMD
              for (int64_t x = 0; x < W; ++x) a[x] += cost_term(f[x], m[x]);
            }
          }
        }
      }
      for (int64_t j = 0; j < side; ++j) {
        const int64_t k = ((dz + radius) * side + (dy + radius)) * side + j;
        T* o = out + ((n * g.K + k) * g.Dq + qz) * g.Hq * g.Wq + qy * g.Wq;
        const T* a = acc.data() + j * W;
        for (int64_t qx = 0; qx < g.Wq; ++qx) {
          T sum = T(0);
          for (int64_t x = block_begin(qx, grid), end = block_end(qx, grid, W); x < end; ++x)
            sum += a[x] + unmatched[x];
          o[qx] = sum / T(g.block_voxels(qz, qy, qx));
        }
      }
    }
  }
}

// Both gradients are gathers over voxel rows (one task per (item, z, y) row writes only its own
// rows of grad_fixed / grad_moving): fixed voxel x collects 2 w_k(x) (f(x) - m(x + s d_k)) over k;
// moving voxel y collects 2 w_k(y - s d_k) (m(y) - f(y - s d_k)) over the k whose source voxel
// y - s d_k exists. As in the forward, the 2r+1 displacements along x of one (dz, dy) share a
// partner row, copied once into a zero-padded buffer; for the moving gradient the source weights
// are padded with zeros too, so a missing source contributes 0 without a branch. No atomics, and
// the order of every sum is fixed.
template <typename T>
void cost_volume_backward(const T* grad_out, const T* fixed, const T* moving, T* grad_fixed, T* grad_moving,
                          int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing, int grid,
                          int threads) {
  const Geometry g(N, C, D, H, W, radius, spacing, grid);
  const int64_t side = 2 * int64_t(radius) + 1, reach = int64_t(spacing) * radius, padded_w = W + 2 * reach;
  const int64_t HW = H * W, rows = N * D * H;
#pragma omp parallel num_threads(threads)
  {
    // Weights of the 2r+1 displacements along x (padded for the moving gradient), and a partner row;
    // the padding is zero from here on: only [reach, reach + W) of each row is ever written.
    std::vector<T> weights(side * padded_w, T(0)), partner(padded_w, T(0));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = r % H, z = (r / H) % D, n = r / (D * H);
      const int64_t row = z * HW + y * W;
      if (grad_fixed) {
        for (int64_t c = 0; c < C; ++c) std::fill_n(grad_fixed + (n * C + c) * D * HW + row, W, T(0));
        for (int64_t dz = -radius; dz <= radius; ++dz) {
          for (int64_t dy = -radius; dy <= radius; ++dy) {
            const int64_t zm = z + spacing * dz, ym = y + spacing * dy;
            const bool inside = zm >= 0 && zm < D && ym >= 0 && ym < H;
            const int64_t k0 = ((dz + radius) * side + (dy + radius)) * side;
            for (int64_t j = 0; j < side; ++j)
              weight_row(weights.data() + j * padded_w + reach, grad_out, g, n, k0 + j, z, y);
            for (int64_t c = 0; c < C; ++c) {
              const int64_t channel = (n * C + c) * D * HW;
              if (inside) std::copy_n(moving + channel + zm * HW + ym * W, W, partner.data() + reach);
              else std::fill_n(partner.data() + reach, W, T(0));
              const T* f = fixed + channel + row;
              T* gf = grad_fixed + channel + row;
              for (int64_t j = 0; j < side; ++j) {
                const T* w = weights.data() + j * padded_w + reach;
                const T* m = partner.data() + reach + spacing * (j - radius);  // moving(x + s dx), 0 outside
                GR_SIMD
                for (int64_t x = 0; x < W; ++x) gf[x] += cost_term_grad(w[x], f[x], m[x]);
              }
            }
          }
        }
      }
      if (grad_moving) {
        for (int64_t c = 0; c < C; ++c) std::fill_n(grad_moving + (n * C + c) * D * HW + row, W, T(0));
        for (int64_t dz = -radius; dz <= radius; ++dz) {
          for (int64_t dy = -radius; dy <= radius; ++dy) {
            const int64_t zs = z - spacing * dz, ys = y - spacing * dy;  // the source row that samples this one
            if (zs < 0 || zs >= D || ys < 0 || ys >= H) continue;
            const int64_t k0 = ((dz + radius) * side + (dy + radius)) * side;
            for (int64_t j = 0; j < side; ++j)
              weight_row(weights.data() + j * padded_w + reach, grad_out, g, n, k0 + j, zs, ys);
            for (int64_t c = 0; c < C; ++c) {
              const int64_t channel = (n * C + c) * D * HW;
              std::copy_n(fixed + channel + zs * HW + ys * W, W, partner.data() + reach);
              const T* m = moving + channel + row;
              T* gm = grad_moving + channel + row;
              for (int64_t j = 0; j < side; ++j) {
                // Source x - s dx for moving voxel x: weights and fixed values read from the padded rows
                // (weight 0 where the source does not exist).
                const int64_t back = reach - spacing * (j - radius);
                const T* w = weights.data() + j * padded_w + back;
                const T* f = partner.data() + back;
                GR_SIMD
                for (int64_t x = 0; x < W; ++x) gm[x] += cost_term_grad(w[x], m[x], f[x]);
              }
            }
          }
        }
      }
    }
  }
}

#define GRADREG_INSTANTIATE(T)                                                                                 \
  template void cost_volume_forward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int, \
                                       int, int, int);                                                        \
  template void cost_volume_backward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                        int64_t, int, int, int, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
