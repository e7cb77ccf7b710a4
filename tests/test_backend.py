"""Backend selection: per call, set_backend, GRADREG_BACKEND, unavailable backends, and the fallback
to the reference when the compiled CPU core is missing."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_volume

import gradreg_fast
from gradreg_fast import _backend, reference

REPO = Path(__file__).resolve().parents[1]


def _clean_env():
    """This environment, without backend settings, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADREG_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def default_backend(monkeypatch):
    """The global backend as a fresh process sees it (no set_backend, no GRADREG_BACKEND); restored after."""
    monkeypatch.setattr(_backend, "_default_backend", None)
    monkeypatch.delenv("GRADREG_BACKEND", raising=False)


def _every_op(backend=None):
    """One call of each public op on small CPU inputs."""
    gen = torch.Generator().manual_seed(0)
    vol = make_volume((1, 1, 4, 5, 3), torch.float64, False, gen)
    other = make_volume((1, 1, 4, 5, 3), torch.float64, False, gen)
    flow = make_volume((1, 3, 4, 5, 3), torch.float64, False, gen)
    return [
        gradreg_fast.gradient_magnitude(vol, backend=backend),
        gradreg_fast.warp(vol, flow, backend=backend),
        gradreg_fast.mind_ssc(vol, backend=backend),
        gradreg_fast.mind(vol, backend=backend),
        gradreg_fast.mind_loss(vol, other, backend=backend),
    ]


def test_default_is_auto(default_backend):
    assert gradreg_fast.get_backend() == "auto"


def test_set_and_get_backend(default_backend):
    for name in ("cpu", "reference", "cuda", "triton", "auto"):
        gradreg_fast.set_backend(name)
        assert gradreg_fast.get_backend() == name
    gradreg_fast.set_backend(None)
    assert gradreg_fast.get_backend() == "auto"


