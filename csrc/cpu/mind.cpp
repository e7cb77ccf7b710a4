#include "gradreg/mind.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {
namespace {

// out[i] = sum_{t=-r..r} in[clamp(i + t)] for i in [0, n), on `width` interleaved lines
// (element (i, x) at in[i * width + x]): the 1D replicate-padded box sum, vectorised over x.
template <typename T>
void box_sum_lines(const T* in, T* out, int64_t n, int64_t width, int radius) {
  for (int64_t i = 0; i < n; ++i) {
    T* o = out + i * width;
    std::fill(o, o + width, T(0));
    for (int t = -radius; t <= radius; ++t) {
      const T* src = in + clamp_index(i + t, n) * width;
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) o[x] += src[x];
    }
  }
}

// The adjoint of box_sum_lines: out[q] = sum_i in[i] * #{t : clamp(i + t) = q}.
template <typename T>
void box_sum_lines_adjoint(const T* in, T* out, int64_t n, int64_t width, int radius) {
  std::fill(out, out + n * width, T(0));
  for (int64_t j = -radius; j < n + radius; ++j) {  // j: position on the padded line
    T* o = out + clamp_index(j, n) * width;
    for (int64_t i = std::max<int64_t>(0, j - radius); i <= std::min<int64_t>(n - 1, j + radius); ++i) {
      const T* src = in + i * width;
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) o[x] += src[x];
    }
  }
}

// Per-thread scratch of the separable box filter of one channel.
template <typename T>
struct BoxScratch {
  std::vector<T> line, plane, block, block_out;
  BoxScratch(int64_t D, int64_t H, int64_t W, int radius)
      : line(W + 2 * radius), plane(H * W), block(D * W), block_out(D * W) {}
};

// dst[z, y, x] = sum over the (2r+1)^3 box (replicate edges) of the squared difference of pair k.
template <typename T>
void box_filtered_channel(const T* vol, T* dst, int64_t D, int64_t H, int64_t W, const int* pair, int radius,
                          int dilation, BoxScratch<T>& s) {
  const int64_t HW = H * W;
  for (int64_t z = 0; z < D; ++z) {
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t j = 0; j < W + 2 * radius; ++j)
        s.line[j] = descriptor_squared_difference(vol, z, y, clamp_index(j - radius, W), D, H, W, pair, dilation);
      T* row = s.plane.data() + y * W;
      for (int64_t x = 0; x < W; ++x) {
        T acc = T(0);
        for (int t = 0; t <= 2 * radius; ++t) acc += s.line[x + t];
        row[x] = acc;
      }
    }
    box_sum_lines(s.plane.data(), dst + z * HW, H, W, radius);
  }
  for (int64_t y = 0; y < H; ++y) {  // along z, one (z, x) block per row y
    for (int64_t z = 0; z < D; ++z) std::copy(dst + z * HW + y * W, dst + z * HW + (y + 1) * W, s.block.data() + z * W);
    box_sum_lines(s.block.data(), s.block_out.data(), D, W, radius);
    for (int64_t z = 0; z < D; ++z)
      std::copy(s.block_out.data() + z * W, s.block_out.data() + (z + 1) * W, dst + z * HW + y * W);
  }
}

