#include "gradreg/box_mean.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace box_mean_detail {

// Output row o (length len) of the 1D mean (or adjoint) along D or H at coordinate i of n, from the rows
// before, at and after it (`before` / `after` unused at an edge). The branch on i sits outside the loops,
// so each loop vectorises.
template <typename T>
void combine_rows(const T* before, const T* at, const T* after, T* o, int64_t len, int64_t i, int64_t n,
                  bool adjoint) {
  if (!adjoint) {
    if (i == 0) {
      GR_SIMD
      for (int64_t x = 0; x < len; ++x) o[x] = box_mean_edge(at[x], after[x]);
    } else if (i == n - 1) {
      GR_SIMD
      for (int64_t x = 0; x < len; ++x) o[x] = box_mean_edge(before[x], at[x]);
    } else {
      GR_SIMD
      for (int64_t x = 0; x < len; ++x) o[x] = box_mean_inner(before[x], at[x], after[x]);
    }
    return;
  }
  const T centre = T(box_count(i, n));
  if (i == 0) {
    const T next = T(box_count(1, n));
    GR_SIMD
    for (int64_t x = 0; x < len; ++x) o[x] = box_adjoint_edge(at[x], centre, after[x], next);
  } else if (i == n - 1) {
    const T previous = T(box_count(n - 2, n));
    GR_SIMD
    for (int64_t x = 0; x < len; ++x) o[x] = box_adjoint_edge(before[x], previous, at[x], centre);
  } else {
    const T previous = T(box_count(i - 1, n)), next = T(box_count(i + 1, n));
    GR_SIMD
    for (int64_t x = 0; x < len; ++x) o[x] = box_adjoint_inner(before[x], previous, at[x], centre, after[x], next);
  }
}

// Along W inside one row: the first and last two elements through the general form, the rest with the
// interior's constant counts, vectorised.
template <typename T>
void combine_along_row(const T* r, T* o, int64_t W, bool adjoint) {
  const int64_t lo = std::min<int64_t>(2, W), hi = std::max<int64_t>(lo, W - 2);
  for (int64_t x = 0; x < lo; ++x) o[x] = box_axis(r + x, x, W, int64_t(1), adjoint);
  if (!adjoint) {
    GR_SIMD
    for (int64_t x = lo; x < hi; ++x) o[x] = box_mean_inner(r[x - 1], r[x], r[x + 1]);
  } else {
    const T three = T(3);
    GR_SIMD
    for (int64_t x = lo; x < hi; ++x) o[x] = box_adjoint_inner(r[x - 1], three, r[x], three, r[x + 1], three);
  }
  for (int64_t x = hi; x < W; ++x) o[x] = box_axis(r + x, x, W, int64_t(1), adjoint);
}

// Row (z, y) of one channel: dst = the 1D mean (or adjoint) of src along `axis` (0: D, 1: H, 2: W) there; at
// an edge the missing neighbour is never read, and the row itself stands in for its pointer.
template <typename T>
void stage_row(const T* src, T* dst, int64_t D, int64_t H, int64_t W, int axis, bool adjoint, int64_t z, int64_t y) {
  const int64_t HW = H * W, row = z * HW + y * W;
  const T* at = src + row;
  if (axis == 0)
    combine_rows(z > 0 ? at - HW : at, at, z < D - 1 ? at + HW : at, dst + row, W, z, D, adjoint);
  else if (axis == 1)
    combine_rows(y > 0 ? at - W : at, at, y < H - 1 ? at + W : at, dst + row, W, y, H, adjoint);
  else
    combine_along_row(at, dst + row, W, adjoint);
}

// One channel: dst = the 1D mean (or adjoint) of src along `axis`. Along D a plane is one long row to combine
// (~10 % faster on the cost volume than row by row); along H and W, row by row.
template <typename T>
void stage(const T* src, T* dst, int64_t D, int64_t H, int64_t W, int axis, bool adjoint) {
  const int64_t HW = H * W;
  for (int64_t z = 0; z < D; ++z) {
    if (axis == 0) {
      const T* s = src + z * HW;
      combine_rows(z > 0 ? s - HW : s, s, z < D - 1 ? s + HW : s, dst + z * HW, HW, z, D, adjoint);
    } else {
      for (int64_t y = 0; y < H; ++y) stage_row(src, dst, D, H, W, axis, adjoint, z, y);
    }
  }
}

}  // namespace box_mean_detail

