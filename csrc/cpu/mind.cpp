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

// Row q of the adjoint of box_sum_lines: out[x] = sum_i in[i, x] * #{t : clamp(i + t) = q}, i.e.
// the sum over the padded positions j that replicate q of the window sums around j.
template <typename T>
void box_sum_lines_adjoint_at(const T* in, T* out, int64_t q, int64_t n, int64_t width, int radius) {
  std::fill(out, out + width, T(0));
  const int64_t j_first = q == 0 ? -radius : q, j_last = q == n - 1 ? n - 1 + radius : q;
  for (int64_t j = j_first; j <= j_last; ++j) {
    for (int64_t i = std::max<int64_t>(0, j - radius); i <= std::min<int64_t>(n - 1, j + radius); ++i) {
      const T* src = in + i * width;
#pragma omp simd
      for (int64_t x = 0; x < width; ++x) out[x] += src[x];
    }
  }
}

template <typename T>
void box_sum_lines_adjoint(const T* in, T* out, int64_t n, int64_t width, int radius) {
  for (int64_t q = 0; q < n; ++q) box_sum_lines_adjoint_at(in, out + q * width, q, n, width, radius);
}

// Per-thread scratch of the separable box filter of one channel.
template <typename T>
struct BoxScratch {
  std::vector<T> line, line_grad, plane, plane_grad, ring;
  BoxScratch(int64_t H, int64_t W, int radius)
      : line(W), line_grad(W), plane(H * W), plane_grad(H * W), ring((2 * radius + 1) * H * W) {}
};

// [lo, hi): the x for which x + shift stays inside [0, W) for both shifts.
inline void inside_range(int64_t W, int64_t shift_a, int64_t shift_b, int64_t& lo, int64_t& hi) {
  lo = std::min<int64_t>(W, std::max<int64_t>({0, -shift_a, -shift_b}));
  hi = std::max<int64_t>(lo, std::min<int64_t>({W, W - shift_a, W - shift_b}));
}

// The x- and y-box sums of the squared difference of one pair on plane z (the z-box is summed
// by the caller over these planes).
template <typename T>
void xy_box_plane(const T* vol, T* plane, int64_t z, int64_t D, int64_t H, int64_t W, const int* pair, int radius,
                  int dilation, BoxScratch<T>& s) {
  const int64_t HW = H * W;
  const int64_t shift_a = int64_t(dilation) * pair[2], shift_b = int64_t(dilation) * pair[5];
  int64_t lo, hi;
  inside_range(W, shift_a, shift_b, lo, hi);
  T* sq = s.line.data();
  for (int64_t y = 0; y < H; ++y) {
    const T* row_a = vol + clamp_index(z + dilation * pair[0], D) * HW + clamp_index(y + dilation * pair[1], H) * W;
    const T* row_b = vol + clamp_index(z + dilation * pair[3], D) * HW + clamp_index(y + dilation * pair[4], H) * W;
    for (int64_t x = 0; x < lo; ++x)
      sq[x] = descriptor_squared_difference(vol, z, y, x, D, H, W, pair, dilation);
#pragma omp simd
    for (int64_t x = lo; x < hi; ++x) {
      const T d = row_a[x + shift_a] - row_b[x + shift_b];
      sq[x] = d * d;
    }
    for (int64_t x = hi; x < W; ++x)
      sq[x] = descriptor_squared_difference(vol, z, y, x, D, H, W, pair, dilation);
    T* row = s.plane.data() + y * W;
    const int64_t x_lo = std::min<int64_t>(radius, W), x_hi = std::max<int64_t>(x_lo, W - radius);
    for (int64_t x = 0; x < x_lo; ++x) {
      T acc = T(0);
      for (int t = -radius; t <= radius; ++t) acc += sq[clamp_index(x + t, W)];
      row[x] = acc;
    }
#pragma omp simd
    for (int64_t x = x_lo; x < x_hi; ++x) {
      T acc = T(0);
      for (int t = -radius; t <= radius; ++t) acc += sq[x + t];
      row[x] = acc;
    }
    for (int64_t x = x_hi; x < W; ++x) {
      T acc = T(0);
      for (int t = -radius; t <= radius; ++t) acc += sq[clamp_index(x + t, W)];
      row[x] = acc;
    }
  }
  box_sum_lines(s.plane.data(), plane, H, W, radius);
}

