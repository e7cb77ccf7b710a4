#include "gradreg/mind.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {
namespace {

// Bounds of the compiled core, as those of the Python wrappers (ops/_common.py). A larger radius only
// costs time (the box reads edge voxels), and a larger dilation changes nothing (below).
constexpr int kMaxRadius = 4096;
constexpr int kMaxDilation = 4096;

// Checks radius and dilation and returns the dilation to compute with. With replicate edges, every
// offset of a dilation >= (longest axis - 1) lands on the volume's edge, exactly as with that smaller
// dilation: using it keeps the map planes (extent + 2 dilations) to the volume's size.
inline int checked_dilation(int64_t D, int64_t H, int64_t W, int radius, int dilation) {
  if (radius < 0 || radius > kMaxRadius)
    throw std::invalid_argument("gradreg_fast._C: `radius` must be in [0, " + std::to_string(kMaxRadius) +
                                "], got " + std::to_string(radius));
  if (dilation < 1 || dilation > kMaxDilation)
    throw std::invalid_argument("gradreg_fast._C: `dilation` must be in [1, " + std::to_string(kMaxDilation) +
                                "], got " + std::to_string(dilation));
  if (D < 1 || H < 1 || W < 1)
    throw std::invalid_argument("gradreg_fast._C: sizes must be >= 1");
  const int64_t longest = std::max({D, H, W});
  return static_cast<int>(std::min<int64_t>(dilation, std::max<int64_t>(1, longest - 1)));
}

// out[x] = sum of rows[t][x] over t < kCount, for x < width: with the row count known at compile
// time the sum over t unrolls inside the vector loop over x, so each output costs kCount loads and
// one store.
template <int kCount, typename T>
void sum_rows_fixed(const T* const* rows, T* out, int64_t width) {
  const T* r[kCount];
  for (int t = 0; t < kCount; ++t) r[t] = rows[t];
#pragma omp simd
  for (int64_t x = 0; x < width; ++x) {
    T acc = r[0][x];
    for (int t = 1; t < kCount; ++t) acc += r[t][x];
    out[x] = acc;
  }
}

// out[x] = sum of rows[t][x] over t < count, for x < width. Counts up to 9 (box radius <= 4) take
// the unrolled form; longer lists build the sums up in an L1-resident chunk.
template <typename T>
void sum_rows(const T* const* rows, int count, T* out, int64_t width) {
  switch (count) {
    case 0: std::fill(out, out + width, T(0)); return;
    case 1: sum_rows_fixed<1>(rows, out, width); return;
    case 2: sum_rows_fixed<2>(rows, out, width); return;
    case 3: sum_rows_fixed<3>(rows, out, width); return;
    case 4: sum_rows_fixed<4>(rows, out, width); return;
    case 5: sum_rows_fixed<5>(rows, out, width); return;
    case 6: sum_rows_fixed<6>(rows, out, width); return;
    case 7: sum_rows_fixed<7>(rows, out, width); return;
    case 8: sum_rows_fixed<8>(rows, out, width); return;
    case 9: sum_rows_fixed<9>(rows, out, width); return;
    default: break;
  }
  constexpr int64_t kChunk = 512;
  T acc[kChunk];
  for (int64_t x0 = 0; x0 < width; x0 += kChunk) {
    const int64_t len = std::min(kChunk, width - x0);
    const T* first = rows[0] + x0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) acc[i] = first[i];
    for (int t = 1; t < count; ++t) {
      const T* row = rows[t] + x0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) acc[i] += row[i];
    }
    T* o = out + x0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] = acc[i];
  }
}

// out[x] = the sum of the rows added, for x < width. Rows are summed in batches of up to kMaxRows
// (a batch's sum becomes the next batch's first row), so any window length works.
template <typename T>
class RowSum {
 public:
  RowSum(T* out, int64_t width) : out_(out), width_(width) {}
  void add(const T* row) {
    rows_[count_++] = row;
    if (count_ == kMaxRows) {
      sum_rows(rows_, count_, out_, width_);
      rows_[0] = out_;
      count_ = 1;
    }
  }
  void finish() { sum_rows(rows_, count_, out_, width_); }

 private:
  static constexpr int kMaxRows = 64;
  const T* rows_[kMaxRows];
  int count_ = 0;
  T* out_;
  int64_t width_;
};

// out[x] = sum_{t=-r..r} in[x + t] for x in [lo, hi), all reads inside the line: the window as
// 2r+1 shifted rows, so the sums vectorise along x (a loop over t inside one over x does not).
template <typename T>
void window_sums(const T* in, T* out, int64_t lo, int64_t hi, int radius) {
  if (hi <= lo) return;
  RowSum<T> sum(out + lo, hi - lo);
  for (int t = -radius; t <= radius; ++t) sum.add(in + lo + t);
  sum.finish();
}

