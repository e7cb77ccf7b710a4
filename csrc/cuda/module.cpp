// Python bindings of the CUDA core (compiled by the host compiler; kernels live in *.cu).
// Pointers arrive as integers (tensor.data_ptr()); the Python side has already checked
// shapes, dtypes, devices and contiguity. The GIL is released while the host code runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "launch.h"

namespace py = pybind11;
using namespace pybind11::literals;

// The module name can be overridden for the CPU-emulation build of the tests.
#ifndef GRADREG_CUDA_MODULE
#define GRADREG_CUDA_MODULE _cuda
#endif

PYBIND11_MODULE(GRADREG_CUDA_MODULE, m) {
  namespace gc = gradreg::cuda;
  m.doc() = "gradreg_fast CUDA core (raw pointers, caller's stream, caller's workspace, cudart linked statically)";
  py::call_guard<py::gil_scoped_release> nogil;
  m.def("gradient_magnitude_forward", &gc::gradient_magnitude_forward, "is_double"_a, "vol"_a, "out"_a, "NC"_a, "D"_a,
        "H"_a, "W"_a, "eps"_a, "stream"_a, nogil);
  m.def("gradient_magnitude_backward", &gc::gradient_magnitude_backward, "is_double"_a, "grad_out"_a, "vol"_a,
        "out"_a, "grad_vol"_a, "NC"_a, "D"_a, "H"_a, "W"_a, "stream"_a, nogil);
  m.def("box_mean_forward", &gc::box_mean_forward, "is_double"_a, "in"_a, "out"_a, "NC"_a, "D"_a, "H"_a, "W"_a,
        "passes"_a, "adjoint"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("box_mean_workspace_bytes", &gc::box_mean_workspace_bytes, "is_double"_a, "NC"_a, "D"_a, "H"_a, "W"_a,
        nogil);
  m.def("warp_forward", &gc::warp_forward, "is_double"_a, "image"_a, "flow"_a, "out"_a, "N"_a, "C"_a, "D"_a, "H"_a,
        "W"_a, "nearest"_a, "padding"_a, "stream"_a, nogil);
  m.def("warp_backward", &gc::warp_backward, "is_double"_a, "grad_out"_a, "image"_a, "flow"_a, "grad_image"_a,
        "grad_flow"_a, "N"_a, "C"_a, "D"_a, "H"_a, "W"_a, "padding"_a, "deterministic"_a, "workspace"_a,
        "workspace_bytes"_a, "stream"_a, nogil);
  m.def("warp_workspace_bytes", &gc::warp_workspace_bytes, "N"_a, "D"_a, "H"_a, "W"_a, "deterministic"_a, nogil);
  m.def("descriptor_forward", &gc::descriptor_forward, "is_double"_a, "vol"_a, "out"_a, "variance"_a, "flags"_a,
        "N"_a, "D"_a, "H"_a, "W"_a, "pairs"_a, "radius"_a, "dilation"_a, "subtract_min"_a, "per_item"_a,
        "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("descriptor_backward", &gc::descriptor_backward, "is_double"_a, "grad_out"_a, "out"_a, "vol"_a, "variance"_a,
        "flags"_a, "grad_vol"_a, "N"_a, "D"_a, "H"_a, "W"_a, "pairs"_a, "radius"_a, "dilation"_a, "subtract_min"_a,
        "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("descriptor_loss_backward", &gc::descriptor_loss_backward, "is_double"_a, "scale"_a, "squared"_a,
        "target"_a, "out"_a, "vol"_a, "variance"_a, "flags"_a, "grad_vol"_a, "N"_a, "D"_a, "H"_a, "W"_a, "pairs"_a,
        "radius"_a, "dilation"_a, "subtract_min"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("descriptor_workspace_bytes", &gc::descriptor_workspace_bytes, "is_double"_a, "N"_a, "D"_a, "H"_a, "W"_a,
        "K"_a, "backward"_a, nogil);
  m.def("penalty_sum", &gc::penalty_sum, "is_double"_a, "a"_a, "b"_a, "numel"_a, "squared"_a, "out"_a,
        "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("penalty_workspace_bytes", &gc::penalty_workspace_bytes, "numel"_a, nogil);
  m.def("cost_volume_forward", &gc::cost_volume_forward, "is_double"_a, "fixed"_a, "moving"_a, "out"_a, "N"_a, "C"_a,
        "D"_a, "H"_a, "W"_a, "radius"_a, "spacing"_a, "grid"_a, "stream"_a, nogil);
  m.def("cost_volume_backward", &gc::cost_volume_backward, "is_double"_a, "grad_out"_a, "fixed"_a, "moving"_a,
        "grad_fixed"_a, "grad_moving"_a, "N"_a, "C"_a, "D"_a, "H"_a, "W"_a, "radius"_a, "spacing"_a, "grid"_a,
        "stream"_a, nogil);
  m.def("coupled_argmin_forward", &gc::coupled_argmin_forward, "is_double"_a, "cost"_a, "field"_a, "coupling"_a,
        "index"_a, "N"_a, "D"_a, "H"_a, "W"_a, "radius"_a, "mirrored"_a, "stream"_a, nogil);
  m.def("lncc_forward", &gc::lncc_forward, "is_double"_a, "warped"_a, "fixed"_a, "fixed_batch_stride"_a,
        "loss_map"_a, "coefficients"_a, "coefficient_count"_a, "total"_a, "N"_a, "D"_a, "H"_a, "W"_a, "window"_a,
        "eps"_a, "smooth_nr"_a, "monai"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("lncc_backward", &gc::lncc_backward, "is_double"_a, "coefficients"_a, "coefficient_count"_a, "grad"_a,
        "grad_is_map"_a, "warped"_a, "fixed"_a, "fixed_batch_stride"_a, "grad_warped"_a, "grad_fixed"_a, "N"_a, "D"_a,
        "H"_a, "W"_a, "window"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a, nogil);
  m.def("lncc_workspace_bytes", &gc::lncc_workspace_bytes, "is_double"_a, "N"_a, "D"_a, "H"_a, "W"_a, "backward"_a,
        nogil);
  m.def("warped_sq_diff_forward", &gc::warped_sq_diff_forward, "is_double"_a, "moving"_a, "fixed"_a, "flow"_a,
        "weight"_a, "grad_flow"_a, "total"_a, "N"_a, "C"_a, "D"_a, "H"_a, "W"_a, "padding"_a, "workspace"_a,
        "workspace_bytes"_a, "stream"_a, nogil);
  m.def("warped_sq_diff_workspace_bytes", &gc::warped_sq_diff_workspace_bytes, "N"_a, "D"_a, "H"_a, "W"_a, nogil);
  m.def("integrate_forward", &gc::integrate_forward, "is_double"_a, "velocity"_a, "out"_a, "scratch"_a,
        "checkpoints"_a, "interval"_a, "N"_a, "D"_a, "H"_a, "W"_a, "steps"_a, "padding"_a, "stream"_a, nogil);
  m.def("integrate_backward", &gc::integrate_backward, "is_double"_a, "velocity"_a, "checkpoints"_a, "interval"_a,
        "grad_out"_a, "grad_velocity"_a, "scratch"_a, "N"_a, "D"_a, "H"_a, "W"_a, "steps"_a, "padding"_a, "stream"_a,
        nogil);
  m.def("ptx_architecture", &gc::ptx_architecture);
  m.def("device_check", &gc::device_check, "device"_a, nogil);
}
