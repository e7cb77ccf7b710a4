"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import importlib.util
import os
import zlib

# Idle OpenMP threads sleep instead of spinning. Must be set before torch loads libgomp. On a shared,
# oversubscribed CI machine, spinning teams of thousands of tiny calls (gradcheck) starve each other
# and make the suite several times slower; results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FLOAT_DTYPES = (torch.float32, torch.float64)


def _cpu_isas():
    import importlib

    return importlib.import_module("gradreg_fast._C").available_isas()


@pytest.fixture(params=_cpu_isas())
def isa(request):
    """Each CPU kernel copy this machine runs (baseline, AVX2), set for the test and restored after it."""
    import importlib

    core = importlib.import_module("gradreg_fast._C")
    previous = core.cpu_isa()
    core.set_cpu_isa(request.param)
    yield request.param
    core.set_cpu_isa(previous)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: every test draws its own, reproducible, random inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_volume(shape, dtype=torch.float64, noncontiguous=False, generator=None, scale=1.0) -> torch.Tensor:
    """Standard-normal values times ``scale``, of ``shape`` and ``dtype``.

    With ``noncontiguous=True`` the result is a view into a larger tensor, with permuted strides and a
    step along the last axis, so that kernels that assume a contiguous layout would read wrong values.
    """
    shape = tuple(shape)
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # float16/bfloat16: drawn, then cast
    if not noncontiguous:
        return (torch.randn(shape, generator=generator, dtype=draw_dtype) * scale).to(dtype)
    n, c, d, h, w = shape
    # Stored in (W', H', D, C, N) order, viewed back as (N, C, D, H', W'), then sliced.
    storage = torch.randn((2 * w + 1, h + 1, d, c, n), generator=generator, dtype=draw_dtype) * scale
    view = storage.to(dtype).permute(4, 3, 2, 1, 0)[:, :, :, 1:, ::2][..., :w]
    assert view.shape == shape and (w == 1 or not view.is_contiguous())
    return view


def non_contiguous_grad_output(shape, layout, generator=None) -> torch.Tensor:
    """A float64 gradient as autograd may hand it to a backward: ``"expanded"`` (stride 0, what
    ``out.sum().backward()`` passes) or ``"strided"`` (a permuted, sliced view)."""
    if layout == "expanded":
        grad = torch.ones((), dtype=torch.float64).expand(shape)
    else:
        grad = make_volume(shape, torch.float64, True, generator)
    assert not grad.is_contiguous()
    return grad


def value_and_grads(fn, inputs, grad_output=None):
    """``fn(*inputs)`` and its vector-Jacobian product with ``grad_output`` (default: 1, for a scalar)
    w.r.t. every input (zeros for an input the output does not depend on). The leaves are detached views,
    so they keep the inputs' strides."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    return out.detach(), torch.autograd.grad(out, leaves, grad_output, materialize_grads=True)


def cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " fma " in f.read().replace("\n", " ")
    except OSError:
        return False


# Arithmetic of the emulated CUDA builds: each product rounded on its own (the host compilers' default), or
# fused into FMAs as nvcc does (see build_emulated_cuda's ``contract``).
CONTRACTIONS = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu_has_fma(), reason="the CPU has no FMA"))]
CONTRACTION_IDS = ["rounded", "fma-contracted"]
CONTRACT_FLAGS = ["-O2", "-mfma", "-ffp-contract=fast"]


def build_emulated_cuda(tmp_path_factory, source: str, functions, name: str, contract: bool = False):
    """csrc/cuda/<source> compiled for the CPU against emulation.cuh (grids capped at 3 blocks, so that every
    grid-stride loop strides; blocks of fibers with real barriers), with a binding of ``functions``: the
    kernels' indexing, passes and workspace layout, as tests/test_cuda.py checks the other ops'.

    ``contract``: fuse a * b + c into one FMA wherever the compiler can, as nvcc does by default
    (--fmad=true) and the host build does not. Arithmetic that relies on a product being rounded before a
    subtraction (exact cancellation) breaks only there: an H200 showed it before this existed. Needs a
    CPU with FMA (the caller skips without one)."""
    import os
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler to build the emulated CUDA source")
    pybind11 = pytest.importorskip("pybind11")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp(name)
    common = ["-std=c++17", "-O1", "-fPIC", f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc' / 'cuda'}",
              "-DGRADREG_CUDA_EMULATION", "-DGRADREG_EMULATION_MAX_BLOCKS=3", "-DGRADREG_PTX_ARCH=90", "-Wall",
              "-Wextra", "-Werror"] + (CONTRACT_FLAGS if contract else [])
    obj = out / "kernels.o"
    subprocess.run([compiler, "-x", "c++", *common, "-c", str(root / "csrc" / "cuda" / source), "-o", str(obj)],
                   check=True)
    binding = out / "binding.cpp"
    binding.write_text("#include <pybind11/pybind11.h>\n#include \"launch.h\"\n"
                       f"PYBIND11_MODULE({name}, m) {{\n"
                       + "".join(f"  m.def(\"{f}\", &gradreg::cuda::{f});\n" for f in functions) + "}\n")
    library = out / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    subprocess.run([compiler, *common, "-shared", *includes, str(binding), str(obj), "-o", str(library)], check=True)
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_core_fixture(source: str, functions, name: str, contract: bool = False):
    """A module-scoped fixture that gives ``(core, device)`` for each build of a CUDA core, so that a test of its
    entry points is written once: the source compiled for the CPU against emulation.cuh (:func:`build_emulated_cuda`,
    device "cpu"; marked slow) and the built extension on a GPU (device "cuda"; marked gpu, skipped without one).
    With ``contract`` the emulated source is also built with products fused into FMAs, as nvcc builds it (skipped on
    a CPU without FMA).

    Assign it to a module-level name, which becomes the fixture's name (one the module uses for nothing else):
    ``cuda_core = cuda_core_fixture(...)``."""
    if contract:
        fma = pytest.mark.skipif(not cpu_has_fma(), reason="the CPU has no FMA")
        emulated = [pytest.param(("emulated", False), marks=pytest.mark.slow, id="emulated-rounded"),
                    pytest.param(("emulated", True), marks=[pytest.mark.slow, fma], id="emulated-fma-contracted")]
    else:
        emulated = [pytest.param(("emulated", False), marks=pytest.mark.slow, id="emulated")]
    cuda = pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda], id="cuda")

    @pytest.fixture(scope="module", params=emulated + [cuda])
    def core(request, tmp_path_factory):
        if request.param != "cuda":
            fused = request.param[1]
            module = build_emulated_cuda(tmp_path_factory, source, functions, f"{name}_{int(fused)}", contract=fused)
            return module, "cpu"
        import gradreg_fast

        module = gradreg_fast._backend.cuda_core()
        assert module is not None, "gradreg_fast._cuda is not importable on a machine with a GPU"
        missing = [f for f in functions if not hasattr(module, f)]
        assert not missing, f"gradreg_fast._cuda lacks {missing}: rebuild it"
        return module, "cuda"

    return core


# The GPU backends an op test runs on a CUDA device; Triton's tests skip (with the reason) where it is missing.
GPU_BACKENDS = ["cuda", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]


def poisoned(shape, dtype=torch.float64):
    """An output buffer full of NaN: an element a kernel forgets to write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


def run_under_triton_interpreter(test_file, *args: str, timeout: int = 600):
    """``python test_file args`` in a fresh process with TRITON_INTERPRET=1 (it must be set before triton is
    imported), the repository and tests/ importable; fails the calling test with the output's tail."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), *args], env=env, cwd=str(tests.parent),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"Triton checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