// out[i] = sum_{t=-r..r} in[clamp(i + t)] for i in [0, n), on `width` interleaved lines
// (element (i, x) at in[i * width + x]): the 1D replicate-padded box sum, vectorised over x.
template <typename T>
void box_sum_lines(const T* in, T* out, int64_t n, int64_t width, int radius) {
  for (int64_t i = 0; i < n; ++i) {
    RowSum<T> sum(out + i * width, width);
    for (int t = -radius; t <= radius; ++t) sum.add(in + clamp_index(i + t, n) * width);
    sum.finish();
  }
}

// Row q of the adjoint of box_sum_lines: out[x] = sum_i in[i, x] * #{t : clamp(i + t) = q}, i.e.
// the sum over the padded positions j that replicate q of the window sums around j. `in` holds
// lines first, first + 1, ... (every line the window around q reaches).
template <typename T>
void box_sum_lines_adjoint_at(const T* in, T* out, int64_t q, int64_t n, int64_t width, int radius,
                              int64_t first = 0) {
  RowSum<T> sum(out, width);
  const int64_t j_first = q == 0 ? -radius : q, j_last = q == n - 1 ? n - 1 + radius : q;
  for (int64_t j = j_first; j <= j_last; ++j)
    for (int64_t i = std::max<int64_t>(0, j - radius); i <= std::min<int64_t>(n - 1, j + radius); ++i)
      sum.add(in + (i - first) * width);
  sum.finish();
}

// Element q of the adjoint of the 1D replicate-padded box sum of one line g of length n (the
// single-line case of box_sum_lines_adjoint_at, written out for the ends of short rows).
template <typename T>
T box_adjoint_at(const T* g, int64_t q, int64_t n, int radius) {
  T acc = T(0);
  for (int64_t i = std::max<int64_t>(0, q - radius); i <= std::min<int64_t>(n - 1, q + radius); ++i) acc += g[i];
  if (q == 0)  // the window around i reaches r - i positions left of 0, all clamped to 0
    for (int64_t i = 0; i < std::min<int64_t>(n, radius); ++i) acc += g[i] * T(radius - i);
  if (q == n - 1)  // and r - (n - 1 - i) positions right of n - 1
    for (int64_t i = std::max<int64_t>(0, n - radius); i < n; ++i) acc += g[i] * T(radius - (n - 1 - i));
  return acc;
}

template <typename T>
void box_sum_lines_adjoint(const T* in, T* out, int64_t n, int64_t width, int radius) {
  for (int64_t q = 0; q < n; ++q) box_sum_lines_adjoint_at(in, out + q * width, q, n, width, radius);
}

// Per-thread scratch of the backward of one channel's separable box filter.
template <typename T>
struct BoxScratch {
  std::vector<T> line, line_grad, plane, plane_grad;
  BoxScratch(int64_t H, int64_t W)
      : line(W), line_grad(W), plane(checked_count({H, W})), plane_grad(checked_count({H, W})) {}
};

// [lo, hi): the x for which x + shift stays inside [0, W) for both shifts.
inline void inside_range(int64_t W, int64_t shift_a, int64_t shift_b, int64_t& lo, int64_t& hi) {
  lo = std::min<int64_t>(W, std::max<int64_t>({0, -shift_a, -shift_b}));
  hi = std::max<int64_t>(lo, std::min<int64_t>({W, W - shift_a, W - shift_b}));
}

// The squared-difference maps behind the channels. Channel k is (I[c(x + d a_k)] - I[c(x + d b_k)])^2,
// c clamping each axis; pairs with a - b = +-e give the same function of x shifted by a constant:
// with f_e(y) = (I[c(y + u)] - I[c(y + v)])^2, u - v = d e, channel k = f_e(x + s_k) exactly, for
// every x, because the clamps apply after the shift. So MIND-SSC's 12 channels read 6 maps (MIND's
// 6 read 3), and each map value is computed once. The box filters stay per channel: the reference
// replicate-pads each channel, which makes channels of one map differ near the faces.
struct ChannelSource {
  int map;             // index into the maps
  int64_t sz, sy, sx;  // the channel's shift s_k, in voxels
};

struct DescriptorMaps {
  std::vector<int> oriented;  // per map: 6 ints, the (a, b) pair whose f it is (u = d a, v = d b), oriented
                              // so that a - b is canonical
  std::vector<ChannelSource> channel;
  std::vector<int> tie_rank;  // per channel: which of equal minima carries the gradient (mind.h)
  int64_t shift_lo[3] = {0, 0, 0}, shift_hi[3] = {0, 0, 0};  // range of s over channels, per axis

  int count() const { return static_cast<int>(oriented.size() / 6); }
  const int* pair(int map) const { return oriented.data() + 6 * map; }
};

