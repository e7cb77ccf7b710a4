// Per-voxel math of the local normalised cross-correlation loss, lncc_loss(warped, fixed).
//
// Every voxel sees five window sums (zeros outside the volume) of I = fixed, J = warped:
// S_I, S_J, S_II, S_JJ, S_IJ, over n = window^3 voxels. Two conventions:
//   VoxelMorph: u = S / n; cross = S_IJ - u_J S_I - u_I S_J + u_I u_J n;
//               var_I = S_II - 2 u_I S_I + u_I u_I n (var_J likewise); cc = cross^2 / (var_I var_J + eps)
//   MONAI:      cross = S_IJ - (S_J / n) S_I; var_I = max(S_II - (S_I / n) S_I, eps) (var_J likewise);
//               cc = (cross^2 + smooth_nr) / (var_I var_J)
// each written in its library's order of operations, so that float64 results agree to rounding.
//
// The loss is -cc per voxel. Its derivative reaches the images only through the window sums, so
// the backward is a box filter (the window is symmetric) of per-voxel coefficients d(-cc)/dS:
//   d/dJ(q) = B[c_J](q) + 2 J(q) B[c_JJ](q) + I(q) B[c_IJ](q)
//   d/dI(q) = B[c_I](q) + 2 I(q) B[c_II](q) + J(q) B[c_IJ](q)
// with B the same zero-padded window sum. The coefficients are linear in the upstream gradient,
// so they are formed once for an upstream gradient of 1 and scaled per voxel later.
#pragma once

#include "common.h"

namespace gradreg {

// Order of the window sums and of the coefficients.
enum LnccSum : int { kSumI = 0, kSumJ = 1, kSumII = 2, kSumJJ = 3, kSumIJ = 4 };
// Coefficients of the warped image's gradient come first, so that a backward without the fixed
// image's gradient uses the first three only.
enum LnccCoefficient : int { kCoefJ = 0, kCoefJJ = 1, kCoefIJ = 2, kCoefI = 3, kCoefII = 4 };

template <typename T>
struct LnccParams {
  T n;          // window^3
  T eps;        // VoxelMorph: added to the denominator; MONAI: the variances' floor (smooth_dr)
  T smooth_nr;  // MONAI: added to the numerator
  bool monai;
};

template <typename T>
struct LnccTerms {
  T cross, var_i, var_j;
  T floor_i, floor_j;  // d(var used)/d(var): 1, 0 where MONAI's floor holds, 1/2 on a tie (torch.max)
  T num, den;
};

template <typename T>
GR_HD LnccTerms<T> lncc_terms(const T* s, const LnccParams<T>& p) {
  LnccTerms<T> t;
  t.floor_i = t.floor_j = T(1);
  if (!p.monai) {
    // Products rounded on their own (common.h): a window of one voxel, or of equal values, cancels to 0.
    const T u_i = s[kSumI] / p.n, u_j = s[kSumJ] / p.n;
    t.cross = s[kSumIJ] - product_rounded(u_j, s[kSumI]) - product_rounded(u_i, s[kSumJ]) +
              product_rounded(product_rounded(u_i, u_j), p.n);
    t.var_i = s[kSumII] - product_rounded(T(2) * u_i, s[kSumI]) + product_rounded(product_rounded(u_i, u_i), p.n);
    t.var_j = s[kSumJJ] - product_rounded(T(2) * u_j, s[kSumJ]) + product_rounded(product_rounded(u_j, u_j), p.n);
    t.num = t.cross * t.cross;
    t.den = t.var_i * t.var_j + p.eps;
    return t;
  }
  const T avg_i = s[kSumI] / p.n, avg_j = s[kSumJ] / p.n;
  t.cross = s[kSumIJ] - product_rounded(avg_j, s[kSumI]);
  const T raw_i = s[kSumII] - product_rounded(avg_i, s[kSumI]), raw_j = s[kSumJJ] - product_rounded(avg_j, s[kSumJ]);
  // "raw < eps" keeps a NaN a NaN, as torch.max does.
  t.var_i = raw_i < p.eps ? p.eps : raw_i;
  t.var_j = raw_j < p.eps ? p.eps : raw_j;
  t.floor_i = raw_i > p.eps ? T(1) : (raw_i == p.eps ? T(0.5) : T(0));
  t.floor_j = raw_j > p.eps ? T(1) : (raw_j == p.eps ? T(0.5) : T(0));
  t.num = t.cross * t.cross + p.smooth_nr;
  t.den = t.var_i * t.var_j;
  return t;
}

template <typename T>
GR_HD T lncc_cc(const T* sums, const LnccParams<T>& p) {
  const LnccTerms<T> t = lncc_terms(sums, p);
  return t.num / t.den;
}

// -cc at a voxel and, when coef is not null, d(-cc)/d(window sums) there: count = 3 (warped only)
// or 5 (warped and fixed) coefficients, in LnccCoefficient order, written count_stride apart.
template <typename T>
GR_HD T lncc_value_and_coefficients(const T* s, const LnccParams<T>& p, T* coef, int64_t coef_stride, int count) {
  const LnccTerms<T> t = lncc_terms(s, p);
  const T cc = t.num / t.den;
  if (coef != nullptr) {
    // Upstream d(loss)/d(cc) = -1.
    const T d_cross = -T(2) * t.cross / t.den;
    const T d_var_i = cc * t.var_j / t.den * t.floor_i;
    const T d_var_j = cc * t.var_i / t.den * t.floor_j;
    coef[kCoefJ * coef_stride] = -(d_cross * s[kSumI] + T(2) * d_var_j * s[kSumJ]) / p.n;
    coef[kCoefJJ * coef_stride] = d_var_j;
    coef[kCoefIJ * coef_stride] = d_cross;
    if (count == 5) {
      coef[kCoefI * coef_stride] = -(d_cross * s[kSumJ] + T(2) * d_var_i * s[kSumI]) / p.n;
      coef[kCoefII * coef_stride] = d_var_i;
    }
  }
  return -cc;
}

// An image's gradient at one voxel from the window sums of its scaled coefficients: B[c_self] +
// 2 self B[c_self,self] + other B[c_IJ] (d/dJ with self = J; d/dI with self = I).
template <typename T>
GR_HD T lncc_image_grad(T box_linear, T box_square, T box_cross, T self, T other) {
  return box_linear + T(2) * self * box_square + other * box_cross;
}

}  // namespace gradreg