// grad_vol += d/dvol of sum(grad_box * box_filtered_channel); grad_box is overwritten.
template <typename T>
void box_filtered_channel_backward(const T* vol, T* grad_box, T* grad_vol, int64_t D, int64_t H, int64_t W,
                                   const int* pair, int radius, int dilation, BoxScratch<T>& s) {
  const int64_t HW = H * W;
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t z = 0; z < D; ++z)
      std::copy(grad_box + z * HW + y * W, grad_box + z * HW + (y + 1) * W, s.block.data() + z * W);
    box_sum_lines_adjoint(s.block.data(), s.block_out.data(), D, W, radius);
    for (int64_t z = 0; z < D; ++z)
      std::copy(s.block_out.data() + z * W, s.block_out.data() + (z + 1) * W, grad_box + z * HW + y * W);
  }
  std::vector<T>& line_grad = s.line;
  for (int64_t z = 0; z < D; ++z) {
    box_sum_lines_adjoint(grad_box + z * HW, s.plane.data(), H, W, radius);
    for (int64_t y = 0; y < H; ++y) {
      const T* g = s.plane.data() + y * W;
      std::fill(line_grad.begin(), line_grad.begin() + W, T(0));
      for (int64_t j = -radius; j < W + radius; ++j) {
        T acc = T(0);
        for (int64_t i = std::max<int64_t>(0, j - radius); i <= std::min<int64_t>(W - 1, j + radius); ++i) acc += g[i];
        line_grad[clamp_index(j, W)] += acc;
      }
      const int64_t za = clamp_index(z + dilation * pair[0], D) * HW + clamp_index(y + dilation * pair[1], H) * W;
      const int64_t zb = clamp_index(z + dilation * pair[3], D) * HW + clamp_index(y + dilation * pair[4], H) * W;
      for (int64_t x = 0; x < W; ++x) {
        const int64_t ia = za + clamp_index(x + dilation * pair[2], W);
        const int64_t ib = zb + clamp_index(x + dilation * pair[5], W);
        const T g2 = T(2) * (vol[ia] - vol[ib]) * line_grad[x];
        grad_vol[ia] += g2;
        grad_vol[ib] -= g2;
      }
    }
  }
}

}  // namespace

template <typename T>
void descriptor_forward(const T* vol, T* out, T* variance, uint8_t* flags, int64_t N, int64_t D, int64_t H,
                        int64_t W, const int* pairs, int K, int radius, int dilation, bool subtract_min,
                        bool per_item, int threads) {
  const int64_t DHW = D * H * W;
  const T box = T((2 * radius + 1) * (2 * radius + 1) * (2 * radius + 1));
#pragma omp parallel num_threads(threads)
  {
    BoxScratch<T> scratch(D, H, W, radius);
#pragma omp for schedule(dynamic, 1)
    for (int64_t nk = 0; nk < N * K; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      box_filtered_channel(vol + n * DHW, out + nk * DHW, D, H, W, pairs + 6 * k, radius, dilation, scratch);
    }
  }
  std::vector<double> item_sums(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * K * DHW;
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(threads)
    for (int64_t p = 0; p < DHW; ++p) {
      uint8_t argmin;
      const T v = descriptor_center(o + p, DHW, K, T(1) / box, subtract_min, argmin);
      variance[n * DHW + p] = v;
      flags[n * DHW + p] = argmin;
      sum += v;
    }
    item_sums[n] = sum;
  }
  double total = 0.0;
  for (double s : item_sums) total += s;
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t n = 0; n < N; ++n) {
    const T m = per_item ? T(item_sums[n] / double(DHW)) : T(total / double(N * DHW));
    T* o = out + n * K * DHW;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < DHW; ++p) {
      const T vc = descriptor_clamped_variance(variance[n * DHW + p], m, tiny, flags[n * DHW + p]);
      variance[n * DHW + p] = vc;
      descriptor_finish(o + p, DHW, K, vc);
    }
  }
}

template <typename T, typename Upstream>
static void descriptor_backward_impl(const Upstream* upstream_per_item, const T* out, const T* vol,
                                     const T* variance, const uint8_t* flags, T* grad_vol, int64_t N, int64_t D,
                                     int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                     bool subtract_min, int threads) {
  const int64_t DHW = D * H * W;
  const T inv_box = T(1) / T((2 * radius + 1) * (2 * radius + 1) * (2 * radius + 1));
  const T tiny = std::numeric_limits<T>::min();
  std::vector<T> grad_box(N * K * DHW);
  for (int64_t n = 0; n < N; ++n) {
    const T* o = out + n * K * DHW;
    T* gb = grad_box.data() + n * K * DHW;
    const Upstream& up = upstream_per_item[n];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < DHW; ++p)
      descriptor_backward_voxel(o, p, DHW, K, variance[n * DHW + p], flags[n * DHW + p], tiny, inv_box,
                                subtract_min, up, gb);
  }
  // Channels run in parallel and scatter into per-thread volumes, summed in thread order.
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N * K)));
  std::vector<std::vector<T>> private_grads(parts, std::vector<T>());