// `pairs` is the table of ops/mind_tables.py: 6 ints per channel, then K tie ranks.
inline DescriptorMaps descriptor_maps(const int* pairs, int K, int dilation) {
  DescriptorMaps maps;
  maps.tie_rank.assign(pairs + 6 * K, pairs + 7 * K);
  std::vector<int> sorted_ranks(maps.tie_rank);
  std::sort(sorted_ranks.begin(), sorted_ranks.end());
  for (int k = 0; k < K; ++k)
    if (sorted_ranks[k] != k)
      throw std::invalid_argument("gradreg_fast._C: the tie ranks of the pair table must be a permutation of 0.." +
                                  std::to_string(K - 1));
  for (int k = 0; k < K; ++k) {
    const int* pair = pairs + 6 * k;
    int e[3] = {pair[0] - pair[3], pair[1] - pair[4], pair[2] - pair[5]};
    const int first = e[0] != 0 ? e[0] : (e[1] != 0 ? e[1] : e[2]);
    // Orient (a, b) so that a - b has a positive first nonzero component: (I[a] - I[b])^2 is symmetric.
    const bool swap = first < 0;
    const int a[3] = {swap ? pair[3] : pair[0], swap ? pair[4] : pair[1], swap ? pair[5] : pair[2]};
    const int b[3] = {swap ? pair[0] : pair[3], swap ? pair[1] : pair[4], swap ? pair[2] : pair[5]};
    int found = -1;
    for (int j = 0; j < maps.count(); ++j) {
      const int* o = maps.pair(j);
      if (o[0] - o[3] == a[0] - b[0] && o[1] - o[4] == a[1] - b[1] && o[2] - o[5] == a[2] - b[2]) found = j;
    }
    if (found < 0) {
      found = maps.count();
      maps.oriented.insert(maps.oriented.end(), {a[0], a[1], a[2], b[0], b[1], b[2]});
    }
    const int* o = maps.pair(found);
    ChannelSource source{found, int64_t(dilation) * (a[0] - o[0]), int64_t(dilation) * (a[1] - o[1]),
                         int64_t(dilation) * (a[2] - o[2])};
    const int64_t shift[3] = {source.sz, source.sy, source.sx};
    for (int axis = 0; axis < 3; ++axis) {
      maps.shift_lo[axis] = std::min(maps.shift_lo[axis], shift[axis]);
      maps.shift_hi[axis] = std::max(maps.shift_hi[axis], shift[axis]);
    }
    maps.channel.push_back(source);
  }
  return maps;
}

// Per-thread state of the streaming forward: for each channel a ring of its 2r+1 latest xy-box
// planes, and one plane of one map over the rows and columns that any channel reads.
// Allocated before the parallel region that uses it (an exception must not leave an OpenMP region).
template <typename T>
struct ForwardScratch {
  int64_t rows, cols;  // the map plane's extent
  std::vector<T> map_plane, x_boxed;
  std::vector<T> rings;
  std::vector<int64_t> emitted;  // per channel: the next output plane box_and_center emits
  ForwardScratch(const DescriptorMaps& maps, int K, int64_t H, int64_t W, int radius)
      : rows(H + maps.shift_hi[1] - maps.shift_lo[1]),
        cols(W + maps.shift_hi[2] - maps.shift_lo[2]),
        map_plane(checked_count({rows, cols})),
        x_boxed(checked_count({H, W})),
        rings(checked_count({int64_t(K), 2 * int64_t(radius) + 1, H, W})),
        emitted(K) {}
};

// f of one map on source plane Zs, rows Ys in [shift_lo_y, H - 1 + shift_hi_y], columns likewise.
template <typename T>
void map_plane(const T* vol, const int* pair, int64_t Zs, int64_t D, int64_t H, int64_t W, int dilation,
               const DescriptorMaps& maps, ForwardScratch<T>& s) {
  const int64_t HW = H * W, x0 = maps.shift_lo[2];
  const int64_t shift_a = int64_t(dilation) * pair[2], shift_b = int64_t(dilation) * pair[5];
  // Columns X (= x0 + i) whose two reads X + shift stay inside [0, W): no clamping there.
  const int64_t lo = std::min<int64_t>(s.cols, std::max<int64_t>({0, -shift_a - x0, -shift_b - x0}));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>({s.cols, W - shift_a - x0, W - shift_b - x0}));
  for (int64_t r = 0; r < s.rows; ++r) {
    const int64_t Ys = maps.shift_lo[1] + r;
    T* f = s.map_plane.data() + r * s.cols;
    for (int64_t i = 0; i < lo; ++i) f[i] = descriptor_squared_difference(vol, Zs, Ys, x0 + i, D, H, W, pair, dilation);
    const T* row_a = vol + clamp_index(Zs + dilation * pair[0], D) * HW + clamp_index(Ys + dilation * pair[1], H) * W;
    const T* row_b = vol + clamp_index(Zs + dilation * pair[3], D) * HW + clamp_index(Ys + dilation * pair[4], H) * W;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const T d = row_a[x0 + i + shift_a] - row_b[x0 + i + shift_b];
      f[i] = d * d;
    }
    for (int64_t i = hi; i < s.cols; ++i)
      f[i] = descriptor_squared_difference(vol, Zs, Ys, x0 + i, D, H, W, pair, dilation);
  }
}

