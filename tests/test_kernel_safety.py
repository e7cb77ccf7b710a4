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


# ------------------------------------------------------------------ the Triton runner

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed (pip install 'gradreg_fast[triton]')")


@requires_triton
@pytest.mark.parametrize("name", list(TRITON_CHECKS))
def test_triton_interpreter(name):
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), name], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"check {name!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    TRITON_CHECKS[sys.argv[1]]()