#pragma omp parallel num_threads(parts)
  {
    const int tid = thread_id(), team = team_size();
    private_grads[tid].assign(N * DHW, T(0));
    BoxScratch<T> scratch(D, H, W, radius);
    int64_t begin, end;
    static_chunk(N * K, tid, team, begin, end);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      box_filtered_channel_backward(vol + n * DHW, grad_box.data() + nk * DHW, private_grads[tid].data() + n * DHW,
                                    D, H, W, pairs + 6 * k, radius, dilation, scratch);
    }
#pragma omp barrier
    int64_t b, e;
    static_chunk(N * DHW, tid, team, b, e);
    for (int64_t i = b; i < e; ++i) {
      T acc = T(0);
      for (int t = 0; t < team; ++t) acc += private_grads[t][i];
      grad_vol[i] = acc;
    }
  }
}

template <typename T>
void descriptor_backward(const T* grad_out, const T* out, const T* vol, const T* variance, const uint8_t* flags,
                         T* grad_vol, int64_t N, int64_t D, int64_t H, int64_t W, const int* pairs, int K,
                         int radius, int dilation, bool subtract_min, int threads) {
  std::vector<UpstreamFromTensor<T>> up(N);
  for (int64_t n = 0; n < N; ++n) up[n] = UpstreamFromTensor<T>{grad_out + n * K * D * H * W};
  descriptor_backward_impl(up.data(), out, vol, variance, flags, grad_vol, N, D, H, W, pairs, K, radius, dilation,
                           subtract_min, threads);
}

template <typename T>
void descriptor_loss_backward(T scale, bool squared, const T* target, const T* out, const T* vol,
                              const T* variance, const uint8_t* flags, T* grad_vol, int64_t N, int64_t D,
                              int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                              bool subtract_min, int threads) {
  std::vector<UpstreamFromPenalty<T>> up(N);
  for (int64_t n = 0; n < N; ++n) up[n] = UpstreamFromPenalty<T>{target + n * K * D * H * W, scale, squared};
  descriptor_backward_impl(up.data(), out, vol, variance, flags, grad_vol, N, D, H, W, pairs, K, radius, dilation,
                           subtract_min, threads);
}

template <typename T>
double penalty_sum(const T* a, const T* b, int64_t numel, bool squared, int threads) {
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(threads)
  for (int64_t i = 0; i < numel; ++i) {
    const T d = a[i] - b[i];
    sum += squared ? double(d) * double(d) : (d < T(0) ? -double(d) : double(d));
  }
  return sum;
}

#define GRADREG_INSTANTIATE(T)                                                                                 \
  template void descriptor_forward<T>(const T*, T*, T*, uint8_t*, int64_t, int64_t, int64_t, int64_t, const int*, \
                                      int, int, int, bool, bool, int);                                         \
  template void descriptor_backward<T>(const T*, const T*, const T*, const T*, const uint8_t*, T*, int64_t,       \
                                       int64_t, int64_t, int64_t, const int*, int, int, int, bool, int);         \
  template void descriptor_loss_backward<T>(T, bool, const T*, const T*, const T*, const T*, const uint8_t*, T*,  \
                                            int64_t, int64_t, int64_t, int64_t, const int*, int, int, int, bool,  \
                                            int);                                                              \
  template double penalty_sum<T>(const T*, const T*, int64_t, bool, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
