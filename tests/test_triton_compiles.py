"""Every Triton kernel of the package compiles to GPU machine code (cubin) for sm_80 and sm_90, on a
machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check the kernels' arithmetic but never compile them, and
Triton's compiler refuses code that its interpreter runs (a loop-carried variable changing type, for
one: the warp kernel's reused ``_`` did exactly that, and only a GPU machine showed it). Here a stand-in
driver reports a CUDA target and every launch is turned into a compile-only warm-up, so the public ops
run their Triton paths, forward and backward, on CPU tensors with every specialisation they use, and each
kernel goes through the whole pipeline down to ptxas. Nothing runs: the outputs are not looked at.

The check runs in a subprocess (``python tests/test_triton_compiles.py ARCH``): the triton module must be
imported without TRITON_INTERPRET, which other test files set in this process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import pytest
import torch

ARCHS = (80, 90)


def _compile_everything(arch: int) -> tuple[set[str], list[tuple[str, str]]]:
    """(names of the kernels compiled, [(case, error)])."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, jit

    class CompileOnlyDriver:
        """The parts of Triton's driver interface that a compile-only launch asks for."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_device_interface(self):
            return torch.cuda

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    compiled: set[str] = set()
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.add(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}")
        return kernel

    jit.JITFunction.run = compile_only

    import gradreg_fast as gr
    from gradreg_fast import _backend

    _backend._triton_problem = lambda device: None  # CPU tensors stand for CUDA ones; nothing is launched

    gen = torch.Generator().manual_seed(0)
    errors = []

    def case(name, fn):
        try:
            fn()
        except Exception as exc:  # every failure is reported, not only the first
            errors.append((name, f"{type(exc).__name__}: {exc}"))

    def leaf(*shape, dtype):
        return torch.rand(*shape, dtype=dtype, generator=gen).requires_grad_()

    def backward(out):
        out.sum().backward()

    shape = (2, 1, 5, 6, 7)
    for dtype in (torch.float32, torch.float64):
        vol, other, flow = leaf(*shape, dtype=dtype), leaf(*shape, dtype=dtype), leaf(2, 3, *shape[2:], dtype=dtype)
        case(f"gradient_magnitude {dtype}", lambda: backward(gr.gradient_magnitude(vol, backend="triton")))
        for mode in ("bilinear", "nearest"):
            for padding in ("zeros", "border"):
                for deterministic in (False, True):
                    case(f"warp {mode} {padding} deterministic={deterministic} {dtype}",
                         lambda: backward(gr.warp(vol, flow, mode, padding, deterministic, backend="triton")))
        for per_item in (False, True):
            case(f"mind_ssc per_item={per_item} {dtype}",
                 lambda: backward(gr.mind_ssc(vol, per_item=per_item, backend="triton")))
            case(f"mind per_item={per_item} {dtype}", lambda: backward(gr.mind(vol, per_item=per_item, backend="triton")))
        for descriptor in ("ssc", "mind"):
            for penalty in ("l1", "l2"):
                case(f"mind_loss {descriptor} {penalty} {dtype}", lambda: backward(
                    gr.mind_loss(vol, other, descriptor=descriptor, penalty=penalty, backend="triton")))
        for convention in ("voxelmorph", "monai"):
            for reduction in ("mean", "none"):
                case(f"lncc_loss {convention} {reduction} {dtype}", lambda: backward(
                    gr.lncc_loss(vol, other, window=3, convention=convention, reduction=reduction, backend="triton")))
        for padding in ("zeros", "border"):
            case(f"integrate_velocity {padding} {dtype}",
                 lambda: backward(gr.integrate_velocity(flow, 3, padding, backend="triton")))
            for weighted in (False, True):
                weight = torch.rand(2, 1, *shape[2:], dtype=dtype, generator=gen) if weighted else None
                case(f"warped_sq_diff {padding} weight={weighted} {dtype}", lambda: backward(
                    gr.warped_sq_diff(vol, other, flow, weight, padding, backend="triton")))
        descriptors = leaf(1, 4, 6, 7, 8, dtype=dtype), leaf(1, 4, 6, 7, 8, dtype=dtype)
        for grid in (1, 2):
            case(f"mind_cost_volume grid={grid} {dtype}", lambda: backward(
                gr.mind_cost_volume(*descriptors, radius=1, spacing=1, grid=grid, backend="triton")))
        cost = torch.rand(1, 27, 3, 4, 5, dtype=dtype, generator=gen)
        field = torch.rand(1, 3, 3, 4, 5, dtype=dtype, generator=gen)
        for mirrored in (False, True):
            case(f"coupled_argmin mirrored={mirrored} {dtype}",
                 lambda: gr.coupled_argmin(cost, field, 0.5, mirrored=mirrored, backend="triton"))
    return compiled, errors


if __name__ == "__main__":
    names, failures = _compile_everything(int(sys.argv[1]))
    print(f"compiled for sm_{sys.argv[1]}: {', '.join(sorted(names))}")
    for name, error in failures:
        print(f"FAILED {name}\n{error}\n")
    sys.exit(1 if failures else 0)


# A case that silently fell back to another backend would compile nothing and pass: every kernel module
# must show up among the compiled kernels.
KERNEL_MODULES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "gradreg_fast" / "triton_kernels")
                        .glob("*.py") if p.stem != "__init__")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install 'gradreg_fast[triton]')")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_triton_kernel_compiles(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    compiled = result.stdout.split(f"compiled for sm_{arch}: ", 1)[1].splitlines()[0].split(", ")
    assert sorted({name.split(".")[0] for name in compiled}) == KERNEL_MODULES, compiled
