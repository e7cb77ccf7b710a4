"""Every Triton kernel of the package compiles to GPU machine code (cubin) for sm_80 and sm_90, on a
machine without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check the kernels' arithmetic but never compile them, and
Triton's compiler refuses code that its interpreter runs (a loop-carried variable changing type, for
one: the warp kernel's reused ``_`` did exactly that, and only a GPU machine showed it). Here a stand-in
driver reports a CUDA target and every launch is turned into a compile-only warm-up, so the calls of
scripts/kernel_workout.py (the sanitizer's workload: every op, forward and backward, every mode, both dtypes,
odd sizes and sizes of 1) run the Triton paths on CPU tensors with the specialisations they use, and each
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


def _compile_everything(arch: int) -> set[str]:
    """The names of the kernels compiled; the first compile error propagates."""
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

    from gradreg_fast import _backend

    _backend._triton_problem = lambda device: None  # CPU tensors stand for CUDA ones; nothing is launched
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from kernel_workout import workout

    workout("cpu", "triton", check_values=False)
    return compiled


if __name__ == "__main__":
    names = _compile_everything(int(sys.argv[1]))
    print(f"compiled for sm_{sys.argv[1]}: {', '.join(sorted(names))}")


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
