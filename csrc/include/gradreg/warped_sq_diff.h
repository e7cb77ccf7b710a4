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

}  // namespace gradreg
