#include "gradreg/lncc.h"

#include <algorithm>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace lncc_detail {

// out[x] = sum of in[x - r .. x + r], zeros outside the row; `padded` holds the row at offset r with
// r zeros on each side. One shifted, vectorised add per tap: exact order, no running-sum drift.
template <typename T>
void row_window_sum(const T* padded, T* out, int64_t W, int r) {
  GR_SIMD
  for (int64_t x = 0; x < W; ++x) out[x] = padded[x];
  for (int k = 1; k <= 2 * r; ++k) {
    const T* shifted = padded + k;
    GR_SIMD
    for (int64_t x = 0; x < W; ++x) out[x] += shifted[x];
  }
}

// Streams one item's volume through a separable (2r+1)^3 window sum, zeros outside, for the rows
// [y0, y1) of every plane, for `channels` per-voxel values produced on the fly:
//   produce(z, y, rows): write the channels' values of row (z, y) to rows[c][0 .. W)
//   consume(z, y, sums): read the channels' window sums of row (z, y) from sums[c][0 .. W)
// Only a few planes live at once: the x-sums of the current plane (the band plus r rows each side)
// and a ring of 2r+1 planes of xy-sums of the band; no volume-sized buffer exists.
template <typename T, typename Produce, typename Consume>
void stream_window_sums(int channels, int64_t D, int64_t H, int64_t W, int r, int64_t y0, int64_t y1,
                        Produce&& produce, Consume&& consume) {
  const int slots = 2 * r + 1;
  const int64_t rows_lo = std::max<int64_t>(0, y0 - r), rows_hi = std::min<int64_t>(H, y1 + r);
  const int64_t x_rows = rows_hi - rows_lo, band = y1 - y0, padded_len = W + 2 * r;
  std::vector<T> padded(channels * padded_len, T(0));
  std::vector<T> x_sums(channels * x_rows * W);
  std::vector<T> ring(static_cast<size_t>(slots) * channels * band * W, T(0));
  std::vector<T> sums(channels * W);
  std::vector<T*> rows(channels);
  std::vector<const T*> sum_rows(channels);
  for (int c = 0; c < channels; ++c) {
    rows[c] = padded.data() + c * padded_len + r;
    sum_rows[c] = sums.data() + c * W;
  }
  const int64_t slot_size = channels * band * W;
  for (int64_t zi = 0; zi < D + r; ++zi) {
    T* slot = ring.data() + (zi % slots) * slot_size;
    if (zi < D) {
      for (int64_t y = rows_lo; y < rows_hi; ++y) {
        produce(zi, y, rows.data());
        for (int c = 0; c < channels; ++c)
          row_window_sum(padded.data() + c * padded_len, x_sums.data() + (c * x_rows + (y - rows_lo)) * W, W, r);
      }
      for (int c = 0; c < channels; ++c) {
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t lo = std::max<int64_t>(0, y - r), hi = std::min<int64_t>(H - 1, y + r);
          T* out = slot + (c * band + (y - y0)) * W;
          const T* first = x_sums.data() + (c * x_rows + (lo - rows_lo)) * W;
          GR_SIMD
          for (int64_t x = 0; x < W; ++x) out[x] = first[x];
          for (int64_t yy = lo + 1; yy <= hi; ++yy) {
            const T* add = x_sums.data() + (c * x_rows + (yy - rows_lo)) * W;
            GR_SIMD
            for (int64_t x = 0; x < W; ++x) out[x] += add[x];
          }
        }
      }
    } else {
      std::fill(slot, slot + slot_size, T(0));  // planes past the end are zero padding
    }
    const int64_t z = zi - r;  // every plane of z's window is now in the ring (those before 0 are zero)
    if (z < 0) continue;
    for (int64_t y = y0; y < y1; ++y) {
      for (int c = 0; c < channels; ++c) {
        T* out = sums.data() + c * W;
        const T* first = ring.data() + (c * band + (y - y0)) * W;
        GR_SIMD
        for (int64_t x = 0; x < W; ++x) out[x] = first[x];
        for (int s = 1; s < slots; ++s) {
          const T* add = ring.data() + s * slot_size + (c * band + (y - y0)) * W;
          GR_SIMD
          for (int64_t x = 0; x < W; ++x) out[x] += add[x];
        }
      }
      consume(z, y, sum_rows.data());
    }
  }
}

// Work units: (item, band of rows). Enough bands for the threads; each band streams on its own,
// re-summing r rows of x-sums on each side (a few per cent at the sizes of interest).
inline int64_t band_count(int64_t N, int64_t H, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(H, (threads + N - 1) / N));
}

}  // namespace lncc_detail