// The xy-box plane z' = Zs - sz of one channel from its map's plane Zs: x-box (replicate-padded in
// the channel's own frame: columns c(x + t) + sx), then y-box, into `dst`.
template <typename T>
void channel_xy_plane(const ChannelSource& source, const DescriptorMaps& maps, int64_t H, int64_t W, int radius,
                      ForwardScratch<T>& s, T* dst) {
  const int64_t x_lo = std::min<int64_t>(radius, W), x_hi = std::max<int64_t>(x_lo, W - radius);
  const int64_t column0 = source.sx - maps.shift_lo[2];  // map column of the channel's x = 0
  for (int64_t y = 0; y < H; ++y) {
    const T* f = s.map_plane.data() + (y + source.sy - maps.shift_lo[1]) * s.cols + column0;
    T* row = s.x_boxed.data() + y * W;
    for (int64_t x = 0; x < x_lo; ++x) {
      T acc = T(0);
      for (int t = -radius; t <= radius; ++t) acc += f[clamp_index(x + t, W)];
      row[x] = acc;
    }
    window_sums(f, row, x_lo, x_hi, radius);
    for (int64_t x = x_hi; x < W; ++x) {
      T acc = T(0);
      for (int t = -radius; t <= radius; ++t) acc += f[clamp_index(x + t, W)];
      row[x] = acc;
    }
  }
  box_sum_lines(s.x_boxed.data(), dst, H, W, radius);
}

// Where box_and_center keeps the K centred planes: the whole (K, D, H, W) output, or a ring of a
// few planes per channel when they are consumed as soon as they are centred.
template <typename T>
struct PlaneStore {
  T* data;
  int64_t HW, channel_stride;
  int64_t ring_planes;  // 0: plane z is at z
  T* plane(int k, int64_t z) const { return data + k * channel_stride + (ring_planes ? z % ring_planes : z) * HW; }
};

// Planes a ring must hold: a channel runs at most max(sz) - min(sz) planes ahead of the slowest one,
// and at the last source plane each channel emits up to r + 1 planes at once.
inline int64_t ring_planes_needed(const DescriptorMaps& maps, int radius) {
  return maps.shift_hi[0] - maps.shift_lo[0] + radius + 2;
}

struct NoPlaneCallback {
  template <typename T>
  void operator()(int64_t, const T*, int64_t) const {}
};

// Box sums of every channel for the output planes [z_begin, z_end) of one item, centred (minimum
// subtracted, variance and argmin stored) plane by plane while the K planes are still in cache, then
// handed to on_plane(z, channel 0's plane, channel stride). Returns the sum of the variances. Map
// planes are streamed by source plane Zs; channel k turns plane Zs into its xy-box plane Zs - sz_k,
// and emits output plane z once it holds plane z + r.
template <typename T, typename OnPlane = NoPlaneCallback>
double box_and_center(const T* vol, const PlaneStore<T>& store, T* variance, uint8_t* flags, int64_t z_begin,
                      int64_t z_end, int64_t D, int64_t H, int64_t W, const DescriptorMaps& maps, int K, int radius,
                      int dilation, bool subtract_min, ForwardScratch<T>& s, const OnPlane& on_plane = OnPlane()) {
  const int64_t HW = H * W, slots = 2 * radius + 1;
  const T inv_box = T(1) / T(double(slots) * double(slots) * double(slots));
  const int64_t need_lo = std::max<int64_t>(0, z_begin - radius), need_hi = std::min<int64_t>(D - 1, z_end - 1 + radius);
  std::vector<int64_t>& emitted = s.emitted;
  std::fill(emitted.begin(), emitted.end(), z_begin);
  const int* tie_rank = maps.tie_rank.data();
  int64_t centred = z_begin;
  double sum = 0.0;
  const int map_count = maps.count();
  for (int64_t Zs = need_lo + maps.shift_lo[0]; Zs <= need_hi + maps.shift_hi[0]; ++Zs) {
    for (int j = 0; j < map_count; ++j) {
      bool plane_ready = false;
      for (int k = 0; k < K; ++k) {
        const ChannelSource& source = maps.channel[k];
        const int64_t zc = Zs - source.sz;  // the channel's plane
        if (source.map != j || zc < need_lo || zc > need_hi) continue;
        if (!plane_ready) {
          map_plane(vol, maps.pair(j), Zs, D, H, W, dilation, maps, s);
          plane_ready = true;
        }
        T* ring = s.rings.data() + static_cast<size_t>(k) * slots * HW;
        channel_xy_plane(source, maps, H, W, radius, s, ring + (zc % slots) * HW);
        // Emit every output plane whose window [z - r, z + r] (clamped) is now complete.
        for (int64_t& z = emitted[k]; z < z_end && std::min<int64_t>(D - 1, z + radius) <= zc; ++z) {
          RowSum<T> sum(store.plane(k, z), HW);
          for (int t = -radius; t <= radius; ++t) sum.add(ring + (clamp_index(z + t, D) % slots) * HW);
          sum.finish();
        }
      }
    }
    const int64_t all_emitted = *std::min_element(emitted.begin(), emitted.end());
    for (; centred < all_emitted; ++centred) {
      T* plane = store.plane(0, centred);
      T* var = variance + centred * HW;
      uint8_t* flag = flags + centred * HW;
      T plane_sum = T(0);  // partial sums in T over one plane, then double across planes
#pragma omp simd reduction(+ : plane_sum)
      for (int64_t i = 0; i < HW; ++i) {
        uint8_t argmin;
        const T v = descriptor_center(plane + i, store.channel_stride, K, inv_box, subtract_min, tie_rank, argmin);
        var[i] = v;
        flag[i] = argmin;
        plane_sum += v;
      }
      sum += double(plane_sum);
      on_plane(centred, static_cast<const T*>(plane), store.channel_stride);
    }
  }
  return sum;
}

