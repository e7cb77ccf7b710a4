// Python bindings of the CUDA core (compiled by the host compiler; kernels live in *.cu).
#include <pybind11/pybind11.h>

#include "launch.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gradreg_fast CUDA core (raw pointers, caller's stream, cudart linked statically)";
  py::call_guard<py::gil_scoped_release> nogil;
  m.def("gradient_magnitude_forward", &gradreg::cuda::gradient_magnitude_forward, nogil);
  m.def("ptx_architecture", &gradreg::cuda::ptx_architecture);
  m.def("device_check", &gradreg::cuda::device_check, nogil);
}
