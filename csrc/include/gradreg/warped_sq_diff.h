// Per-voxel math of warped_sq_diff(moving, fixed, flow, weight): w(x) * sum_c (moving_c(x + flow(x)) -
// fixed_c(x))^2 and its flow gradient 2 w sum_c diff_c dM_c/du, sampled exactly as warp.h samples (the
// same axes, corners, lerps and border rule), so the value equals warp() followed by a squared difference.
#pragma once

#include "warp.h"

namespace gradreg {

// The trilinear sample of one channel and its derivative along each coordinate (before the border
// rule's dcoord), from one load of the 8 corners: warp's forward and backward each load them once,
// this loads them once for both. With every corner inside, the value is formed by the nested lerps
// of trilinear_sample, so it has the same bits.
template <typename T>
GR_HD void trilinear_value_and_slope(const T* img, const LinearAxis<T>& az, const LinearAxis<T>& ay,
                                     const LinearAxis<T>& ax, int64_t H, int64_t W, T& value, T& dz, T& dy, T& dx) {
  if (all_corners_inside(az, ay, ax)) {
    T c[8];
    load_corners(img, az, ay, ax, H, W, c);
    const T e00 = lerp(c[0], c[1], ax.frac), e01 = lerp(c[2], c[3], ax.frac);
    const T e10 = lerp(c[4], c[5], ax.frac), e11 = lerp(c[6], c[7], ax.frac);
    const T near_z = lerp(e00, e01, ay.frac), far_z = lerp(e10, e11, ay.frac);
    value = lerp(near_z, far_z, az.frac);
    dz = far_z - near_z;
    dy = lerp(e01 - e00, e11 - e10, az.frac);
    dx = lerp(lerp(c[1] - c[0], c[3] - c[2], ay.frac), lerp(c[5] - c[4], c[7] - c[6], ay.frac), az.frac);
    return;
  }
  T v = T(0), gz = T(0), gy = T(0), gx = T(0);
  for_each_corner(az, ay, ax, H, W, [&](int64_t idx, T w, T wdz, T wdy, T wdx) {
    const T m = img[idx];
    v += w * m;
    gz += wdz * m;
    gy += wdy * m;
    gx += wdx * m;
  });
  value = v, dz = gz, dy = gy, dx = gx;
}

// One channel's term of one voxel: adds diff^2 to sum and, with kGrad, diff * d(moving_c)/du (before
// the border rule) to g_z, g_y, g_x. Summing these over c in increasing order is the voxel's sum.
template <bool kGrad, typename T>
GR_HD void warped_sq_diff_channel(const T* moving_c, T fixed_value, const LinearAxis<T>& az, const LinearAxis<T>& ay,
                                  const LinearAxis<T>& ax, int64_t H, int64_t W, T& sum, T& g_z, T& g_y, T& g_x) {
  if (!kGrad) {
    const T d = trilinear_sample(moving_c, az, ay, ax, H, W) - fixed_value;
    sum += d * d;
    return;
  }
  T value, dz, dy, dx;
  trilinear_value_and_slope(moving_c, az, ay, ax, H, W, value, dz, dy, dx);
  const T d = value - fixed_value;
  sum += d * d;
  g_z += d * dz;
  g_y += d * dy;
  g_x += d * dx;
}

// The flow gradient of a voxel from its channel sums: 2 * weight * sum_c diff_c * d(moving_c)/du,
// 0 along an axis where border padding clipped the coordinate.
template <typename T>
GR_HD void warped_sq_diff_flow_grad(T weight, T g_z, T g_y, T g_x, const LinearAxis<T>& az, const LinearAxis<T>& ay,
                                    const LinearAxis<T>& ax, T* grad, int64_t plane_stride) {
  const T scale = T(2) * weight;
  grad[0] = scale * g_z * az.dcoord;
  grad[plane_stride] = scale * g_y * ay.dcoord;
  grad[2 * plane_stride] = scale * g_x * ax.dcoord;
}

// One voxel: returns sum_c (moving_c(x + u) - fixed_c(x))^2 (unweighted) and, when grad is not null,
// writes its flow gradient (warped_sq_diff_flow_grad) to grad[0], grad[plane_stride], grad[2 * plane_stride].
// moving points at channel 0 of the item, fixed at channel 0 of the voxel; channels channel_stride apart.
template <typename T>
GR_HD T warped_sq_diff_voxel(const T* moving, const T* fixed_at_voxel, int64_t C, int64_t channel_stride,
                             const LinearAxis<T>& az, const LinearAxis<T>& ay, const LinearAxis<T>& ax, int64_t H,
                             int64_t W, T weight, T* grad, int64_t plane_stride) {
  T sum = T(0), gz = T(0), gy = T(0), gx = T(0);
  if (grad == nullptr) {
    for (int64_t c = 0; c < C; ++c)
      warped_sq_diff_channel<false>(moving + c * channel_stride, fixed_at_voxel[c * channel_stride], az, ay, ax, H, W,
                                    sum, gz, gy, gx);
    return sum;
  }
  for (int64_t c = 0; c < C; ++c)
    warped_sq_diff_channel<true>(moving + c * channel_stride, fixed_at_voxel[c * channel_stride], az, ay, ax, H, W,
                                 sum, gz, gy, gx);
  warped_sq_diff_flow_grad(weight, gz, gy, gx, az, ay, ax, grad, plane_stride);
  return sum;
}

// Channels interleaved (channels-last: channel c of voxel v at v * C + c; fixed_at_voxel likewise at c).
// A voxel's eight corners then hold all their channels in eight contiguous runs, so one set of corner
// weights serves every channel and the channel loop reads memory in order (it vectorises on the CPU).
// Each channel's value and slopes are the nested lerps of trilinear_value_and_slope; the channel sums are
// kept in kInterleavedLanes partial sums (channel c in lane c % kInterleavedLanes) added at the end, so
// the result equals warped_sq_diff_voxel's up to the rounding of that summation order.
constexpr int kInterleavedLanes = 8;

template <typename T>
GR_HD void interleaved_channel(const T* p, int64_t sx, int64_t sy, int64_t sz, T fx, T fy, T fz, T fixed_value,
                               T& sum, T& g_z, T& g_y, T& g_x) {
  const T c0 = p[0], c1 = p[sx], c2 = p[sy], c3 = p[sy + sx];
  const T c4 = p[sz], c5 = p[sz + sx], c6 = p[sz + sy], c7 = p[sz + sy + sx];
  const T e00 = lerp(c0, c1, fx), e01 = lerp(c2, c3, fx);
  const T e10 = lerp(c4, c5, fx), e11 = lerp(c6, c7, fx);
  const T near_z = lerp(e00, e01, fy), far_z = lerp(e10, e11, fy);
  const T d = lerp(near_z, far_z, fz) - fixed_value;
  sum += d * d;
  g_z += d * (far_z - near_z);
  g_y += d * lerp(e01 - e00, e11 - e10, fz);
  g_x += d * lerp(lerp(c1 - c0, c3 - c2, fy), lerp(c5 - c4, c7 - c6, fy), fz);
}

// One voxel of interleaved channels: returns sum_c (moving_c(x + u) - fixed_c(x))^2 and, when grad is not
// null, writes its flow gradient as warped_sq_diff_voxel does.
template <typename T>
GR_HD T warped_sq_diff_voxel_interleaved(const T* moving, const T* fixed_at_voxel, int64_t C,
                                         const LinearAxis<T>& az, const LinearAxis<T>& ay, const LinearAxis<T>& ax,
                                         int64_t H, int64_t W, T weight, T* grad, int64_t plane_stride) {
  T sum[kInterleavedLanes], gz[kInterleavedLanes], gy[kInterleavedLanes], gx[kInterleavedLanes];
  for (int l = 0; l < kInterleavedLanes; ++l) sum[l] = gz[l] = gy[l] = gx[l] = T(0);
  if (all_corners_inside(az, ay, ax)) {
    const T* p = moving + ((az.lo * H + ay.lo) * W + ax.lo) * C;
    const int64_t sx = C, sy = W * C, sz = H * W * C;
    int64_t c0 = 0;
    for (; c0 + kInterleavedLanes <= C; c0 += kInterleavedLanes)
      GR_SIMD
      for (int l = 0; l < kInterleavedLanes; ++l)
        interleaved_channel(p + c0 + l, sx, sy, sz, ax.frac, ay.frac, az.frac, fixed_at_voxel[c0 + l], sum[l], gz[l],
                            gy[l], gx[l]);
    for (int l = 0; c0 + l < C; ++l)
      interleaved_channel(p + c0 + l, sx, sy, sz, ax.frac, ay.frac, az.frac, fixed_at_voxel[c0 + l], sum[l], gz[l],
                          gy[l], gx[l]);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      T v = T(0), dz = T(0), dy = T(0), dx = T(0);
      for_each_corner(az, ay, ax, H, W, [&](int64_t idx, T w, T wdz, T wdy, T wdx) {
        const T m = moving[idx * C + c];
        v += w * m;
        dz += wdz * m;
        dy += wdy * m;
        dx += wdx * m;
      });
      const T d = v - fixed_at_voxel[c];
      const int l = static_cast<int>(c % kInterleavedLanes);
      sum[l] += d * d;
      gz[l] += d * dz;
      gy[l] += d * dy;
      gx[l] += d * dx;
    }
  }
  T total = T(0), g_z = T(0), g_y = T(0), g_x = T(0);
  for (int l = 0; l < kInterleavedLanes; ++l) {
    total += sum[l];
    g_z += gz[l];
    g_y += gy[l];
    g_x += gx[l];
  }
  if (grad != nullptr) warped_sq_diff_flow_grad(weight, g_z, g_y, g_x, az, ay, ax, grad, plane_stride);
  return total;
}

}  // namespace gradreg