// grad_vol += d/dvol of sum over z in [z_begin, z_end) of the adjoint-box-filtered grad_box
// times the squared difference of one pair: each plane of the adjoint is formed on the fly
// (z, then y, then x), then scattered into the two voxels the squared difference read. grad_box
// holds the planes from `first` on (those the z-windows around [z_begin, z_end) reach).
template <typename T>
void box_filtered_channel_backward(const T* vol, const T* grad_box, int64_t first, T* grad_vol, int64_t z_begin,
                                   int64_t z_end, int64_t D, int64_t H, int64_t W, const int* pair, int radius,
                                   int dilation, BoxScratch<T>& s) {
  const int64_t HW = H * W;
  const int64_t shift_a = int64_t(dilation) * pair[2], shift_b = int64_t(dilation) * pair[5];
  int64_t lo, hi;
  inside_range(W, shift_a, shift_b, lo, hi);
  const int64_t x_lo = std::min<int64_t>(radius + 1, W), x_hi = std::max<int64_t>(x_lo, W - radius - 1);
  for (int64_t z = z_begin; z < z_end; ++z) {
    box_sum_lines_adjoint_at(grad_box, s.plane.data(), z, D, HW, radius, first);
    box_sum_lines_adjoint(s.plane.data(), s.plane_grad.data(), H, W, radius);
    for (int64_t y = 0; y < H; ++y) {
      const T* g = s.plane_grad.data() + y * W;
      T* gx = s.line_grad.data();
      for (int64_t x = 0; x < x_lo; ++x) gx[x] = box_adjoint_at(g, x, W, radius);
      window_sums(g, gx, x_lo, x_hi, radius);  // away from both ends: a plain window sum
      for (int64_t x = x_hi; x < W; ++x) gx[x] = box_adjoint_at(g, x, W, radius);

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

// The descriptor up to its last step: `patches` gets the centred box means (minimum subtracted),
// `variance` their mean over the channels (not yet clamped), `flags` the argmin; returns m per item.
template <typename T>
std::vector<T> descriptor_patches(const T* vol, T* patches, T* variance, uint8_t* flags, int64_t N, int64_t D,
                                  int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                  bool subtract_min, bool per_item, int threads) {
  const int64_t DHW = D * H * W;
  dilation = checked_dilation(D, H, W, radius, dilation);
  const DescriptorMaps maps = descriptor_maps(pairs, K, dilation);
  // Tasks are (item, z-chunk), at least one per thread. Each chunk recomputes the r planes on either
  // side of it, so no more chunks than that. The variance sums are kept per task and added in task
  // order: m does not depend on scheduling.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(D, (threads + N - 1) / N));
  std::vector<double> task_sums(N * chunks, 0.0);
  const int team = static_cast<int>(std::min<int64_t>(threads, N * chunks));
  std::vector<ForwardScratch<T>> scratches;
  scratches.reserve(team);
  for (int t = 0; t < team; ++t) scratches.emplace_back(maps, K, H, W, radius);
#pragma omp parallel num_threads(team)
  {
    ForwardScratch<T>& scratch = scratches[thread_id()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < N * chunks; ++task) {
      const int64_t n = task / chunks;
      int64_t z_begin, z_end;
      static_chunk(D, static_cast<int>(task % chunks), static_cast<int>(chunks), z_begin, z_end);
      const PlaneStore<T> store{patches + n * K * DHW, H * W, DHW, 0};
      task_sums[task] = box_and_center(vol + n * DHW, store, variance + n * DHW, flags + n * DHW, z_begin, z_end, D,
                                       H, W, maps, K, radius, dilation, subtract_min, scratch);
    }
  }
  std::vector<double> item_sums(N, 0.0);
  for (int64_t task = 0; task < N * chunks; ++task) item_sums[task / chunks] += task_sums[task];
  double total = 0.0;
  for (double item_sum : item_sums) total += item_sum;
  std::vector<T> m(N);
  for (int64_t n = 0; n < N; ++n) m[n] = per_item ? T(item_sums[n] / double(DHW)) : T(total / double(N * DHW));
  return m;
}

constexpr int64_t kFinishBlock = 4096;

template <typename T>
void descriptor_forward(const T* vol, T* out, T* variance, uint8_t* flags, int64_t N, int64_t D, int64_t H,
                        int64_t W, const int* pairs, int K, int radius, int dilation, bool subtract_min,
                        bool per_item, int threads) {
  const int64_t DHW = D * H * W, blocks = (DHW + kFinishBlock - 1) / kFinishBlock;
  const std::vector<T> m = descriptor_patches(vol, out, variance, flags, N, D, H, W, pairs, K, radius, dilation,
                                              subtract_min, per_item, threads);
  const T tiny = std::numeric_limits<T>::min();
  for (int64_t n = 0; n < N; ++n) {
    T* o = out + n * K * DHW;
    T* vc = variance + n * DHW;
    uint8_t* flag = flags + n * DHW;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kFinishBlock, end = std::min(DHW, (b + 1) * kFinishBlock);
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) vc[p] = descriptor_clamped_variance(vc[p], m[n], tiny, flag[p]);
      for (int k = 0; k < K; ++k) {  // channel-outer, so the exp vectorises
        T* ok = o + k * DHW;
#pragma omp simd
        for (int64_t p = begin; p < end; ++p) ok[p] = descriptor_value(ok[p], vc[p]);
      }
    }
  }
}

template <typename T>
double descriptor_penalty(const T* fixed, const T* out, T* derivative, T* variance, uint8_t* flags, int64_t N,
                          int64_t D, int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                          bool subtract_min, bool per_item, bool squared, int threads) {
  const int64_t DHW = D * H * W, blocks = (DHW + kFinishBlock - 1) / kFinishBlock;
  const std::vector<T> m = descriptor_patches(fixed, derivative, variance, flags, N, D, H, W, pairs, K, radius,
                                              dilation, subtract_min, per_item, threads);
  const T tiny = std::numeric_limits<T>::min();
  std::vector<double> block_sums(N * blocks, 0.0);  // added in order below: the sum is deterministic
  for (int64_t n = 0; n < N; ++n) {
    const T* o = out + n * K * DHW;
    T* g = derivative + n * K * DHW;
    const T* var = variance + n * DHW;
    uint8_t* flag = flags + n * DHW;  // scratch: the clamp's flag bit may be set here
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kFinishBlock, end = std::min(DHW, (b + 1) * kFinishBlock);
      T vc[kFinishBlock];
#pragma omp simd
      for (int64_t p = begin; p < end; ++p) vc[p - begin] = descriptor_clamped_variance(var[p], m[n], tiny, flag[p]);
      T sum = T(0);  // partial sums in T over one block
      for (int k = 0; k < K; ++k) {
        const T* ok = o + k * DHW;
        T* gk = g + k * DHW;
        if (squared) {
#pragma omp simd reduction(+ : sum)
          for (int64_t p = begin; p < end; ++p) {
            const T d = ok[p] - descriptor_value(gk[p], vc[p - begin]);
            sum += d * d;
            gk[p] = T(2) * d;
          }
        } else {
#pragma omp simd reduction(+ : sum)
          for (int64_t p = begin; p < end; ++p) {
            const T d = ok[p] - descriptor_value(gk[p], vc[p - begin]);
            sum += std::abs(d);
            gk[p] = (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
          }
        }
      }
      block_sums[n * blocks + b] = double(sum);
    }
  }
  double total = 0.0;
  for (double block_sum : block_sums) total += block_sum;
  return total;
}

template <typename T>
double descriptor_penalty_streamed(const T* fixed, const T* out, T* variance, uint8_t* flags, int64_t N, int64_t D,
                                   int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                   bool subtract_min, bool per_item, bool squared, int threads) {
  const int64_t HW = H * W, DHW = D * HW;
  dilation = checked_dilation(D, H, W, radius, dilation);
  const DescriptorMaps maps = descriptor_maps(pairs, K, dilation);
  const int64_t ring = ring_planes_needed(maps, radius);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(D, (threads + N - 1) / N));
  std::vector<double> variance_sums(N * chunks, 0.0), penalty_sums(N * chunks, 0.0);
  std::vector<T> m(N);
  const T tiny = std::numeric_limits<T>::min();
  const int team = static_cast<int>(std::min<int64_t>(threads, N * chunks));
  std::vector<ForwardScratch<T>> scratches;
  std::vector<std::vector<T>> plane_rings(team);
  scratches.reserve(team);
  for (int t = 0; t < team; ++t) {
    scratches.emplace_back(maps, K, H, W, radius);
    plane_rings[t].resize(checked_count({int64_t(K), ring, HW}));
  }
  for (int pass = 0; pass < 2; ++pass) {
#pragma omp parallel num_threads(team)
    {
      ForwardScratch<T>& scratch = scratches[thread_id()];
      const PlaneStore<T> store{plane_rings[thread_id()].data(), HW, ring * HW, ring};
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < N * chunks; ++task) {
        const int64_t n = task / chunks;
        int64_t z_begin, z_end;
        static_chunk(D, static_cast<int>(task % chunks), static_cast<int>(chunks), z_begin, z_end);
        const T* vol = fixed + n * DHW;
        T* var = variance + n * DHW;
        uint8_t* flag = flags + n * DHW;
        if (pass == 0) {  // the variances, for m
          variance_sums[task] = box_and_center(vol, store, var, flag, z_begin, z_end, D, H, W, maps, K, radius,
                                               dilation, subtract_min, scratch);
          continue;
        }
        // The same planes again, each turned into descriptor values and compared as soon as it is centred.
        const T* warped = out + n * K * DHW;
        double penalty = 0.0;
        auto compare = [&](int64_t z, const T* plane, int64_t channel_stride) {
          T vc[kFinishBlock];
          for (int64_t i0 = 0; i0 < HW; i0 += kFinishBlock) {
            const int64_t len = std::min(kFinishBlock, HW - i0);
#pragma omp simd
            for (int64_t i = 0; i < len; ++i)  // flag is scratch here: the clamp may set its bit
              vc[i] = descriptor_clamped_variance(var[z * HW + i0 + i], m[n], tiny, flag[z * HW + i0 + i]);
            T sum = T(0);
            for (int k = 0; k < K; ++k) {
              const T* patch = plane + k * channel_stride + i0;
              const T* o = warped + k * DHW + z * HW + i0;
#pragma omp simd reduction(+ : sum)
              for (int64_t i = 0; i < len; ++i) {
                const T d = o[i] - descriptor_value(patch[i], vc[i]);
                sum += squared ? d * d : std::abs(d);
              }
            }
            penalty += double(sum);
          }
        };
        box_and_center(vol, store, var, flag, z_begin, z_end, D, H, W, maps, K, radius, dilation, subtract_min,
                       scratch, compare);
        penalty_sums[task] = penalty;
      }
    }
    if (pass == 0) {
      std::vector<double> item_sums(N, 0.0);
      for (int64_t task = 0; task < N * chunks; ++task) item_sums[task / chunks] += variance_sums[task];
      double total = 0.0;
      for (double item_sum : item_sums) total += item_sum;
      for (int64_t n = 0; n < N; ++n) m[n] = per_item ? T(item_sums[n] / double(DHW)) : T(total / double(N * DHW));
    }
  }
  double total = 0.0;
  for (double penalty : penalty_sums) total += penalty;
  return total;
}

