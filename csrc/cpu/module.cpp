// Python bindings of the CPU core. Pointers arrive as integers (tensor.data_ptr()); the Python
// side has already checked shapes, dtypes, devices and contiguity. The GIL is released while
// a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define GRADREG_HAVE_AVX2_COPY 1
namespace gradreg_avx2 {
#include "ops.h"
}  // namespace gradreg_avx2
#endif

namespace py = pybind11;


namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

bool is_double(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw std::invalid_argument("gradreg_fast._C: dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

// The kernel copy in use: "avx2" (isa_avx2.cpp) when the CPU has AVX2 and FMA, else "baseline".
// GRADREG_CPU_ISA=baseline at import, or set_cpu_isa(), forces the baseline copy (tests run both).
std::string& active_isa() {
  static std::string isa = [] {
#ifdef GRADREG_HAVE_AVX2_COPY
    const char* forced = std::getenv("GRADREG_CPU_ISA");
    if (forced != nullptr && std::string(forced) == "baseline") return std::string("baseline");
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return std::string("avx2");
#endif
    return std::string("baseline");
  }();
  return isa;
}

// Channels of a MIND pair table (ops/mind_tables.py): 6 offsets, then one tie rank, per channel. The
// argmin channel is kept in 7 bits of the flag byte.
int descriptor_channels(const std::vector<int>& table) {
  if (table.empty() || table.size() % 7 != 0 || table.size() > 7 * 0x7F)
    throw std::invalid_argument("gradreg_fast._C: `pairs` must hold 7 ints per channel (6 offsets, a tie rank) "
                                "for 1 to 127 channels, got " + std::to_string(table.size()) + " ints");
  return static_cast<int>(table.size() / 7);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> isas{"baseline"};
#ifdef GRADREG_HAVE_AVX2_COPY
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
#endif
  return isas;
}

}  // namespace

#ifdef GRADREG_HAVE_AVX2_COPY
#define GRADREG_CALL(fn, ...) \
  (active_isa() == "avx2" ? gradreg_avx2::gradreg::cpu::fn(__VA_ARGS__) : gradreg::cpu::fn(__VA_ARGS__))
#else
#define GRADREG_CALL(fn, ...) gradreg::cpu::fn(__VA_ARGS__)
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradreg_fast CPU core (C++17 + OpenMP, no libtorch)";
  py::call_guard<py::gil_scoped_release> nogil;

  m.def("cpu_isa", [] { return active_isa(); }, "The instruction set of the kernel copy in use.");
  m.def("available_isas", &available_isas, "The kernel copies this CPU can run.");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        const auto isas = available_isas();
        if (std::find(isas.begin(), isas.end(), isa) == isas.end())
          throw std::invalid_argument("gradreg_fast._C.set_cpu_isa: `isa` must be one of this CPU's kernel copies "
                                      "(see available_isas()), got '" + isa + "'");
        active_isa() = isa;
      },
      "Select the kernel copy (not thread-safe against running kernels; meant for tests and benchmarks).");

  m.def(
      "gradient_magnitude_forward",
      [](const std::string& dtype, uintptr_t vol, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W,
         double eps, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(gradient_magnitude_forward, ptr<const double>(vol), ptr<double>(out), NC, D, H, W, eps, threads);
        else
          GRADREG_CALL(gradient_magnitude_forward, ptr<const float>(vol), ptr<float>(out), NC, D, H, W, float(eps),
                                                   threads);
      },
      nogil);
  m.def(
      "gradient_magnitude_backward",
      [](const std::string& dtype, uintptr_t grad_out, uintptr_t vol, uintptr_t out, uintptr_t grad_vol, int64_t NC,
         int64_t D, int64_t H, int64_t W, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(gradient_magnitude_backward, ptr<const double>(grad_out), ptr<const double>(vol),
                                                    ptr<const double>(out), ptr<double>(grad_vol), NC, D, H, W, threads);
        else
          GRADREG_CALL(gradient_magnitude_backward, ptr<const float>(grad_out), ptr<const float>(vol),
                                                    ptr<const float>(out), ptr<float>(grad_vol), NC, D, H, W, threads);
      },
      nogil);
  m.def(
      "box_mean_forward",
      [](const std::string& dtype, uintptr_t in, uintptr_t out, int64_t NC, int64_t D, int64_t H, int64_t W,
         int passes, bool adjoint, int threads) {
        if (NC < 1 || D < 1 || H < 1 || W < 1 || passes < 0)
          throw std::invalid_argument("gradreg_fast._C.box_mean_forward: sizes must be >= 1 and `passes` >= 0");
        if (is_double(dtype))
          GRADREG_CALL(box_mean, ptr<const double>(in), ptr<double>(out), NC, D, H, W, passes, adjoint, threads);
        else
          GRADREG_CALL(box_mean, ptr<const float>(in), ptr<float>(out), NC, D, H, W, passes, adjoint, threads);
      },
      nogil);
  m.def(
      "warp_forward",
      [](const std::string& dtype, uintptr_t image, uintptr_t flow, uintptr_t out, int64_t N, int64_t C, int64_t D,
         int64_t H, int64_t W, bool nearest, int padding, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(warp_forward, ptr<const double>(image), ptr<const double>(flow), ptr<double>(out), N, C, D, H,
                                     W, nearest, padding, threads);
        else
          GRADREG_CALL(warp_forward, ptr<const float>(image), ptr<const float>(flow), ptr<float>(out), N, C, D, H, W,
                                     nearest, padding, threads);
      },
      nogil);
  m.def(
      "warp_backward",
      [](const std::string& dtype, uintptr_t grad_out, uintptr_t image, uintptr_t flow, uintptr_t grad_image,
         uintptr_t grad_flow, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(warp_backward, ptr<const double>(grad_out), ptr<const double>(image), ptr<const double>(flow),
                                      ptr<double>(grad_image), ptr<double>(grad_flow), N, C, D, H, W, padding, threads);
        else
          GRADREG_CALL(warp_backward, ptr<const float>(grad_out), ptr<const float>(image), ptr<const float>(flow),
                                      ptr<float>(grad_image), ptr<float>(grad_flow), N, C, D, H, W, padding, threads);
      },
      nogil);
  m.def(
      "descriptor_forward",
      [](const std::string& dtype, uintptr_t vol, uintptr_t out, uintptr_t variance, uintptr_t flags, int64_t N,
         int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius, int dilation, bool subtract_min,
         bool per_item, int threads) {
        const int K = descriptor_channels(pairs);
        if (is_double(dtype))
          GRADREG_CALL(descriptor_forward, ptr<const double>(vol), ptr<double>(out), ptr<double>(variance),
                                           ptr<uint8_t>(flags), N, D, H, W, pairs.data(), K, radius, dilation,
                                           subtract_min, per_item, threads);
        else
          GRADREG_CALL(descriptor_forward, ptr<const float>(vol), ptr<float>(out), ptr<float>(variance),
                                           ptr<uint8_t>(flags), N, D, H, W, pairs.data(), K, radius, dilation,
                                           subtract_min, per_item, threads);
      },
      nogil);
  m.def(
      "descriptor_backward",
      [](const std::string& dtype, uintptr_t grad_out, double scale, uintptr_t out, uintptr_t vol,
         uintptr_t variance, uintptr_t flags, uintptr_t grad_vol, int64_t N, int64_t D, int64_t H, int64_t W,
         const std::vector<int>& pairs, int radius, int dilation, bool subtract_min, int threads) {
        const int K = descriptor_channels(pairs);
        if (is_double(dtype))
          GRADREG_CALL(descriptor_backward, ptr<const double>(grad_out), scale, ptr<const double>(out),
                       ptr<const double>(vol), ptr<const double>(variance), ptr<const uint8_t>(flags),
                       ptr<double>(grad_vol), N, D, H, W, pairs.data(), K, radius, dilation, subtract_min, threads);
        else
          GRADREG_CALL(descriptor_backward, ptr<const float>(grad_out), float(scale), ptr<const float>(out),
                       ptr<const float>(vol), ptr<const float>(variance), ptr<const uint8_t>(flags),
                       ptr<float>(grad_vol), N, D, H, W, pairs.data(), K, radius, dilation, subtract_min, threads);
      },
      nogil);
  m.def(
      "descriptor_penalty",
      [](const std::string& dtype, uintptr_t fixed, uintptr_t out, uintptr_t derivative, uintptr_t variance,
         uintptr_t flags, int64_t N, int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius,
         int dilation, bool subtract_min, bool per_item, bool squared, int threads) {
        const int K = descriptor_channels(pairs);
        if (is_double(dtype))
          return GRADREG_CALL(descriptor_penalty, ptr<const double>(fixed), ptr<const double>(out),
                              ptr<double>(derivative), ptr<double>(variance), ptr<uint8_t>(flags), N, D, H, W,
                              pairs.data(), K, radius, dilation, subtract_min, per_item, squared, threads);
        return GRADREG_CALL(descriptor_penalty, ptr<const float>(fixed), ptr<const float>(out),
                            ptr<float>(derivative), ptr<float>(variance), ptr<uint8_t>(flags), N, D, H, W,
                            pairs.data(), K, radius, dilation, subtract_min, per_item, squared, threads);
      },
      nogil);
  m.def(
      "descriptor_penalty_streamed",
      [](const std::string& dtype, uintptr_t fixed, uintptr_t out, uintptr_t variance, uintptr_t flags, int64_t N,
         int64_t D, int64_t H, int64_t W, const std::vector<int>& pairs, int radius, int dilation, bool subtract_min,
         bool per_item, bool squared, int threads) {
        const int K = descriptor_channels(pairs);
        if (is_double(dtype))
          return GRADREG_CALL(descriptor_penalty_streamed, ptr<const double>(fixed), ptr<const double>(out),
                              ptr<double>(variance), ptr<uint8_t>(flags), N, D, H, W, pairs.data(), K, radius,
                              dilation, subtract_min, per_item, squared, threads);
        return GRADREG_CALL(descriptor_penalty_streamed, ptr<const float>(fixed), ptr<const float>(out),
                            ptr<float>(variance), ptr<uint8_t>(flags), N, D, H, W, pairs.data(), K, radius, dilation,
                            subtract_min, per_item, squared, threads);
      },
      nogil);
  m.def(
      "cost_volume_forward",
      [](const std::string& dtype, uintptr_t fixed, uintptr_t moving, uintptr_t out, int64_t N, int64_t C, int64_t D,
         int64_t H, int64_t W, int radius, int spacing, int grid, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(cost_volume_forward, ptr<const double>(fixed), ptr<const double>(moving), ptr<double>(out), N,
                       C, D, H, W, radius, spacing, grid, threads);
        else
          GRADREG_CALL(cost_volume_forward, ptr<const float>(fixed), ptr<const float>(moving), ptr<float>(out), N, C,
                       D, H, W, radius, spacing, grid, threads);
      },
      nogil);
  m.def(
      "cost_volume_backward",
      [](const std::string& dtype, uintptr_t grad_out, uintptr_t fixed, uintptr_t moving, uintptr_t grad_fixed,
         uintptr_t grad_moving, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int radius, int spacing,
         int grid, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(cost_volume_backward, ptr<const double>(grad_out), ptr<const double>(fixed),
                       ptr<const double>(moving), ptr<double>(grad_fixed), ptr<double>(grad_moving), N, C, D, H, W,
                       radius, spacing, grid, threads);
        else
          GRADREG_CALL(cost_volume_backward, ptr<const float>(grad_out), ptr<const float>(fixed),
                       ptr<const float>(moving), ptr<float>(grad_fixed), ptr<float>(grad_moving), N, C, D, H, W,
                       radius, spacing, grid, threads);
      },
      nogil);
  m.def(
      "penalty_derivative",
      [](const std::string& dtype, uintptr_t a, uintptr_t b, uintptr_t derivative, int64_t numel, bool squared,
         int threads) {
        if (is_double(dtype))
          return GRADREG_CALL(penalty_derivative, ptr<const double>(a), ptr<const double>(b),
                              ptr<double>(derivative), numel, squared, threads);
        return GRADREG_CALL(penalty_derivative, ptr<const float>(a), ptr<const float>(b), ptr<float>(derivative),
                            numel, squared, threads);
      },
      nogil);
  m.def(
      "lncc_forward",
      [](const std::string& dtype, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride, uintptr_t loss_map,
         uintptr_t coefficients, int coefficient_count, int64_t N, int64_t D, int64_t H, int64_t W, int window,
         double eps, double smooth_nr, bool monai, int threads) {
        if (is_double(dtype))
          return GRADREG_CALL(lncc_forward, ptr<const double>(warped), ptr<const double>(fixed), fixed_batch_stride,
                              ptr<double>(loss_map), ptr<double>(coefficients), coefficient_count, N, D, H, W, window,
                              eps, smooth_nr, monai, threads);
        return GRADREG_CALL(lncc_forward, ptr<const float>(warped), ptr<const float>(fixed), fixed_batch_stride,
                            ptr<float>(loss_map), ptr<float>(coefficients), coefficient_count, N, D, H, W, window, eps,
                            smooth_nr, monai, threads);
      },
      nogil);
  m.def(
      "lncc_backward",
      [](const std::string& dtype, uintptr_t coefficients, int coefficient_count, uintptr_t grad_map,
         double grad_scale, uintptr_t warped, uintptr_t fixed, int64_t fixed_batch_stride, uintptr_t grad_warped,
         uintptr_t grad_fixed, int64_t N, int64_t D, int64_t H, int64_t W, int window, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(lncc_backward, ptr<const double>(coefficients), coefficient_count, ptr<const double>(grad_map),
                       grad_scale, ptr<const double>(warped), ptr<const double>(fixed), fixed_batch_stride,
                       ptr<double>(grad_warped), ptr<double>(grad_fixed), N, D, H, W, window, threads);
        else
          GRADREG_CALL(lncc_backward, ptr<const float>(coefficients), coefficient_count, ptr<const float>(grad_map),
                       grad_scale, ptr<const float>(warped), ptr<const float>(fixed), fixed_batch_stride,
                       ptr<float>(grad_warped), ptr<float>(grad_fixed), N, D, H, W, window, threads);
      },
      nogil);
  m.def(
      "warped_sq_diff_forward",
      [](const std::string& dtype, uintptr_t moving, uintptr_t fixed, uintptr_t flow, uintptr_t weight,
         uintptr_t grad_flow, int64_t N, int64_t C, int64_t D, int64_t H, int64_t W, int padding, bool interleaved,
         int threads) {
        if (is_double(dtype))
          return GRADREG_CALL(warped_sq_diff_forward, ptr<const double>(moving), ptr<const double>(fixed),
                              ptr<const double>(flow), ptr<const double>(weight), ptr<double>(grad_flow), N, C, D,
                              H, W, padding, interleaved, threads);
        return GRADREG_CALL(warped_sq_diff_forward, ptr<const float>(moving), ptr<const float>(fixed),
                            ptr<const float>(flow), ptr<const float>(weight), ptr<float>(grad_flow), N, C, D, H, W,
                            padding, interleaved, threads);
      },
      nogil);
  m.def(
      "coupled_argmin",
      [](const std::string& dtype, uintptr_t cost, uintptr_t field, double coupling, uintptr_t index, int64_t N,
         int64_t D, int64_t H, int64_t W, int radius, bool mirrored, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(coupled_argmin, ptr<const double>(cost), ptr<const double>(field), coupling,
                       ptr<int64_t>(index), N, D, H, W, radius, mirrored, threads);
        else
          GRADREG_CALL(coupled_argmin, ptr<const float>(cost), ptr<const float>(field), static_cast<float>(coupling),
                       ptr<int64_t>(index), N, D, H, W, radius, mirrored, threads);
      },
      nogil);
  m.def(
      "integrate_forward",
      [](const std::string& dtype, uintptr_t velocity, uintptr_t out, uintptr_t scratch, uintptr_t checkpoints,
         int interval, int64_t N, int64_t D, int64_t H, int64_t W, int steps, int padding, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(integrate_forward, ptr<const double>(velocity), ptr<double>(out), ptr<double>(scratch),
                       ptr<double>(checkpoints), interval, N, D, H, W, steps, padding, threads);
        else
          GRADREG_CALL(integrate_forward, ptr<const float>(velocity), ptr<float>(out), ptr<float>(scratch),
                       ptr<float>(checkpoints), interval, N, D, H, W, steps, padding, threads);
      },
      nogil);
  m.def(
      "integrate_backward",
      [](const std::string& dtype, uintptr_t velocity, uintptr_t checkpoints, int interval, uintptr_t grad_out,
         uintptr_t grad_velocity, uintptr_t scratch, int64_t N, int64_t D, int64_t H, int64_t W, int steps,
         int padding, int threads) {
        if (is_double(dtype))
          GRADREG_CALL(integrate_backward, ptr<const double>(velocity), ptr<const double>(checkpoints), interval,
                       ptr<const double>(grad_out), ptr<double>(grad_velocity), ptr<double>(scratch), N, D, H, W,
                       steps, padding, threads);
        else
          GRADREG_CALL(integrate_backward, ptr<const float>(velocity), ptr<const float>(checkpoints), interval,
                       ptr<const float>(grad_out), ptr<float>(grad_velocity), ptr<float>(scratch), N, D, H, W,
                       steps, padding, threads);
      },
      nogil);
  m.def(
      "label_surface_distances",
      [](uintptr_t points_a, uintptr_t starts_a, uintptr_t points_b, uintptr_t starts_b, uintptr_t labels,
         uintptr_t boxes, int64_t count, const std::vector<double>& spacing, uintptr_t out_ab, uintptr_t out_ba,
         int threads) {
        if (spacing.size() != 3 || count < 0)
          throw std::invalid_argument("gradreg_fast._C.label_surface_distances: `spacing` must hold 3 values and "
                                      "`count` must be >= 0");
        GRADREG_CALL(label_surface_distances, ptr<const int64_t>(points_a), ptr<const int64_t>(starts_a),
                     ptr<const int64_t>(points_b), ptr<const int64_t>(starts_b), ptr<const int64_t>(labels),
                     ptr<const int64_t>(boxes), count, spacing.data(), ptr<double>(out_ab), ptr<double>(out_ba),
                     threads);
      },
      nogil);
  m.def(
      "jacobian_determinant",
      [](uintptr_t u, uintptr_t out, int64_t D, int64_t H, int64_t W, int threads) {
        if (D < 2 || H < 2 || W < 2)
          throw std::invalid_argument("gradreg_fast._C.jacobian_determinant: every axis needs at least 2 voxels");
        GRADREG_CALL(jacobian_determinant, ptr<const double>(u), ptr<double>(out), D, H, W, threads);
      },
      nogil);
}