def test_set_backend_rejects_unknown_names(default_backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        gradreg_fast.set_backend("gpu")
    assert gradreg_fast.get_backend() == "auto"  # unchanged


def test_global_backend_is_used_and_a_per_call_backend_overrides_it(default_backend):
    vol = torch.ones(1, 1, 3, 4, 5)
    gradreg_fast.set_backend("cuda")  # cannot run CPU tensors: proves the global setting is read
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        gradreg_fast.gradient_magnitude(vol)
    gradreg_fast.gradient_magnitude(vol, backend="cpu")
    gradreg_fast.set_backend("reference")
    for out, expected in zip(_every_op(), _every_op(backend="reference")):
        assert torch.equal(out, expected)


def test_environment_variable(default_backend, monkeypatch):
    monkeypatch.setenv("GRADREG_BACKEND", "reference")
    assert gradreg_fast.get_backend() == "reference"
    monkeypatch.setenv("GRADREG_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        gradreg_fast.gradient_magnitude(torch.ones(1, 1, 3, 4, 5))
    gradreg_fast.set_backend("cpu")  # set_backend wins over the environment
    assert gradreg_fast.get_backend() == "cpu"
    gradreg_fast.gradient_magnitude(torch.ones(1, 1, 3, 4, 5))


def test_environment_variable_is_validated(default_backend, monkeypatch):
    monkeypatch.setenv("GRADREG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="GRADREG_BACKEND must be one of"):
        gradreg_fast.get_backend()
    with pytest.raises(ValueError, match="GRADREG_BACKEND must be one of"):
        gradreg_fast.gradient_magnitude(torch.ones(1, 1, 3, 4, 5))


def test_auto_uses_the_cpu_core_for_cpu_tensors(default_backend):
    assert _backend.resolve(None, torch.device("cpu"), "warp") == "cpu"
    for out, expected in zip(_every_op(), _every_op(backend="cpu")):
        assert torch.equal(out, expected)


@pytest.mark.parametrize("op", ["gradient_magnitude", "warp", "mind", "mind_loss"])
def test_cuda_backend_on_cpu_tensors_raises(op):
    vol = torch.ones(1, 1, 3, 4, 5)
    calls = {
        "gradient_magnitude": lambda: gradreg_fast.gradient_magnitude(vol, backend="cuda"),
        "warp": lambda: gradreg_fast.warp(vol, torch.zeros(1, 3, 3, 4, 5), backend="cuda"),
        "mind": lambda: gradreg_fast.mind_ssc(vol, backend="cuda"),
        "mind_loss": lambda: gradreg_fast.mind_loss(vol, vol, backend="cuda"),
    }
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the CUDA core takes CUDA tensors"):
        calls[op]()


def test_triton_backend_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if importlib.util.find_spec("triton") is None:
        why = "triton is not installed"
    else:
        why = "Triton runs on CUDA tensors \\(or on CPU tensors only under TRITON_INTERPRET=1\\)"
    with pytest.raises(RuntimeError, match=f"backend 'triton' is not available: {why}"):
        gradreg_fast.gradient_magnitude(torch.ones(1, 1, 3, 4, 5), backend="triton")


def test_reference_backend_is_the_reference():
    gen = torch.Generator().manual_seed(1)
    vol = make_volume((2, 1, 4, 5, 3), torch.float64, True, gen)
    assert torch.equal(gradreg_fast.mind_ssc(vol, backend="reference"), reference.mind_ssc(vol))
    assert torch.equal(gradreg_fast.mind(vol, 2, 1, backend="reference"), reference.mind(vol, 2, 1))


# Runs in a fresh interpreter in which `gradreg_fast._C` cannot be imported, as after a failed build.
_WITHOUT_CPU_CORE = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class BlockCpuCore(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "gradreg_fast._C":
                raise ImportError("blocked by the test")
            return None

    sys.meta_path.insert(0, BlockCpuCore())

    import torch
    import gradreg_fast
    from gradreg_fast import reference

    gen = torch.Generator().manual_seed(0)
    vol = torch.randn(2, 1, 5, 4, 6, generator=gen, dtype=torch.float64)
    other = torch.randn(2, 1, 5, 4, 6, generator=gen, dtype=torch.float64)
    flow = torch.randn(2, 3, 5, 4, 6, generator=gen, dtype=torch.float64)

    def run(fn, ref, *inputs):
        leaves = [x.clone().requires_grad_() for x in inputs]
        ref_leaves = [x.clone().requires_grad_() for x in inputs]
        out, expected = fn(*leaves), ref(*ref_leaves)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        out.sum().backward()
        expected.sum().backward()
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second call must not warn again
            run(gradreg_fast.gradient_magnitude, reference.gradient_magnitude, vol)
    fallback = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert "gradient_magnitude" in message and "reference" in message, message
    assert "gradreg_fast._C" in message and "blocked by the test" in message, message

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(gradreg_fast.warp, reference.warp, vol, flow)
        run(gradreg_fast.mind_ssc, reference.mind_ssc, vol)
        run(gradreg_fast.mind, reference.mind, vol)
        run(lambda w: gradreg_fast.mind_loss(w, other), lambda w: reference.mind_loss(w, other), vol)
        run(lambda w, f: gradreg_fast.mind_loss(w, f, "mind", "l2"),
            lambda w, f: reference.mind_loss(w, f, "mind", "l2"), vol, other)

    try:
        gradreg_fast.gradient_magnitude(vol, backend="cpu")
    except RuntimeError as exc:
        assert "backend 'cpu' is not available" in str(exc) and "gradreg_fast._C" in str(exc), str(exc)
    else:
        raise AssertionError("backend='cpu' without the CPU core did not raise")
    print("ok")
    """
)


def test_fallback_to_reference_without_the_cpu_core():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_CPU_CORE], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=_clean_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


def _differentiable_calls(gen):
    """(name, fn, inputs, reference fn) for every public op, each fn taking leaves and returning a tensor."""
    vol = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    other = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    flow = make_volume((2, 3, 5, 4, 6), torch.float64, False, gen)
    return [
        ("gradient_magnitude", gradreg_fast.gradient_magnitude, [vol], reference.gradient_magnitude),
        ("warp", gradreg_fast.warp, [vol, flow], reference.warp),
        ("mind_ssc", gradreg_fast.mind_ssc, [vol], reference.mind_ssc),
        ("mind", gradreg_fast.mind, [vol], reference.mind),
        ("mind_loss", lambda w: gradreg_fast.mind_loss(w, other), [vol], lambda w: reference.mind_loss(w, other)),
        ("mind_loss l2 with fixed_descriptor",
         lambda w: gradreg_fast.mind_loss(w, fixed_descriptor=reference.mind_ssc(other), penalty="l2"), [vol],
         lambda w: reference.mind_loss(w, other, penalty="l2")),
    ]


@pytest.mark.parametrize("forward_backend, backward_backend", [("reference", "cpu"), ("cpu", "reference")])
def test_backward_runs_on_the_backend_of_its_forward(forward_backend, backward_backend, default_backend, gen):
    # The global backend changes between the forward and the backward: the backward must still read the
    # buffers its own forward saved (the reference saves placeholders, the CPU core its intermediates).
    for name, fn, inputs, ref in _differentiable_calls(gen):
        leaves = [x.clone().requires_grad_() for x in inputs]
        gradreg_fast.set_backend(forward_backend)
        out = fn(*leaves)
        grad_out = make_volume(out.shape, torch.float64, False, gen) if out.dim() else torch.ones(())
        gradreg_fast.set_backend(backward_backend)
        grads = torch.autograd.grad(out, leaves, grad_out)
        ref_leaves = [x.clone().requires_grad_() for x in inputs]
        expected = torch.autograd.grad(ref(*ref_leaves), ref_leaves, grad_out)
        for grad, expected_grad in zip(grads, expected):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-11 * expected_grad.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_cpu_core_is_an_attribute_after_a_plain_import():
    # README: `gradreg_fast._C.cpu_isa()` after `import gradreg_fast`, with no `import gradreg_fast._C`.
    code = "import gradreg_fast; print(gradreg_fast._C.cpu_isa())"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("baseline", "avx2"), result.stdout


@pytest.mark.parametrize("op, first", [("mind", "triton"), ("warp", "triton"), ("integrate", "triton"),
                                       ("cost_volume", "triton"), ("gradient_magnitude", "cuda"), ("lncc", "cuda"),
                                       ("coupled_argmin", "cuda"), ("warped_sq_diff", "cuda"), ("box_mean", "cuda")])
def test_auto_on_cuda_follows_the_measured_order(monkeypatch, op, first):
    """On CUDA tensors "auto" takes the backend that was faster on the H200 (_backend.CUDA_ORDER), and the
    other one when the first cannot run. No GPU needed: which backends can run is stood in for."""
    from gradreg_fast import _backend

    device = torch.device("cuda", 0)
    available = {"cuda", "triton"}
    monkeypatch.setattr(_backend, "problem", lambda name, dev, o: None if name in available else "absent")
    assert _backend.resolve("auto", device, op) == first
    available.discard(first)
    assert _backend.resolve("auto", device, op) == ({"cuda", "triton"} - {first}).pop()
