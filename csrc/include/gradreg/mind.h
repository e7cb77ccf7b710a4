// Per-voxel math of the self-similarity descriptors MIND (Heinrich 2012, six-neighbourhood)
// and MIND-SSC (Heinrich 2013), written once for the CPU and CUDA cores.
//
// A descriptor is a table of K offset pairs (a_k, b_k), in units of `dilation`. Channel k is
//   patch_k(x) = box mean over (2r+1)^3 of (I[clamp(x + d*a_k)] - I[clamp(x + d*b_k)])^2
// with the box replicate-padded, then (SSC only) minus its minimum over k, divided by
//   Vc(x) = clamp(mean_k patch_k(x), 0.001 m, 1000 m),  m = mean of that mean over the volume,
// and mapped through exp(-x). m is held constant in the backward, as in the .item()-based
// reference. For the 12 SSC channels only 6 distinct squared-difference maps exist: channel k is
// f(x + s_k) for f(y) = (I[c(y + u)] - I[c(y + v)])^2, exactly, clamps included. The CPU forward
// computes each map value once and lets both of its channels read it (csrc/cpu/mind.cpp); the
// box filter is separable, so its cost grows with r, not r^3.
#pragma once

#include "common.h"

namespace gradreg {

constexpr int kMaxDescriptorChannels = 12;
// Bit 7 of the per-voxel flag byte: mean_k patch_k(x) was inside the clamp range, so the
// gradient flows through the variance. Bits 0..6: the argmin channel (SSC).
constexpr uint8_t kInClampRange = 0x80;

template <typename T>
GR_HD T descriptor_squared_difference(const T* vol, int64_t z, int64_t y, int64_t x, int64_t D,
                                      int64_t H, int64_t W, const int* pair, int dilation) {
  const int64_t ia = (clamp_index(z + dilation * pair[0], D) * H + clamp_index(y + dilation * pair[1], H)) * W +
                     clamp_index(x + dilation * pair[2], W);
  const int64_t ib = (clamp_index(z + dilation * pair[3], D) * H + clamp_index(y + dilation * pair[4], H)) * W +
                     clamp_index(x + dilation * pair[5], W);
  const T diff = vol[ia] - vol[ib];
  return diff * diff;
}

// In place over the K box sums of one voxel (channel stride cs): subtracts the minimum if asked,
// scales them to means, and returns their mean (the local variance estimate). The minimum is
// subtracted from the sums before scaling, so the minimum channel comes out exactly 0 (with
// s * inv_box - lowest the compiler may fuse an FMA, which leaves the rounding error instead).
// `argmin` gets the channel that carries the minimum: among equal values the one with the lowest
// tie_rank[k]. The originals take torch.min (first index wins) over their convolution's channel
// order before permuting the channels, and the tie ranks give that order (ops/mind_tables.py), so
// the gradient goes to the same channel as theirs.
template <typename T>
GR_HD T descriptor_center(T* values, int64_t cs, int K, T inv_box, bool subtract_min, const int* tie_rank,
                          uint8_t& argmin) {
  T lowest = values[0];
  int lowest_rank = tie_rank[0];
  argmin = 0;
  for (int k = 1; k < K; ++k) {
    const T v = values[k * cs];
    if (v < lowest || (v == lowest && tie_rank[k] < lowest_rank)) {
      lowest = v;
      lowest_rank = tie_rank[k];
      argmin = static_cast<uint8_t>(k);
    }
  }
  const T shift = subtract_min ? lowest : T(0);
  T sum = T(0);
  for (int k = 0; k < K; ++k) {
    const T v = (values[k * cs] - shift) * inv_box;
    values[k * cs] = v;
    sum += v;
  }
  return sum / T(K);
}

// The clamped variance; `tiny` (the dtype's smallest normal) only matters on a constant
// volume, where m = 0 and every patch distance is 0: exp(-0 / tiny) = 1 instead of 0/0.
// Non-finite input (a NaN or inf voxel, or squares that overflow) makes m NaN or inf: then vc is
// NaN everywhere, so the whole descriptor and its gradient are NaN, as the originals' clamp with
// NaN bounds gives, on every backend. (m - m) is 0 for a finite m and NaN otherwise, without a
// branch, so the callers' loops still vectorise.
template <typename T>
GR_HD T descriptor_clamped_variance(T variance, T m, T tiny, uint8_t& flag) {
  const T lo = T(0.001) * m, hi = T(1000) * m;
  T vc = variance;
  if (variance < lo) vc = lo;
  else if (variance > hi) vc = hi;
  else flag |= kInClampRange;
  return (vc > tiny ? vc : tiny) + (m - m);
}

// exp(x) for x <= 0 and log(x) for x > 0, the only ranges the descriptor needs. On the host,
// float uses branch-free Cephes-style polynomials (relative error < 2e-7) because std::exp and
// std::log do not vectorise without -ffast-math, which would also drop our NaN checks.
template <typename T>
GR_HD T exp_nonpositive(T x) {
  return exp(x);
}
template <typename T>
GR_HD T log_positive(T x) {
  return log(x);
}

#if !defined(__CUDA_ARCH__)
template <>
inline float exp_nonpositive<float>(float x) {
  const float input = x;
  const bool is_nan = !(x == x);      // kept apart: a NaN must not reach the int cast below
  const bool underflow = x < -87.3f;  // exp(-87.3) is the smallest normal float: return 0 below
  x = underflow || is_nan ? -87.3f : x;
  const float n = floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return is_nan ? input : (underflow ? 0.0f : y * scale);
}

// For normal x > 0 (the caller never passes denormals).
template <>
inline float log_positive<float>(float x) {
  int32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  __builtin_memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}
#endif

// Descriptor value of one channel from its (min-subtracted) patch distance.
template <typename T>
GR_HD T descriptor_value(T patch, T vc) {
  return exp_nonpositive(-patch / vc);
}

template <typename T>
GR_HD void descriptor_finish(T* values, int64_t cs, int K, T vc) {
  for (int k = 0; k < K; ++k) values[k * cs] = descriptor_value(values[k * cs], vc);
}

// Upstream gradient of the descriptor: a tensor, or the fused loss's penalty derivative.
template <typename T>
struct UpstreamFromTensor {
  const T* grad;
  GR_HD T operator()(int64_t i, T) const { return grad[i]; }
};

// The CPU's fused loss: the penalty's derivative w.r.t. the descriptor, stored by the forward,
// times the upstream scalar / number of elements averaged.
template <typename T>
struct UpstreamFromScaledTensor {
  const T* grad;
  T scale;
  GR_HD T operator()(int64_t i, T) const { return scale * grad[i]; }
};

template <typename T>
struct UpstreamFromPenalty {
  const T* target;  // the fixed image's descriptor
  T scale;          // upstream scalar / number of elements averaged
  bool squared;
  GR_HD T operator()(int64_t i, T out) const {
    const T d = out - target[i];
    // Branch-free, so that the CPU's 64-voxel blocks vectorise.
    const T sign = T(d > T(0)) - T(d < T(0));
    return scale * (squared ? T(2) * d : sign);
  }
};

// Gradient w.r.t. the K box sums of the B voxels p0 .. p0+B-1 (channel stride cs), from the
// descriptor values `out`, the clamped variances and the flag bytes, written to grad_box[i + k * gs]
// (voxel i of the block, channel k). B = 1 on the GPU (a thread per voxel); the CPU passes blocks so
// that its channel-outer loops vectorise. The patch distances are recovered as -vc * log(out); where
// out underflowed to 0 their terms vanish (out log out -> 0).
template <int B, typename T, typename Upstream>
GR_HD void descriptor_backward_block(const T* out, int64_t p0, int64_t cs, int K, const T* vc, const uint8_t* flag,
                                     T tiny, T inv_box, bool subtract_min, const Upstream& upstream, T* grad_box,
                                     int64_t gs) {
  T dvar[B], total[B];
  const Upstream local_upstream = upstream;  // a local copy: grad_box stores cannot alias its fields
  GR_SIMD for (int i = 0; i < B; ++i) dvar[i] = total[i] = T(0);
  for (int k = 0; k < K; ++k) {
    GR_SIMD for (int i = 0; i < B; ++i) {
      const int64_t e = p0 + i + k * cs;
      const T o = out[e];
      const T t = local_upstream(e, o) * o;
      grad_box[i + k * gs] = -t / vc[i];
      // t * patch / vc^2 = -t * log(o) / vc; 0 for o below the smallest normal (then t ~ 0 too).
      // Computed unconditionally and selected, so the loop has no branch and vectorises.
      const bool normal = o >= tiny;
      const T term = t * log_positive(normal ? o : T(1));
      dvar[i] -= (normal ? term : T(0)) / vc[i];
    }
  }
  GR_SIMD for (int i = 0; i < B; ++i) dvar[i] = (flag[i] & kInClampRange) ? dvar[i] / T(K) : T(0);
  for (int k = 0; k < K; ++k) {
    GR_SIMD for (int i = 0; i < B; ++i) {
      const int64_t g = i + k * gs;
      grad_box[g] += dvar[i];
      total[i] += grad_box[g];
    }
  }
  if (subtract_min)
    for (int i = 0; i < B; ++i) grad_box[i + (flag[i] & 0x7F) * gs] -= total[i];
  for (int k = 0; k < K; ++k) {
    GR_SIMD for (int i = 0; i < B; ++i) {
      const int64_t g = i + k * gs;
      // vc <= tiny only on a constant volume, where the descriptor is locally constant; a NaN vc
      // (non-finite input) keeps its NaN gradient
      grad_box[g] = !(vc[i] <= tiny) ? grad_box[g] * inv_box : T(0);
    }
  }
}

// One voxel p; grad_box has the layout of out (channel stride cs).
template <typename T, typename Upstream>
GR_HD void descriptor_backward_voxel(const T* out, int64_t p, int64_t cs, int K, T vc, uint8_t flag, T tiny,
                                     T inv_box, bool subtract_min, const Upstream& upstream, T* grad_box) {
  descriptor_backward_block<1>(out, p, cs, K, &vc, &flag, tiny, inv_box, subtract_min, upstream, grad_box + p, cs);
}

}  // namespace gradreg
