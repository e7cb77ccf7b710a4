"""The compiled cores were built and link: the CPU core always, the CUDA core wherever nvcc is found."""

import importlib
import shutil

import pytest

CPU_CORE_FUNCTIONS = ("gradient_magnitude_forward", "gradient_magnitude_backward", "warp_forward", "warp_backward",
                      "descriptor_forward", "descriptor_backward", "penalty_derivative", "cpu_isa", "set_cpu_isa")


def test_cpu_core_imports():
    core = importlib.import_module("gradreg_fast._C")
    missing = [name for name in CPU_CORE_FUNCTIONS if not hasattr(core, name)]
    assert not missing, f"gradreg_fast._C lacks {missing}"


def test_cpu_core_rejects_unknown_dtype_names():
    core = importlib.import_module("gradreg_fast._C")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        core.gradient_magnitude_forward("float16", 0, 0, 0, 1, 1, 1, 0.0, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH, so no CUDA core was built")
def test_cuda_core_imports_where_nvcc_exists():
    # Importing resolves every symbol of the extension, cudart included: a core that compiled but does
    # not link fails here, with or without a GPU.
    core = importlib.import_module("gradreg_fast._cuda")
    assert hasattr(core, "gradient_magnitude_forward")
    assert hasattr(core, "device_check")