// dst[z] for z in [z_begin, z_end): box sums of the squared difference of one pair. The xy-summed
// planes stream through a ring of 2r+1 planes, so each is computed once and dst is written once.
template <typename T>
void box_filtered_channel(const T* vol, T* dst, int64_t z_begin, int64_t z_end, int64_t D, int64_t H, int64_t W,
                          const int* pair, int radius, int dilation, BoxScratch<T>& s) {
  const int64_t HW = H * W, slots = 2 * radius + 1;
  int64_t computed = std::max<int64_t>(0, z_begin - radius) - 1;
  for (int64_t z = z_begin; z < z_end; ++z) {
    for (const int64_t last = std::min<int64_t>(D - 1, z + radius); computed < last;) {
      ++computed;
      xy_box_plane(vol, s.ring.data() + (computed % slots) * HW, computed, D, H, W, pair, radius, dilation, s);
    }
    T* o = dst + z * HW;
    std::fill(o, o + HW, T(0));
    for (int t = -radius; t <= radius; ++t) {
      const T* src = s.ring.data() + (clamp_index(z + t, D) % slots) * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) o[i] += src[i];
    }
  }
}

// grad_vol += d/dvol of sum over z in [z_begin, z_end) of the adjoint-box-filtered grad_box
// times the squared difference of one pair: each plane of the adjoint is formed on the fly
// (z, then y, then x), then scattered into the two voxels the squared difference read.
template <typename T>
void box_filtered_channel_backward(const T* vol, const T* grad_box, T* grad_vol, int64_t z_begin, int64_t z_end,
                                   int64_t D, int64_t H, int64_t W, const int* pair, int radius, int dilation,
                                   BoxScratch<T>& s) {
  const int64_t HW = H * W;
  const int64_t shift_a = int64_t(dilation) * pair[2], shift_b = int64_t(dilation) * pair[5];
  int64_t lo, hi;
  inside_range(W, shift_a, shift_b, lo, hi);
  const int64_t x_lo = std::min<int64_t>(radius + 1, W), x_hi = std::max<int64_t>(x_lo, W - radius - 1);
  for (int64_t z = z_begin; z < z_end; ++z) {
    box_sum_lines_adjoint_at(grad_box, s.plane.data(), z, D, HW, radius);
    box_sum_lines_adjoint(s.plane.data(), s.plane_grad.data(), H, W, radius);
    for (int64_t y = 0; y < H; ++y) {
      const T* g = s.plane_grad.data() + y * W;
      T* gx = s.line_grad.data();
      for (int64_t x = 0; x < x_lo; ++x) box_sum_lines_adjoint_at(g, gx + x, x, W, 1, radius);
#pragma omp simd
      for (int64_t x = x_lo; x < x_hi; ++x) {  // away from both ends: a plain window sum
        T acc = T(0);
        for (int t = -radius; t <= radius; ++t) acc += g[x + t];
        gx[x] = acc;
      }
      for (int64_t x = x_hi; x < W; ++x) box_sum_lines_adjoint_at(g, gx + x, x, W, 1, radius);

      const int64_t off_a = clamp_index(z + dilation * pair[0], D) * HW + clamp_index(y + dilation * pair[1], H) * W;
      const int64_t off_b = clamp_index(z + dilation * pair[3], D) * HW + clamp_index(y + dilation * pair[4], H) * W;
      const T* row_a = vol + off_a;
      const T* row_b = vol + off_b;
      T* d2 = s.line.data();  // 2 * (I[a] - I[b]) * upstream
      for (int64_t x = 0; x < W; ++x) {
        if (x == lo && hi > lo) {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) d2[i] = T(2) * (row_a[i + shift_a] - row_b[i + shift_b]) * gx[i];
          x = hi - 1;
          continue;
        }
        const int64_t xa = clamp_index(x + shift_a, W), xb = clamp_index(x + shift_b, W);
        d2[x] = T(2) * (row_a[xa] - row_b[xb]) * gx[x];
      }
      // Two passes, since a and b may share a row: each is then a contiguous update inside.
      T* ga = grad_vol + off_a;
      T* gb = grad_vol + off_b;
      for (int64_t x = 0; x < lo; ++x) ga[clamp_index(x + shift_a, W)] += d2[x];
#pragma omp simd
      for (int64_t x = lo; x < hi; ++x) ga[x + shift_a] += d2[x];
      for (int64_t x = hi; x < W; ++x) ga[clamp_index(x + shift_a, W)] += d2[x];
      for (int64_t x = 0; x < lo; ++x) gb[clamp_index(x + shift_b, W)] -= d2[x];
#pragma omp simd
      for (int64_t x = lo; x < hi; ++x) gb[x + shift_b] -= d2[x];
      for (int64_t x = hi; x < W; ++x) gb[clamp_index(x + shift_b, W)] -= d2[x];
    }
  }
}

}  // namespace