// Stages: the axes longer than one voxel, D, H, W, `passes` times (the adjoint runs them in reverse). Each
// stage reads the previous one's result; they alternate between `out` and a scratch buffer so that the last
// lands in `out` (stage 0 reads `in`). With many channels each thread takes whole channels through every
// stage while a channel stays in its cache (the cost volume's hundreds of channels); a large volume of few
// channels has all threads share each stage row by row, and a small one runs on one thread.
template <typename T>
void box_mean(const T* in, T* out, int64_t NC, int64_t D, int64_t H, int64_t W, int passes, bool adjoint,
              int threads) {
  using namespace box_mean_detail;
  const int64_t DHW = D * H * W;
  const std::vector<int> axes = box_stages(D, H, W, passes, adjoint);
  const int64_t stages = static_cast<int64_t>(axes.size());
  const int team = threads > 0 ? threads : 1;
  if (stages == 0) {
#pragma omp parallel for simd schedule(static) num_threads(team)
    for (int64_t i = 0; i < NC * DHW; ++i) out[i] = in[i];
    return;
  }
  // Whole channels per thread when there are enough to share (no barriers between stages); a large volume of
  // few channels has every thread work on every stage; a small one runs on one thread: starting a team and
  // the barriers cost more than its work (measured on 2 cores: 3 channels of 16 x 86 x 86, two passes, take
  // 0.26 ms on one thread, 0.43 ms on two sharing each stage, 0.40 ms with a channel per thread; sharing wins
  // above ~2M elements).
  const bool large = NC * DHW >= (int64_t(1) << 21);
  const bool by_channel = team == 1 || NC >= 4 * int64_t(team) || !large;
  const int channel_team = (team == 1 || NC >= 4 * int64_t(team)) ? team : 1;
  // Uninitialised: every element a stage reads was written by the stage before.
  std::unique_ptr<T[]> scratch(new T[by_channel ? checked_count({channel_team, DHW}) : checked_count({NC, DHW})]);
  // Stage k writes `out` when an even number of stages follows it, the scratch otherwise.
  auto lands_in_out = [stages](int64_t k) { return (stages - 1 - k) % 2 == 0; };
  if (by_channel) {
#pragma omp parallel num_threads(channel_team)
    {
      T* mine = scratch.get() + thread_id() * DHW;
#pragma omp for schedule(dynamic, 1)
      for (int64_t nc = 0; nc < NC; ++nc) {
        const T* src = in + nc * DHW;
        for (int64_t k = 0; k < stages; ++k) {
          T* dst = lands_in_out(k) ? out + nc * DHW : mine;
          stage(src, dst, D, H, W, axes[k], adjoint);
          src = dst;
        }
      }
    }
    return;
  }
#pragma omp parallel num_threads(team)
  for (int64_t k = 0; k < stages; ++k) {
    const T* source = k == 0 ? in : (lands_in_out(k - 1) ? out : scratch.get());
    T* target = lands_in_out(k) ? out : scratch.get();
    // Row by row, so that any shape shares out (a single plane too).
#pragma omp for collapse(3) schedule(static)
    for (int64_t nc = 0; nc < NC; ++nc)
      for (int64_t z = 0; z < D; ++z)
        for (int64_t y = 0; y < H; ++y)
          stage_row(source + nc * DHW, target + nc * DHW, D, H, W, axes[k], adjoint, z, y);
  }
}

#define GRADREG_INSTANTIATE(T) \
  template void box_mean<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, int, bool, int);
GRADREG_INSTANTIATE(float)
GRADREG_INSTANTIATE(double)
#undef GRADREG_INSTANTIATE

}  // namespace cpu
}  // namespace gradreg
