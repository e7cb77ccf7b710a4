// Host entry points of the CUDA core. Each takes raw device pointers (0 = "not needed" where an
// argument is optional), sizes and the caller's stream (torch's current stream, as an integer),
// launches asynchronously on that stream, and returns "" on success or an error string (bad
// arguments, or the launch's CUDA error) for Python to raise. Nothing here synchronises with the
// host or allocates device memory: scratch space comes from the caller's `workspace`, a buffer
// of at least *_workspace_bytes(...) bytes (any alignment), whose size is passed along so that
// a short one is reported instead of overrun. The *_workspace_bytes functions throw on bad sizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gradreg {
namespace cuda {

std::string gradient_magnitude_forward(bool is_double, uintptr_t vol, uintptr_t out, int64_t NC, int64_t D,
                                       int64_t H, int64_t W, double eps, uintptr_t stream);
std::string gradient_magnitude_backward(bool is_double, uintptr_t grad_out, uintptr_t vol, uintptr_t out,
                                        uintptr_t grad_vol, int64_t NC, int64_t D, int64_t H, int64_t W,
                                        uintptr_t stream);

// The 3x3x3 in-volume mean (gradreg/box_mean.h), `passes` times, or its adjoint; `in` and `out` must not
// overlap. The workspace (box_mean_workspace_bytes) is needed when more than one 1D stage runs.
std::string box_mean_forward(bool is_double, uintptr_t in, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W,
                             int passes, bool adjoint, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t box_mean_workspace_bytes(bool is_double, int64_t NC, int64_t D, int64_t H, int64_t W);

// padding: 0 zeros, 1 border. grad_image or grad_flow may be 0. The workspace is used only for
// deterministic=True with grad_image (else pass 0, 0).
std::string warp_forward(bool is_double, uintptr_t image, uintptr_t flow, uintptr_t out, int64_t N, int64_t C,
                         int64_t D, int64_t H, int64_t W, bool nearest, int padding, uintptr_t stream);
std::string warp_backward(bool is_double, uintptr_t grad_out, uintptr_t image, uintptr_t flow, uintptr_t grad_image,
                          uintptr_t grad_flow, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding,
                          bool deterministic, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t warp_workspace_bytes(int64_t N, int64_t D, int64_t H, int64_t W, bool deterministic);

// pairs: 6 ints per channel (a_z, a_y, a_x, b_z, b_y, b_x), then a tie rank per channel (mind.h), 1 to 12
// channels. scale (loss backward): a device pointer to one scalar of the compute dtype, read by the kernel.
std::string descriptor_forward(bool is_double, uintptr_t vol, uintptr_t out, uintptr_t variance, uintptr_t flags,
                               int64_t N, int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
                               int dilation, bool subtract_min, bool per_item, uintptr_t workspace,
                               int64_t workspace_bytes, uintptr_t stream);
std::string descriptor_backward(bool is_double, uintptr_t grad_out, uintptr_t out, uintptr_t vol, uintptr_t variance,
                                uintptr_t flags, uintptr_t grad_vol, int64_t N, int64_t D, int64_t H, int64_t W,
                                const std::vector<int>& pairs, int radius, int dilation, bool subtract_min,
                                uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
std::string descriptor_loss_backward(bool is_double, uintptr_t scale, bool squared, uintptr_t target, uintptr_t out,
                                     uintptr_t vol, uintptr_t variance, uintptr_t flags, uintptr_t grad_vol, int64_t N,
                                     int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
                                     int dilation, bool subtract_min, uintptr_t workspace, int64_t workspace_bytes,
                                     uintptr_t stream);
// K: channels; backward: size for descriptor_backward / descriptor_loss_backward, else forward.
int64_t descriptor_workspace_bytes(bool is_double, int64_t N, int64_t D, int64_t H, int64_t W, int64_t K,
                                   bool backward);

// out: a device pointer to one scalar of the compute dtype.
std::string penalty_sum(bool is_double, uintptr_t a, uintptr_t b, int64_t numel, bool squared, uintptr_t out,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t penalty_workspace_bytes(int64_t numel);

// The MIND cost volume (gradreg/cost_volume.h): out is (N, (2r+1)^3, ceil(D/g), ceil(H/g), ceil(W/g)).
// grad_fixed or grad_moving may be 0 when not needed. No workspace.
std::string cost_volume_forward(bool is_double, uintptr_t fixed, uintptr_t moving, uintptr_t out, int64_t N,
                                int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing, int grid,
                                uintptr_t stream);
std::string cost_volume_backward(bool is_double, uintptr_t grad_out, uintptr_t fixed, uintptr_t moving,
                                 uintptr_t grad_fixed, uintptr_t grad_moving, int64_t N, int64_t C, int64_t D,
                                 int64_t H, int64_t W, int radius, int spacing, int grid, uintptr_t stream);

// coupled_argmin (gradreg/coupled_argmin.h): cost (N, (2r+1)^3, D, H, W) and field (N, 3, D, H, W) of the
// compute dtype, index (N, D, H, W) int64. coupling: finite, >= 0. No workspace.
std::string coupled_argmin_forward(bool is_double, uintptr_t cost, uintptr_t field, double coupling, uintptr_t index,
                                   int64_t N, int64_t D, int64_t H, int64_t W, int radius, bool mirrored,
                                   uintptr_t stream);

// lncc_loss. coefficient_count: 0, 3 or 5 (LnccCoefficient order); total: a device pointer to one
// scalar of the compute dtype, the sum of -cc; loss_map (optional): -cc per voxel. grad: one scalar, or
// (grad_is_map) one value per voxel. fixed_batch_stride: 0 for one fixed image against the batch.
std::string lncc_forward(bool is_double, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride,
                         uintptr_t loss_map, uintptr_t coefficients, int coefficient_count, uintptr_t total, int64_t N,
                         int64_t D, int64_t H, int64_t W, int window, double eps, double smooth_nr, bool monai,
                         uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
std::string lncc_backward(bool is_double, uintptr_t coefficients, int coefficient_count, uintptr_t grad,
                          bool grad_is_map, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride,
                          uintptr_t grad_warped, uintptr_t grad_fixed, int64_t N, int64_t D, int64_t H, int64_t W,
                          int window, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t lncc_workspace_bytes(bool is_double, int64_t N, int64_t D, int64_t H, int64_t W, bool backward);

// integrate_velocity. scratch: one field (forward) or three (backward); checkpoints (optional): the
// fields u_k, k = interval, 2 interval, ... < steps, written by the forward, read by the backward.
std::string integrate_forward(bool is_double, uintptr_t velocity, uintptr_t out, uintptr_t scratch,
                              uintptr_t checkpoints, int interval, int64_t N, int64_t D, int64_t H, int64_t W,
                              int steps, int padding, uintptr_t stream);
std::string integrate_backward(bool is_double, uintptr_t velocity, uintptr_t checkpoints, int interval,
                               uintptr_t grad_out, uintptr_t grad_velocity, uintptr_t scratch, int64_t N, int64_t D,
                               int64_t H, int64_t W, int steps, int padding, uintptr_t stream);

// warped_sq_diff: total (a device pointer to one scalar of the compute dtype) = sum over n, x of
// weight * sum_c (moving_c(x + flow(x)) - fixed_c(x))^2; weight and grad_flow (that sum's flow
// gradient) may be 0. The workspace holds the per-block partial sums.
std::string warped_sq_diff_forward(bool is_double, uintptr_t moving, uintptr_t fixed, uintptr_t flow,
                                   uintptr_t weight, uintptr_t grad_flow, uintptr_t total, int64_t N, int64_t C,
                                   int64_t D, int64_t H, int64_t W, int padding, uintptr_t workspace,
                                   int64_t workspace_bytes, uintptr_t stream);
int64_t warped_sq_diff_workspace_bytes(int64_t N, int64_t D, int64_t H, int64_t W);

// Compute capabilities with SASS in this binary, and the PTX one (JIT-compiled on newer GPUs).
int ptx_architecture();
std::string device_check(int device);

}  // namespace cuda
}  // namespace gradreg
