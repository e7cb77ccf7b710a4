#include "gradreg/cost_volume.h"

#include <algorithm>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace {

// acc[x] += term(f[x], m[x + offset]) for x in [0, W), with m = 0 where x + offset leaves [0, W).
// `m_row` is null when the whole moving row lies outside the volume. The shift is the same for
// every x, so the inner loop reads both rows with unit stride and vectorises.
template <typename T>
inline void accumulate_row(T* acc, const T* f, const T* m_row, int64_t offset, int64_t W) {
  if (m_row == nullptr) {
    GR_SIMD
    for (int64_t x = 0; x < W; ++x) acc[x] += cost_term(f[x], T(0));
    return;
  }
  int64_t lo, hi;
  overlap_range(offset, W, lo, hi);
  for (int64_t x = 0; x < lo; ++x) acc[x] += cost_term(f[x], T(0));
  GR_SIMD
  for (int64_t x = lo; x < hi; ++x) acc[x] += cost_term(f[x], m_row[x + offset]);
  for (int64_t x = hi; x < W; ++x) acc[x] += cost_term(f[x], T(0));
}

// grad[x] += 2 w[x] (f[x] - m[x + offset]) for x in [0, W), with m = 0 outside (null: the whole row).
template <typename T>
inline void fixed_gradient_row(T* grad, const T* w, const T* f, const T* m_row, int64_t offset, int64_t W) {
  if (m_row == nullptr) {
    GR_SIMD
    for (int64_t x = 0; x < W; ++x) grad[x] += cost_term_grad(w[x], f[x], T(0));
    return;
  }
  int64_t lo, hi;
  overlap_range(offset, W, lo, hi);
  for (int64_t x = 0; x < lo; ++x) grad[x] += cost_term_grad(w[x], f[x], T(0));
  GR_SIMD
  for (int64_t x = lo; x < hi; ++x) grad[x] += cost_term_grad(w[x], f[x], m_row[x + offset]);
  for (int64_t x = hi; x < W; ++x) grad[x] += cost_term_grad(w[x], f[x], T(0));
}

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
  for (int64_t qx = 0; qx < g.Wq; ++qx) {
    const T value = go[qx] / T(g.block_voxels(qz, qy, qx));
    for (int64_t x = block_begin(qx, g.grid), end = block_end(qx, g.grid, g.W); x < end; ++x) w[x] = value;
  }
}

}  // namespace

// One task per (item, control-point row, displacement), displacements fastest, so that a thread's
// consecutive tasks re-read the same fixed rows from cache. A task sums its block rows' terms per
// voxel into a row accumulator, then averages the accumulator over each block along x.
template <typename T>
void cost_volume_forward(const T* fixed, const T* moving, T* out, int64_t N, int64_t C, int64_t D, int64_t H,
                         int64_t W, int radius, int spacing, int grid, int threads) {
  const Geometry g(N, C, D, H, W, radius, spacing, grid);
  const int64_t HW = H * W, tasks = N * g.Dq * g.Hq * g.K;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> acc(W);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t k = t % g.K, qy = (t / g.K) % g.Hq, qz = (t / (g.K * g.Hq)) % g.Dq, n = t / (g.K * g.Hq * g.Dq);
      const Displacement d = cost_volume_displacement(k, radius);
      const int64_t oz = spacing * d.z, oy = spacing * d.y, ox = spacing * d.x;
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t z0 = block_begin(qz, grid), z1 = block_end(qz, grid, D);
      const int64_t y0 = block_begin(qy, grid), y1 = block_end(qy, grid, H);
      for (int64_t z = z0; z < z1; ++z) {
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t zm = z + oz, ym = y + oy;
          const bool inside = zm >= 0 && zm < D && ym >= 0 && ym < H;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t channel = (n * C + c) * D * HW;
            const T* f = fixed + channel + z * HW + y * W;
            const T* m = inside ? moving + channel + zm * HW + ym * W : nullptr;
            accumulate_row(acc.data(), f, m, ox, W);
          }
        }
      }
      T* o = out + ((n * g.K + k) * g.Dq + qz) * g.Hq * g.Wq + qy * g.Wq;
      for (int64_t qx = 0; qx < g.Wq; ++qx) {
        T sum = T(0);
        for (int64_t x = block_begin(qx, grid), end = block_end(qx, grid, W); x < end; ++x) sum += acc[x];
        o[qx] = sum / T(g.block_voxels(qz, qy, qx));
      }
    }
  }
}

// Both gradients are gathers over voxel rows (one task per (item, z, y) row writes only its own
// rows of grad_fixed / grad_moving): fixed voxel x collects 2 w_k(x) (f(x) - m(x + s d_k)) over k;
// moving voxel y collects 2 w_k(y - s d_k) (m(y) - f(y - s d_k)) over the k whose source voxel
// y - s d_k exists. No atomics, and the order of every sum is fixed.
template <typename T>
void cost_volume_backward(const T* grad_out, const T* fixed, const T* moving, T* grad_fixed, T* grad_moving,
                          int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing, int grid,
                          int threads) {
  const Geometry g(N, C, D, H, W, radius, spacing, grid);
  const int64_t HW = H * W, rows = N * D * H;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> w(W);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = r % H, z = (r / H) % D, n = r / (D * H);
      const int64_t row = z * HW + y * W;
      if (grad_fixed) {
        for (int64_t c = 0; c < C; ++c) std::fill_n(grad_fixed + (n * C + c) * D * HW + row, W, T(0));
        for (int64_t k = 0; k < g.K; ++k) {
          const Displacement d = cost_volume_displacement(k, radius);
          const int64_t zm = z + spacing * d.z, ym = y + spacing * d.y;
          const bool inside = zm >= 0 && zm < D && ym >= 0 && ym < H;
          weight_row(w.data(), grad_out, g, n, k, z, y);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t channel = (n * C + c) * D * HW;
            const T* m = inside ? moving + channel + zm * HW + ym * W : nullptr;
            fixed_gradient_row(grad_fixed + channel + row, w.data(), fixed + channel + row, m, spacing * d.x, W);
          }
        }
      }
      if (grad_moving) {
        for (int64_t c = 0; c < C; ++c) std::fill_n(grad_moving + (n * C + c) * D * HW + row, W, T(0));
        for (int64_t k = 0; k < g.K; ++k) {
          const Displacement d = cost_volume_displacement(k, radius);
          const int64_t zs = z - spacing * d.z, ys = y - spacing * d.y, ox = spacing * d.x;
          if (zs < 0 || zs >= D || ys < 0 || ys >= H) continue;
          int64_t lo, hi;  // the moving voxels x whose source x - ox exists
          overlap_range(-ox, W, lo, hi);
          if (lo >= hi) continue;
          weight_row(w.data(), grad_out, g, n, k, zs, ys);  // indexed by the source voxel
          const T* ws = w.data();
          for (int64_t c = 0; c < C; ++c) {
            const int64_t channel = (n * C + c) * D * HW;
            T* gm = grad_moving + channel + row;
            const T* m = moving + channel + row;
            const T* f = fixed + channel + zs * HW + ys * W;
            GR_SIMD
            for (int64_t x = lo; x < hi; ++x) gm[x] += cost_term_grad(ws[x - ox], m[x], f[x - ox]);
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
