// Entry points of the CPU core: raw pointers to contiguous buffers plus sizes.
//
// No include guard, on purpose: module.cpp includes this list a second time inside namespace
// gradreg_avx2 to declare the AVX2 copy of the kernels (isa_avx2.cpp). Include <cstdint> first.

namespace gradreg {
namespace cpu {

template <typename T>
void gradient_magnitude_forward(const T* vol, T* out, int64_t NC, int64_t D, int64_t H, int64_t W, T eps,
                                int threads);
template <typename T>
void gradient_magnitude_backward(const T* grad_out, const T* vol, const T* out, T* grad_vol, int64_t NC,
                                 int64_t D, int64_t H, int64_t W, int threads);

// The 3x3x3 in-volume mean (box_mean.h), `passes` times, or its adjoint; `in` and `out` must not overlap.
template <typename T>
void box_mean(const T* in, T* out, int64_t NC, int64_t D, int64_t H, int64_t W, int passes, bool adjoint,
              int threads);

template <typename T>
void warp_forward(const T* image, const T* flow, T* out, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W,
                  bool nearest, int padding, int threads);
// grad_image or grad_flow may be null when not needed.
template <typename T>
void warp_backward(const T* grad_out, const T* image, const T* flow, T* grad_image, T* grad_flow, int64_t N,
                   int64_t C, int64_t D, int64_t H, int64_t W, int padding, int threads);

template <typename T>
void descriptor_forward(const T* vol, T* out, T* variance, uint8_t* flags, int64_t N, int64_t D, int64_t H,
                        int64_t W, const int* pairs, int K, int radius, int dilation, bool subtract_min,
                        bool per_item, int threads);
// upstream = scale * grad_out
template <typename T>
void descriptor_backward(const T* grad_out, T scale, const T* out, const T* vol, const T* variance,
                         const uint8_t* flags, T* grad_vol, int64_t N, int64_t D, int64_t H, int64_t W,
                         const int* pairs, int K, int radius, int dilation, bool subtract_min, int threads);
// The fused loss's penalty: returns sum |a - b| (or sum (a - b)^2) and writes the penalty's
// derivative w.r.t. a, sign(a - b) (or 2 (a - b)), to `derivative` (which may be b itself).
template <typename T>
double penalty_derivative(const T* a, const T* b, T* derivative, int64_t numel, bool squared, int threads);
// The fused loss against a fixed image whose descriptor is never stored: its centred patches are
// formed in `derivative`, turned into descriptor values there and compared with `out` (the warped
// descriptor) element by element, leaving the penalty's derivative. `variance` and `flags` are
// scratch of one channel. Returns the penalty's sum.
template <typename T>
double descriptor_penalty(const T* fixed, const T* out, T* derivative, T* variance, uint8_t* flags, int64_t N,
                          int64_t D, int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                          bool subtract_min, bool per_item, bool squared, int threads);
// The same sum when no gradient is needed: the fixed image's descriptor planes live in a ring of a few
// planes per thread (its box sums are computed twice, once for m and once to compare), so no buffer of
// the fixed descriptor's size exists. `variance` and `flags` are scratch of one channel.
template <typename T>
double descriptor_penalty_streamed(const T* fixed, const T* out, T* variance, uint8_t* flags, int64_t N, int64_t D,
                                   int64_t H, int64_t W, const int* pairs, int K, int radius, int dilation,
                                   bool subtract_min, bool per_item, bool squared, int threads);

// The MIND cost volume (gradreg/cost_volume.h): out is (N, (2r+1)^3, ceil(D/g), ceil(H/g), ceil(W/g)).
// grad_fixed or grad_moving may be null when not needed.
template <typename T>
void cost_volume_forward(const T* fixed, const T* moving, T* out, int64_t N, int64_t C, int64_t D, int64_t H,
                         int64_t W, int radius, int spacing, int grid, int threads);
template <typename T>
void cost_volume_backward(const T* grad_out, const T* fixed, const T* moving, T* grad_fixed, T* grad_moving,
                          int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing, int grid,
                          int threads);

// lncc_loss: returns the sum of -cc over every voxel; writes -cc per voxel to loss_map and the
// coefficients d(-cc)/d(window sums) (3 for the warped image, or 5 with the fixed image's) to
// coefficients when these are not null. fixed_batch_stride is 0 for one fixed image against a batch.
template <typename T>
double lncc_forward(const T* warped, const T* fixed, int64_t fixed_batch_stride, T* loss_map, T* coefficients,
                    int coefficient_count, int64_t N, int64_t D, int64_t H, int64_t W, int window, double eps,
                    double smooth_nr, bool monai, int threads);
// Upstream gradient: grad_map per voxel, or grad_scale everywhere when grad_map is null. grad_fixed
// (one volume per item) needs coefficient_count 5; grad_warped or grad_fixed may be null.
template <typename T>
void lncc_backward(const T* coefficients, int coefficient_count, const T* grad_map, double grad_scale,
                   const T* warped, const T* fixed, int64_t fixed_batch_stride, T* grad_warped, T* grad_fixed,
                   int64_t N, int64_t D, int64_t H, int64_t W, int window, int threads);

// coupled_argmin (gradreg/coupled_argmin.h): cost (N, (2r+1)^3, D, H, W), field (N, 3, D, H, W), index
// (N, D, H, W).
template <typename T>
void coupled_argmin(const T* cost, const T* field, T coupling, int64_t* index, int64_t N, int64_t D, int64_t H,
                    int64_t W, int radius, bool mirrored, int threads);

// warped_sq_diff: returns sum over n, x of weight * sum_c (moving_c(x + flow(x)) - fixed_c(x))^2 (weight
// null: all ones) and, when grad_flow is not null, writes that term's gradient w.r.t. the flow there.
// interleaved: moving and fixed are channels-last ((N, D, H, W, C) in memory); flow, weight and grad_flow
// are channels-first either way.
template <typename T>
double warped_sq_diff_forward(const T* moving, const T* fixed, const T* flow, const T* weight, T* grad_flow,
                              int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding, bool interleaved,
                              int threads);

// integrate_velocity: scratch holds one field (forward) or three (backward). checkpoints, when not
// null, holds the fields u_k for k = interval, 2 interval, ... < steps, written by the forward and
// read by the backward (which recomputes every other field from the nearest one below it).
template <typename T>
void integrate_forward(const T* velocity, T* out, T* scratch, T* checkpoints, int interval, int64_t N, int64_t D,
                       int64_t H, int64_t W, int steps, int padding, int threads);
template <typename T>
void integrate_backward(const T* velocity, const T* checkpoints, int interval, const T* grad_out, T* grad_velocity,
                        T* scratch, int64_t N, int64_t D, int64_t H, int64_t W, int steps, int padding, int threads);

// label_surface_distances: for each of the `count` labels (an index k of labels[], with its box in boxes[]: low
// corner, then sizes, 6 ints per label, holding every point of both), the distance (mm) from each of a's
// surface points of k (rows starts_a[k] .. starts_a[k + 1] of points_a, 3 lattice coordinates each) to the
// nearest of b's, into out_ab at the same rows, and from b's to a's into out_ba: an exact squared distance
// transform over the box (gradreg/distance_transform.h). Distances of other rows are not written.
void label_surface_distances(const int64_t* points_a, const int64_t* starts_a, const int64_t* points_b,
                             const int64_t* starts_b, const int64_t* labels, const int64_t* boxes, int64_t count,
                             const double* spacing, double* out_ab, double* out_ba, int threads);

// jacobian_determinant (gradreg/jacobian.h): u (3, D, H, W), out (D, H, W); every axis of at least 2 voxels.
void jacobian_determinant(const double* u, double* out, int64_t D, int64_t H, int64_t W, int threads);

}  // namespace cpu
}  // namespace gradreg
