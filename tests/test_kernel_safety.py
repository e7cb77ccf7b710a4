"""The kernels' contracts that cut across backends: which channel carries a tied minimum's gradient,
non-finite input, and C++ errors (never an abort: exceptions stay out of OpenMP regions, allocation
failures become MemoryError, absurd sizes are refused).

CPU and reference run here; the CUDA sources run on the CPU emulator of tests/test_cuda.py; the Triton
kernels run under its interpreter in a subprocess (``python tests/test_kernel_safety.py CHECK``), which
sets TRITON_INTERPRET=1 before triton is imported, as tests/test_triton.py does.
"""

if __name__ == "__main__":  # a Triton check subprocess: the interpreter must be on before triton loads
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import run_under_triton_interpreter  # noqa: E402
from test_mind import _ssc_in_the_originals_order, _tied_volumes  # noqa: E402

TRITON_CHECKS = {}


def triton_check(fn):
    TRITON_CHECKS[fn.__name__] = fn
    return fn


def _gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _descriptor_and_grad(fn, vol, grad_out):
    leaf = vol.clone().requires_grad_()
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out.detach(), grad


def _assert_originals_tie_gradient(out, grad, vol, grad_out, radius, dilation):
    expected, expected_grad = _descriptor_and_grad(lambda v: _ssc_in_the_originals_order(v, radius, dilation), vol,
                                                   grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert (grad - expected_grad).abs().max().item() <= 1e-12 * expected_grad.abs().max().item()


# ------------------------------------------------------------------ ties: emulated CUDA and Triton

TIE_GEOMETRIES = [(2, 2), (1, 1), (1, 3)]


from test_cuda import emulated_core  # noqa: E402,F401  (the fixture: the CUDA sources built for the CPU)


def _emulated_descriptor_and_grad(core, vol, grad_out, radius, dilation):
    import test_cuda
    from gradreg_fast.ops.mind_tables import SSC_PAIRS, flat_pairs

    out, variance, flags = test_cuda._descriptor_forward(core, vol, "ssc", radius, dilation, False)
    n, _, d, h, w = vol.shape
    nbytes = core.module.descriptor_workspace_bytes(True, n, d, h, w, 12, True)
    scratch = core.workspace(nbytes)
    grad = core.poisoned(vol.shape, vol.dtype)
    core.call("descriptor_backward", True, grad_out.data_ptr(), out.data_ptr(), vol.data_ptr(), variance.data_ptr(),
              flags.data_ptr(), grad.data_ptr(), n, d, h, w, list(flat_pairs(SSC_PAIRS)), radius, dilation, True,
              scratch.data_ptr(), nbytes, 0)
    return out, grad


@pytest.mark.slow
@pytest.mark.parametrize("radius, dilation", TIE_GEOMETRIES)
def test_emulated_cuda_tie_gradient_equals_the_originals(emulated_core, radius, dilation):
    gen = _gen(f"emulated ties {radius} {dilation}")
    vol, _ = _tied_volumes(gen, (2, 1, 7, 9, 10))
    grad_out = torch.randn((2, 12, 7, 9, 10), generator=gen, dtype=torch.float64)
    out, grad = _emulated_descriptor_and_grad(emulated_core, vol, grad_out, radius, dilation)
    _assert_originals_tie_gradient(out, grad, vol, grad_out, radius, dilation)


@triton_check
def triton_ties():
    import gradreg_fast

    for radius, dilation in TIE_GEOMETRIES:
        gen = _gen(f"triton ties {radius} {dilation}")
        vol, _ = _tied_volumes(gen, (2, 1, 6, 7, 9))
        grad_out = torch.randn((2, 12, 6, 7, 9), generator=gen, dtype=torch.float64)
        out, grad = _descriptor_and_grad(lambda v: gradreg_fast.mind_ssc(v, radius, dilation, backend="triton"), vol,
                                         grad_out)
        _assert_originals_tie_gradient(out, grad, vol, grad_out, radius, dilation)


# ------------------------------------------------------------------ non-finite input
# Policy, as the originals: a NaN or inf voxel (or squares that overflow, ~1e20 in float32) makes the
# mean variance m non-finite, and then the whole descriptor and its whole gradient are NaN (m per
# item with per_item=True) -- never a partly finite result, never a silent zero gradient.


def _non_finite_cases(dtype):
    gen = _gen(f"non-finite {dtype}")
    base = torch.rand((1, 1, 9, 7, 8), generator=gen, dtype=dtype)
    nan, inf, huge = base.clone(), base.clone(), base * 1e20
    nan[0, 0, 4, 3, 5] = float("nan")
    inf[0, 0, 2, 6, 1] = float("inf")
    cases = {"nan": nan, "inf": inf}
    if dtype == torch.float32:
        cases["overflow"] = huge
    return cases


def _assert_all_nan(vol, descriptor):
    leaf = vol.clone().requires_grad_()
    out = descriptor(leaf)
    assert torch.isnan(out).all(), f"{(~torch.isnan(out)).sum().item()} finite values"
    (grad,) = torch.autograd.grad(out, leaf, torch.rand(out.shape, dtype=out.dtype))
    assert torch.isnan(grad).all(), f"{(~torch.isnan(grad)).sum().item()} finite gradient values"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["mind_ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_input_gives_an_all_nan_descriptor_and_gradient(backend, kind, dtype):
    import gradreg_fast

    for name, vol in _non_finite_cases(dtype).items():
        _assert_all_nan(vol, lambda v: getattr(gradreg_fast, kind)(v, radius=1, dilation=1, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_finite_item_leaves_the_other_items_alone_with_per_item(backend):
    import gradreg_fast

    gen = _gen("per item nan")
    vol = torch.rand((2, 1, 6, 7, 5), generator=gen, dtype=torch.float64)
    vol[1, 0, 3, 3, 3] = float("nan")
    out = gradreg_fast.mind_ssc(vol, radius=1, dilation=1, per_item=True, backend=backend)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[:1], gradreg_fast.mind_ssc(vol[:1], radius=1, dilation=1, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_non_finite_warped_image_gives_a_nan_loss_and_gradient(backend, penalty):
    import gradreg_fast

    gen = _gen("loss nan")
    fixed = torch.rand((1, 1, 8, 7, 6), generator=gen, dtype=torch.float64)
    warped = torch.rand((1, 1, 8, 7, 6), generator=gen, dtype=torch.float64)
    warped[0, 0, 1, 2, 3] = float("nan")
    leaf = warped.clone().requires_grad_()
    loss = gradreg_fast.mind_loss(leaf, fixed, penalty=penalty, radius=1, dilation=1, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(leaf.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_cuda_non_finite_input(emulated_core, dtype):
    import test_cuda
    from gradreg_fast.ops.mind_tables import MIND_PAIRS, SSC_PAIRS, flat_pairs

    for kind, pairs, subtract_min in (("ssc", SSC_PAIRS, True), ("mind", MIND_PAIRS, False)):
        for name, vol in _non_finite_cases(dtype).items():
            out, variance, flags = test_cuda._descriptor_forward(emulated_core, vol, kind, 1, 1, False)
            assert torch.isnan(out).all(), (kind, name)
            n, _, d, h, w = vol.shape
            is_double = dtype == torch.float64
            nbytes = emulated_core.module.descriptor_workspace_bytes(is_double, n, d, h, w, len(pairs), True)
            scratch = emulated_core.workspace(nbytes)
            grad_out = torch.rand(out.shape, dtype=dtype)
            grad = torch.zeros(vol.shape, dtype=dtype)  # not poisoned: a NaN must come from the kernel
            emulated_core.call("descriptor_backward", is_double, grad_out.data_ptr(), out.data_ptr(), vol.data_ptr(),
                               variance.data_ptr(), flags.data_ptr(), grad.data_ptr(), n, d, h, w,
                               list(flat_pairs(pairs)), 1, 1, subtract_min, scratch.data_ptr(), nbytes, 0)
            assert torch.isnan(grad).all(), (kind, name)


@triton_check
def triton_non_finite_input():
    import gradreg_fast

    for dtype in (torch.float32, torch.float64):
        for kind in ("mind_ssc", "mind"):
            for name, vol in _non_finite_cases(dtype).items():
                _assert_all_nan(vol, lambda v: getattr(gradreg_fast, kind)(v, radius=1, dilation=1, backend="triton"))


# ------------------------------------------------------------------ C++ errors never abort

# Runs one case in a fresh process (an abort there must not take the test run with it) whose address
# space is capped a little above what it uses after a warm-up, so that the case's allocations fail.
_LIMITED_SCRIPT = """
import resource, sys, torch, gradreg_fast
torch.set_num_threads(2)
small = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64, requires_grad=True)
gradreg_fast.mind_ssc(small, backend="cpu").sum().backward()  # start-up, OpenMP threads, custom ops
gradreg_fast.warp(small, torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64), backend="cpu").sum().backward()
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + int(float(sys.argv[2]) * 2**20), resource.RLIM_INFINITY))
try:
    exec(sys.argv[1])
except (MemoryError, RuntimeError, ValueError) as error:
    print("refused:", type(error).__name__, str(error).splitlines()[0][:200])
else:
    print("ran")
"""


def _run_limited(case: str, headroom_mib: float) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = str(HERE.parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _LIMITED_SCRIPT, case, str(headroom_mib)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"rc {proc.returncode} (a signal if < 0):\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


# (case, what its allocations need beyond the start-up): every one must end in a Python exception.
LIMITED_CASES = {
    # The forward's per-thread ring of box planes: 12 x (2r + 1) x 64 x 64 floats = 390 MiB per thread.
    "mind forward scratch": "gradreg_fast.mind_ssc(torch.rand(1, 1, 3, 64, 64), radius=1000, backend='cpu')",
    # The backward's per-part gradient volumes and box-gradient slab (the forward fits).
    "mind backward scratch": (
        "v = torch.rand(1, 1, 40, 64, 64, dtype=torch.float64, requires_grad=True)\n"
        "gradreg_fast.mind_ssc(v, radius=200, backend='cpu').sum().backward()"),
    "fused loss scratch": "gradreg_fast.mind_loss(torch.rand(1, 1, 3, 64, 64), torch.rand(1, 1, 3, 64, 64), "
                          "radius=1000, backend='cpu')",
    "warp backward": (
        "i = torch.rand(1, 4, 128, 128, 128, requires_grad=True)\n"
        "f = torch.zeros(1, 3, 128, 128, 128, requires_grad=True)\n"
        "gradreg_fast.warp(i, f, backend='cpu').sum().backward()"),
}


@pytest.mark.parametrize("name", list(LIMITED_CASES))
def test_allocation_failure_is_a_python_exception(name):
    result = _run_limited(LIMITED_CASES[name], headroom_mib=96)
    assert result.startswith("refused: MemoryError") or result.startswith("refused: RuntimeError"), result


def test_cases_run_without_the_limit():
    # The same cases with ample room run to the end (so the refusals above come from the limit).
    assert _run_limited(LIMITED_CASES["mind forward scratch"], headroom_mib=4096) == "ran"


def test_huge_dilation_does_not_abort():
    # Used to abort (rc 134): the map planes grew by 2 dilations and their allocation threw inside an
    # OpenMP region. Now a dilation beyond the volume gives the edge-clamped result of the largest useful one.
    result = _run_limited(
        "v = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)\n"
        "assert torch.equal(gradreg_fast.mind_ssc(v, dilation=2**30, backend='cpu'),"
        " gradreg_fast.mind_ssc(v, dilation=3, backend='cpu'))", headroom_mib=1024)
    assert result == "ran" or result.startswith("refused: ValueError"), result


class TestCoreArguments:
    """The compiled core checks what it is handed, whatever the Python wrappers let through."""

    def _forward(self, vol, radius=1, dilation=1, pairs=None):
        import gradreg_fast
        from gradreg_fast.ops.mind_tables import SSC_PAIRS, flat_pairs

        n, _, d, h, w = vol.shape
        out = torch.empty((n, 12, d, h, w), dtype=vol.dtype)
        variance, flags = torch.empty_like(vol), torch.empty(vol.shape, dtype=torch.uint8)
        table = list(flat_pairs(SSC_PAIRS)) if pairs is None else pairs
        gradreg_fast._backend.cpu_core().descriptor_forward(
            "float64", vol.data_ptr(), out.data_ptr(), variance.data_ptr(), flags.data_ptr(), n, d, h, w, table,
            radius, dilation, True, False, 1)
        return out

    @pytest.mark.parametrize("radius", [-1, 4097, 2**30])
    def test_radius_out_of_range(self, radius):
        with pytest.raises(ValueError, match="`radius` must be in"):
            self._forward(torch.rand(1, 1, 4, 4, 4, dtype=torch.float64), radius=radius)

    @pytest.mark.parametrize("dilation", [0, 4097, 2**30])
    def test_dilation_out_of_range(self, dilation):
        with pytest.raises(ValueError, match="`dilation` must be in"):
            self._forward(torch.rand(1, 1, 4, 4, 4, dtype=torch.float64), dilation=dilation)

    def test_dilation_beyond_the_volume_equals_the_edge_clamped_one(self):
        vol = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64)
        assert torch.equal(self._forward(vol, dilation=4000), self._forward(vol, dilation=5))

    def test_bad_tables(self):
        from gradreg_fast.ops.mind_tables import SSC_PAIRS, flat_pairs

        vol = torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="7 ints per channel"):
            self._forward(vol, pairs=list(flat_pairs(SSC_PAIRS))[:-1])
        repeated_rank = list(flat_pairs(SSC_PAIRS))
        repeated_rank[-1] = repeated_rank[-2]
        with pytest.raises(ValueError, match="tie ranks"):
            self._forward(vol, pairs=repeated_rank)


# ------------------------------------------------------------------ the Triton runner

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed (pip install 'gradreg_fast[triton]')")


@requires_triton
@pytest.mark.parametrize("name", list(TRITON_CHECKS))
def test_triton_interpreter(name):
    run_under_triton_interpreter(__file__, name)


if __name__ == "__main__":
    torch.set_num_threads(1)
    TRITON_CHECKS[sys.argv[1]]()