template <typename T, typename Upstream>
static void descriptor_backward_impl(const Upstream* upstream_per_item, const T* out, const T* vol,
                                     const T* variance, const uint8_t* flags, T* grad_vol, int64_t N, int64_t D,
                                     int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                     bool subtract_min, int threads) {
  const int64_t HW = H * W, DHW = D * HW;
  dilation = checked_dilation(D, H, W, radius, dilation);
  const T inv_box = T(1) / T(double(2 * radius + 1) * double(2 * radius + 1) * double(2 * radius + 1));
  const T tiny = std::numeric_limits<T>::min();
  // The volume goes by slabs of output planes. A slab's gradient w.r.t. the box sums (K channels, the
  // slab plus the r planes its z-windows reach on either side) is formed first, then each channel's
  // adjoint box filter and scatter run over the slab. The halo planes are formed twice, but the
  // buffer is K x (slab + 2r) planes instead of K x D (127 MiB at 144x144x128), and stays in cache.
  const int64_t slab = std::max<int64_t>(4 * radius, 16);
  const int64_t halo_planes = std::min<int64_t>(D, slab + 2 * radius);
  // every element used is written first
  std::unique_ptr<T[]> grad_box(new T[checked_count({int64_t(K), halo_planes, HW})]);
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, K)));
  // Scatters go to per-thread volumes, summed in thread order at the end: the result does not depend
  // on scheduling, only on the thread count. All scratch exists before any parallel region.
  std::vector<std::vector<T>> private_grads(parts);
  for (int t = 0; t < parts; ++t) private_grads[t].assign(checked_count({N, DHW}), T(0));
  std::vector<BoxScratch<T>> box_scratches;
  box_scratches.reserve(parts);
  for (int t = 0; t < parts; ++t) box_scratches.emplace_back(H, W);
  constexpr int kLanes = 512;  // long runs per channel stream: the strided streams then prefetch well
  for (int64_t n = 0; n < N; ++n) {
    const T* o = out + n * K * DHW;
    const Upstream up = upstream_per_item[n];
    for (int64_t z0 = 0; z0 < D; z0 += slab) {
      const int64_t z1 = std::min(D, z0 + slab);
      const int64_t first = std::max<int64_t>(0, z0 - radius), last = std::min<int64_t>(D, z1 + radius);
      const int64_t p0 = first * HW, count = (last - first) * HW;
      // grad_box of planes [first, last), channel stride `count` (the block reads out at stride DHW).
      const int64_t full = count / kLanes;
#pragma omp parallel for schedule(static) num_threads(threads)
      for (int64_t b = 0; b <= full; ++b) {
        const int64_t begin = b * kLanes, end = std::min(count, begin + kLanes);
        if (end - begin == kLanes) {
          descriptor_backward_block<kLanes>(o, p0 + begin, DHW, K, variance + n * DHW + p0 + begin,
                                            flags + n * DHW + p0 + begin, tiny, inv_box, subtract_min, up,
                                            grad_box.get() + begin, count);
        } else {
          for (int64_t i = begin; i < end; ++i)
            descriptor_backward_block<1>(o, p0 + i, DHW, K, variance + n * DHW + p0 + i, flags + n * DHW + p0 + i,
                                         tiny, inv_box, subtract_min, up, grad_box.get() + i, count);
        }
      }
#pragma omp parallel num_threads(parts)
      {
        const int tid = thread_id(), team = team_size();
        BoxScratch<T>& scratch = box_scratches[tid];
        int64_t begin, end;
        static_chunk(K, tid, team, begin, end);
        for (int64_t k = begin; k < end; ++k)
          box_filtered_channel_backward(vol + n * DHW, grad_box.get() + k * count, first,
                                        private_grads[tid].data() + n * DHW, z0, z1, D, H, W, pairs + 6 * k,
                                        radius, dilation, scratch);
      }
    }
  }