template <typename T>
void descriptor_forward(const T* vol, T* out, T* variance, uint8_t* flags, int64_t N, int64_t D, int64_t H,
                        int64_t W, const int* pairs, int K, int radius, int dilation, bool subtract_min,
                        bool per_item, int threads) {
  const int64_t DHW = D * H * W;
  const T inv_box = T(1) / T(double(2 * radius + 1) * double(2 * radius + 1) * double(2 * radius + 1));
  // Tasks are (item, channel, z-chunk): enough of them to keep every thread busy even for one item.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(D, (2 * threads + N * K - 1) / (N * K)));
#pragma omp parallel num_threads(threads)
  {
    BoxScratch<T> scratch(H, W, radius);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * K * chunks; ++task) {
      const int64_t nk = task / chunks, chunk = task % chunks;
      int64_t z_begin, z_end;
      static_chunk(D, static_cast<int>(chunk), static_cast<int>(chunks), z_begin, z_end);
      box_filtered_channel(vol + (nk / K) * DHW, out + nk * DHW, z_begin, z_end, D, H, W, pairs + 6 * (nk % K),
                           radius, dilation, scratch);
    }
  }
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (DHW + kBlock - 1) / kBlock;
  std::vector<double> item_sums(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * K * DHW;
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      T block_sum = T(0);  // float partial sums over 4096 voxels, then double across blocks
      const int64_t end = std::min(DHW, (b + 1) * kBlock);
#pragma omp simd reduction(+ : block_sum)
      for (int64_t p = b * kBlock; p < end; ++p) {
        uint8_t argmin;
        const T v = descriptor_center(o + p, DHW, K, inv_box, subtract_min, argmin);
        variance[n * DHW + p] = v;
        flags[n * DHW + p] = argmin;
        block_sum += v;
      }
      sum += double(block_sum);
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
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, end = std::min(DHW, (b + 1) * kBlock);
      T* vc = variance + n * DHW;
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) vc[p] = descriptor_clamped_variance(vc[p], m, tiny, flags[n * DHW + p]);
      for (int k = 0; k < K; ++k) {  // channel-outer, so the exp vectorises
        T* ok = o + k * DHW;
#pragma omp simd
        for (int64_t p = begin; p < end; ++p) ok[p] = descriptor_value(ok[p], vc[p]);
      }
    }
  }
}

template <typename T, typename Upstream>
static void descriptor_backward_impl(const Upstream* upstream_per_item, const T* out, const T* vol,
                                     const T* variance, const uint8_t* flags, T* grad_vol, int64_t N, int64_t D,
                                     int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                     bool subtract_min, int threads) {
  const int64_t DHW = D * H * W;
  const T inv_box = T(1) / T(double(2 * radius + 1) * double(2 * radius + 1) * double(2 * radius + 1));
  const T tiny = std::numeric_limits<T>::min();
  std::vector<T> grad_box(N * K * DHW);
  for (int64_t n = 0; n < N; ++n) {
    const T* o = out + n * K * DHW;
    T* gb = grad_box.data() + n * K * DHW;
    const Upstream up = upstream_per_item[n];
    const T* var = variance + n * DHW;
    const uint8_t* flag = flags + n * DHW;
    constexpr int kLanes = 64;
    const int64_t full = DHW / kLanes;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < full; ++b)
      descriptor_backward_block<kLanes>(o, b * kLanes, DHW, K, var + b * kLanes, flag + b * kLanes, tiny, inv_box,
                                        subtract_min, up, gb);
    for (int64_t p = full * kLanes; p < DHW; ++p)
      descriptor_backward_voxel(o, p, DHW, K, var[p], flag[p], tiny, inv_box, subtract_min, up, gb);
  }
  // Tasks (item, channel, z-chunk) scatter into per-thread volumes, summed in thread order: the
  // result does not depend on scheduling, only on the thread count.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(D, (2 * threads + N * K - 1) / (N * K)));
  const int64_t tasks = N * K * chunks;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  std::vector<std::vector<T>> private_grads(parts);
#pragma omp parallel num_threads(parts)
  {
    const int tid = thread_id(), team = team_size();
    private_grads[tid].assign(N * DHW, T(0));
    BoxScratch<T> scratch(H, W, radius);
    int64_t begin, end;
    static_chunk(tasks, tid, team, begin, end);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nk = task / chunks, n = nk / K, k = nk % K;
      int64_t z_begin, z_end;
      static_chunk(D, static_cast<int>(task % chunks), static_cast<int>(chunks), z_begin, z_end);
      box_filtered_channel_backward(vol + n * DHW, grad_box.data() + nk * DHW, private_grads[tid].data() + n * DHW,
                                    z_begin, z_end, D, H, W, pairs + 6 * k, radius, dilation, scratch);
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
