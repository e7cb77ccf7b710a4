// Per-voxel math of warp(image, flow): sample `image` at x + flow(x) (voxel units, channel k
// along spatial axis k), trilinear or nearest, with zeros or border padding. Matches
// grid_sample(align_corners=True), including its "borders are out of bounds" rule for the
// gradient of clipped coordinates.
#pragma once

#include "common.h"

namespace gradreg {

enum class Padding : int { Zeros = 0, Border = 1 };

// One axis of a trilinear sample: the two neighbouring indices, their weights, whether each
// lies inside the volume, and d(coordinate)/d(flow) (0 where border padding clipped it).
template <typename T>
struct LinearAxis {
  int64_t lo;
  T frac;
  bool lo_in, hi_in;
  T dcoord;
};

template <typename T>
GR_HD LinearAxis<T> linear_axis(T coord, int64_t n, Padding padding) {
  LinearAxis<T> a;
  a.dcoord = T(1);
  if (!isfinite(coord)) {  // never turn a NaN or inf into an index
    a.lo = 0;
    a.frac = T(0);
    a.lo_in = a.hi_in = false;
    a.dcoord = T(0);
    return a;
  }
  if (padding == Padding::Border) {
    const T last = T(n - 1);
    if (coord <= T(0)) {
      coord = T(0);
      a.dcoord = T(0);
    } else if (coord >= last) {
      coord = last;
      a.dcoord = T(0);
    }
  } else {
    // Far outside, every corner is outside: clamping here keeps the int64 cast defined
    // without changing any value or gradient.
    if (coord < T(-2)) coord = T(-2);
    if (coord > T(n + 1)) coord = T(n + 1);
  }
  const T f = floor(coord);
  a.lo = static_cast<int64_t>(f);
  a.frac = coord - f;
  a.lo_in = a.lo >= 0 && a.lo < n;
  a.hi_in = a.lo + 1 >= 0 && a.lo + 1 < n;
  return a;
}

// Calls visit(index, weight, dweight_dz, dweight_dy, dweight_dx) for each in-bounds corner.
template <typename T, typename Visit>
GR_HD void for_each_corner(const LinearAxis<T>& az, const LinearAxis<T>& ay,
                           const LinearAxis<T>& ax, int64_t H, int64_t W, Visit&& visit) {
GR_UNROLL
  for (int corner = 0; corner < 8; ++corner) {
    const int hz = (corner >> 2) & 1, hy = (corner >> 1) & 1, hx = corner & 1;
    if (!(hz ? az.hi_in : az.lo_in) || !(hy ? ay.hi_in : ay.lo_in) || !(hx ? ax.hi_in : ax.lo_in))
      continue;
    const T wz = hz ? az.frac : T(1) - az.frac;
    const T wy = hy ? ay.frac : T(1) - ay.frac;
    const T wx = hx ? ax.frac : T(1) - ax.frac;
    const T sz = hz ? T(1) : T(-1), sy = hy ? T(1) : T(-1), sx = hx ? T(1) : T(-1);
    const int64_t idx = ((az.lo + hz) * H + (ay.lo + hy)) * W + (ax.lo + hx);
    visit(idx, wz * wy * wx, sz * wy * wx, wz * sy * wx, wz * wy * sx);
  }
}

template <typename T>
GR_HD bool all_corners_inside(const LinearAxis<T>& az, const LinearAxis<T>& ay, const LinearAxis<T>& ax) {
  return az.lo_in && az.hi_in && ay.lo_in && ay.hi_in && ax.lo_in && ax.hi_in;
}

// dst[corner] += g * weight for each in-bounds corner: the image gradient of one trilinear sample.
// With every corner inside (the common case) the weights are formed as for_each_corner forms them,
// so both paths give the same bits, without its per-corner bounds tests.
template <typename T>
GR_HD void scatter_trilinear(T* dst, const LinearAxis<T>& az, const LinearAxis<T>& ay, const LinearAxis<T>& ax,
                             int64_t H, int64_t W, T g) {
  if (all_corners_inside(az, ay, ax)) {
    T* p = dst + (az.lo * H + ay.lo) * W + ax.lo;
    const int64_t HW = H * W;
    const T z0 = T(1) - az.frac, z1 = az.frac, y0 = T(1) - ay.frac, y1 = ay.frac;
    const T x0 = T(1) - ax.frac, x1 = ax.frac;
    p[0] += z0 * y0 * x0 * g;
    p[1] += z0 * y0 * x1 * g;
    p[W] += z0 * y1 * x0 * g;
    p[W + 1] += z0 * y1 * x1 * g;
    p[HW] += z1 * y0 * x0 * g;
    p[HW + 1] += z1 * y0 * x1 * g;
    p[HW + W] += z1 * y1 * x0 * g;
    p[HW + W + 1] += z1 * y1 * x1 * g;
    return;
  }
  for_each_corner(az, ay, ax, H, W, [&](int64_t idx, T w, T, T, T) { dst[idx] += w * g; });
}

// The 8 corner values, z-major then y then x (corner bits zyx), of a sample with all corners inside.
template <typename T>
GR_HD void load_corners(const T* img, const LinearAxis<T>& az, const LinearAxis<T>& ay, const LinearAxis<T>& ax,
                        int64_t H, int64_t W, T (&c)[8]) {
  const T* p = img + (az.lo * H + ay.lo) * W + ax.lo;
  const int64_t HW = H * W;
  c[0] = p[0], c[1] = p[1], c[2] = p[W], c[3] = p[W + 1];
  c[4] = p[HW], c[5] = p[HW + 1], c[6] = p[HW + W], c[7] = p[HW + W + 1];
}

template <typename T>
GR_HD T lerp(T a, T b, T t) {
  return a + t * (b - a);
}

template <typename T>
GR_HD T trilinear_sample(const T* img, const LinearAxis<T>& az, const LinearAxis<T>& ay,
                         const LinearAxis<T>& ax, int64_t H, int64_t W) {
  if (all_corners_inside(az, ay, ax)) {  // the common case: nested lerps, no bounds tests
    T c[8];
    load_corners(img, az, ay, ax, H, W, c);
    const T e00 = lerp(c[0], c[1], ax.frac), e01 = lerp(c[2], c[3], ax.frac);
    const T e10 = lerp(c[4], c[5], ax.frac), e11 = lerp(c[6], c[7], ax.frac);
    return lerp(lerp(e00, e01, ay.frac), lerp(e10, e11, ay.frac), az.frac);
  }
  T acc = T(0);
  for_each_corner(az, ay, ax, H, W, [&](int64_t idx, T w, T, T, T) { acc += w * img[idx]; });
  return acc;
}

// Adds grad_out * d(sample)/d(coordinate) to g_z, g_y, g_x (zero where border padding clipped).
template <typename T>
GR_HD void trilinear_coord_grad(const T* img, T grad_out, const LinearAxis<T>& az,
                                const LinearAxis<T>& ay, const LinearAxis<T>& ax, int64_t H,
                                int64_t W, T& g_z, T& g_y, T& g_x) {
  T dz = T(0), dy = T(0), dx = T(0);
  if (all_corners_inside(az, ay, ax)) {
    T c[8];
    load_corners(img, az, ay, ax, H, W, c);
    const T e00 = lerp(c[0], c[1], ax.frac), e01 = lerp(c[2], c[3], ax.frac);
    const T e10 = lerp(c[4], c[5], ax.frac), e11 = lerp(c[6], c[7], ax.frac);
    dz = lerp(e10, e11, ay.frac) - lerp(e00, e01, ay.frac);
    dy = lerp(e01 - e00, e11 - e10, az.frac);
    dx = lerp(lerp(c[1] - c[0], c[3] - c[2], ay.frac), lerp(c[5] - c[4], c[7] - c[6], ay.frac), az.frac);
  } else {
    for_each_corner(az, ay, ax, H, W, [&](int64_t idx, T, T wdz, T wdy, T wdx) {
      const T v = img[idx];
      dz += wdz * v;
      dy += wdy * v;
      dx += wdx * v;
    });
  }
  g_z += grad_out * dz * az.dcoord;
  g_y += grad_out * dy * ay.dcoord;
  g_x += grad_out * dx * ax.dcoord;
}

// Nearest neighbour, rounding half to even as grid_sample does. Returns -1 when outside.
template <typename T>
GR_HD int64_t nearest_axis(T coord, int64_t n, Padding padding) {
  if (!isfinite(coord)) return -1;
  if (padding == Padding::Border) coord = coord < T(0) ? T(0) : (coord > T(n - 1) ? T(n - 1) : coord);
  if (coord < T(-1) || coord > T(n)) return -1;
  const int64_t i = static_cast<int64_t>(nearbyint(coord));
  return (i >= 0 && i < n) ? i : -1;
}

}  // namespace gradreg