#pragma omp parallel num_threads(parts)
  {
    int64_t b, e;
    static_chunk(N * DHW, thread_id(), team_size(), b, e);
    for (int64_t i = b; i < e; ++i) {
      T acc = T(0);
      for (int t = 0; t < parts; ++t) acc += private_grads[t][i];
      grad_vol[i] = acc;
    }
  }
}

template <typename T>
void descriptor_backward(const T* grad_out, T scale, const T* out, const T* vol, const T* variance,
                         const uint8_t* flags, T* grad_vol, int64_t N, int64_t D, int64_t H, int64_t W,
                         const int* pairs, int K, int radius, int dilation, bool subtract_min, int threads) {
  std::vector<UpstreamFromScaledTensor<T>> up(N);
  for (int64_t n = 0; n < N; ++n) up[n] = UpstreamFromScaledTensor<T>{grad_out + n * K * D * H * W, scale};
  descriptor_backward_impl(up.data(), out, vol, variance, flags, grad_vol, N, D, H, W, pairs, K, radius, dilation,
                           subtract_min, threads);
}

template <typename T>
double penalty_derivative(const T* a, const T* b, T* derivative, int64_t numel, bool squared, int threads) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    T block_sum = T(0);  // partial sums in T over 4096 elements, then double across blocks
    const int64_t end = std::min(numel, (blk + 1) * kBlock);
    if (squared) {
#pragma omp simd reduction(+ : block_sum)
      for (int64_t i = blk * kBlock; i < end; ++i) {
        const T d = a[i] - b[i];
        block_sum += d * d;
        derivative[i] = T(2) * d;
      }
    } else {  // two loops: with one, GCC keeps the l1 branch scalar (14x slower)
#pragma omp simd reduction(+ : block_sum)
      for (int64_t i = blk * kBlock; i < end; ++i) {
        const T d = a[i] - b[i];
        block_sum += std::abs(d);
        derivative[i] = (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
      }
    }
    sum += double(block_sum);
  }
  return sum;
}

#define GRADREG_INSTANTIATE(T)                                                                                 \
  template void descriptor_forward<T>(const T*, T*, T*, uint8_t*, int64_t, int64_t, int64_t, int64_t, const int*, \
                                      int, int, int, bool, bool, int);                                         \
  template void descriptor_backward<T>(const T*, T, const T*, const T*, const T*, const uint8_t*, T*, int64_t,    \
                                       int64_t, int64_t, int64_t, const int*, int, int, int, bool, int);         \
  template double penalty_derivative<T>(const T*, const T*, T*, int64_t, bool, int);                      \
  template double descriptor_penalty<T>(const T*, const T*, T*, T*, uint8_t*, int64_t, int64_t, int64_t, int64_t,  \
                                        const int*, int, int, int, bool, bool, bool, int);                     \
  template double descriptor_penalty_streamed<T>(const T*, const T*, T*, uint8_t*, int64_t, int64_t, int64_t,      \
                                                 int64_t, const int*, int, int, int, bool, bool, bool, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