template <typename T>
double lncc_forward(const T* warped, const T* fixed, int64_t fixed_batch_stride, T* loss_map, T* coefficients,
                    int coefficient_count, int64_t N, int64_t D, int64_t H, int64_t W, int window, double eps,
                    double smooth_nr, bool monai, int threads) {
  using namespace lncc_detail;
  const int r = window / 2;
  const int64_t HW = H * W, DHW = D * HW;
  const LnccParams<T> params{T(int64_t(window) * window * window), T(eps), T(smooth_nr), monai};
  const int64_t bands = band_count(N, H, threads), units = N * bands;
  std::vector<double> partial(units, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t n = unit / bands, b = unit % bands;
    int64_t y0, y1;
    static_chunk(H, static_cast<int>(b), static_cast<int>(bands), y0, y1);
    const T* I = fixed + n * fixed_batch_stride;
    const T* J = warped + n * DHW;
    T* coef = coefficients ? coefficients + n * coefficient_count * DHW : nullptr;
    T* map = loss_map ? loss_map + n * DHW : nullptr;
    double total = 0.0;
    auto produce = [&](int64_t z, int64_t y, T* const* rows) {
      const T* i_row = I + z * HW + y * W;
      const T* j_row = J + z * HW + y * W;
      GR_SIMD
      for (int64_t x = 0; x < W; ++x) {
        const T i = i_row[x], j = j_row[x];
        rows[kSumI][x] = i;
        rows[kSumJ][x] = j;
        rows[kSumII][x] = i * i;
        rows[kSumJJ][x] = j * j;
        rows[kSumIJ][x] = i * j;
      }
    };
    auto consume = [&](int64_t z, int64_t y, const T* const* sums) {
      const int64_t base = z * HW + y * W;
      T row_total = T(0);
      for (int64_t x = 0; x < W; ++x) {
        const T s[5] = {sums[0][x], sums[1][x], sums[2][x], sums[3][x], sums[4][x]};
        const T value = lncc_value_and_coefficients(s, params, coef ? coef + base + x : nullptr, DHW,
                                                    coefficient_count);
        if (map) map[base + x] = value;
        row_total += value;
      }
      total += double(row_total);
    };
    stream_window_sums<T>(5, D, H, W, r, y0, y1, produce, consume);
    partial[unit] = total;
  }
  double total = 0.0;
  for (double p : partial) total += p;  // in unit order: the same bits for a given thread count
  return total;
}

template <typename T>
void lncc_backward(const T* coefficients, int coefficient_count, const T* grad_map, double grad_scale,
                   const T* warped, const T* fixed, int64_t fixed_batch_stride, T* grad_warped, T* grad_fixed,
                   int64_t N, int64_t D, int64_t H, int64_t W, int window, int threads) {
  using namespace lncc_detail;
  const int r = window / 2;
  const int64_t HW = H * W, DHW = D * HW;
  const T scale = T(grad_scale);
  const int64_t bands = band_count(N, H, threads), units = N * bands;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t n = unit / bands, b = unit % bands;
    int64_t y0, y1;
    static_chunk(H, static_cast<int>(b), static_cast<int>(bands), y0, y1);
    const T* I = fixed + n * fixed_batch_stride;
    const T* J = warped + n * DHW;
    const T* coef = coefficients + n * coefficient_count * DHW;
    const T* upstream = grad_map ? grad_map + n * DHW : nullptr;
    T* gw = grad_warped ? grad_warped + n * DHW : nullptr;
    T* gf = grad_fixed ? grad_fixed + n * DHW : nullptr;
    auto produce = [&](int64_t z, int64_t y, T* const* rows) {
      const int64_t base = z * HW + y * W;
      for (int k = 0; k < coefficient_count; ++k) {
        const T* c = coef + k * DHW + base;
        if (upstream) {
          const T* g = upstream + base;
          GR_SIMD
          for (int64_t x = 0; x < W; ++x) rows[k][x] = c[x] * g[x];
        } else {
          GR_SIMD
          for (int64_t x = 0; x < W; ++x) rows[k][x] = c[x] * scale;
        }
      }
    };
    auto consume = [&](int64_t z, int64_t y, const T* const* box) {
      const int64_t base = z * HW + y * W;
      if (gw) {
        GR_SIMD
        for (int64_t x = 0; x < W; ++x)
          gw[base + x] = lncc_image_grad(box[kCoefJ][x], box[kCoefJJ][x], box[kCoefIJ][x], J[base + x], I[base + x]);
      }
      if (gf) {
        GR_SIMD
        for (int64_t x = 0; x < W; ++x)
          gf[base + x] = lncc_image_grad(box[kCoefI][x], box[kCoefII][x], box[kCoefIJ][x], I[base + x], J[base + x]);
      }
    };
    stream_window_sums<T>(coefficient_count, D, H, W, r, y0, y1, produce, consume);
  }
}

#define GRADREG_INSTANTIATE(T)                                                                                  \
  template double lncc_forward<T>(const T*, const T*, int64_t, T*, T*, int, int64_t, int64_t, int64_t, int64_t, \
                                  int, double, double, bool, int);                                              \
  template void lncc_backward<T>(const T*, int, const T*, double, const T*, const T*, int64_t, T*, T*, int64_t, \
                                 int64_t, int64_t, int64_t, int, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
