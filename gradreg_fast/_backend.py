"""Which implementation runs an op: the compiled CPU core, the CUDA core, Triton, or the reference.

Rule of ``backend="auto"`` (documented in the README):

* CPU tensors: the CPU core (``gradreg_fast._C``); the reference if it is missing.
* CUDA tensors: per op, the faster of the CUDA core and Triton on an H200 first (``CUDA_ORDER``),
  then the other, then the reference. The CUDA core only if it was built and supports the device's
  compute capability; Triton only if it imports.

On the CPU the compiled core is the measured fastest (benchmarks/RESULTS.md; Triton runs on CPU
tensors only in its interpreter). On CUDA, ``CUDA_ORDER`` follows benchmarks/gpu_benchmark.py on an
H200 (benchmarks/RESULTS.md, 2026-11-30): forward + backward of one 1x1x144x144x128 float32 volume,
eager calls as a training loop makes them. A missing core gives one warning that says why; a backend
asked for explicitly that cannot run raises.

The choice can be set per call (``backend=``), globally (:func:`set_backend`), or with the
environment variable ``GRADREG_BACKEND``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_default_backend = None  # None: read GRADREG_BACKEND, else "auto"
_warned = set()


def _validate_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the backend used when an op is called with ``backend=None``; ``None`` restores the default."""
    global _default_backend
    _default_backend = None if name is None else _validate_name(name, "backend")


def get_backend() -> str:
    """The backend used when an op is called with ``backend=None``."""
    if _default_backend is not None:
        return _default_backend
    return _validate_name(os.environ.get("GRADREG_BACKEND", "auto"), "GRADREG_BACKEND")


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """(module, None) or (None, why it failed)."""
    try:
        return importlib.import_module(module), None
    except ImportError as exc:  # absent or built for another ABI
        return None, f"{type(exc).__name__}: {exc}"


# Which GPU backend "auto" tries first, per op (the name the backends know the kernels by). Triton
# where it was faster on the H200 (ms, forward + backward, Triton vs CUDA core): MIND-SSC 1.76 vs 6.07,
# the fused MIND loss 2.57 vs 7.99, warp 0.69 vs 0.74 (0.11 vs 0.16 in a CUDA graph), integration 2.16 vs
# 2.50, cost volume 0.70 vs 1.82. The CUDA core where it was: gradient magnitude 0.31 vs 0.69, LNCC
# 0.95 vs 1.31. Not timed on a GPU yet, so the CUDA core first: coupled_argmin, warped_sq_diff, box_mean.
TRITON_FIRST = ("triton", "cuda")
CUDA_ORDER = {"mind": TRITON_FIRST, "warp": TRITON_FIRST, "integrate": TRITON_FIRST, "cost_volume": TRITON_FIRST}

# The CUDA core's forward entry point of an op, where it is not f"{op}_forward".
_CUDA_ENTRY_POINTS = {"mind": "descriptor_forward"}


def cpu_core():
    return _import("gradreg_fast._C")[0]


def cuda_core():
    return _import("gradreg_fast._cuda")[0]


@functools.lru_cache(maxsize=None)
def _cuda_device_problem(index: int) -> str | None:
    module, why = _import("gradreg_fast._cuda")
    if module is None:
        return f"the CUDA core (gradreg_fast._cuda) is not importable ({why}); build with nvcc on PATH"
    problem = module.device_check(index)
    return problem or None


def _triton_problem(device: torch.device) -> str | None:
    module, why = _import("triton")
    if module is None:
        return f"triton is not installed ({why}); pip install 'gradreg_fast[triton]'"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "Triton runs on CUDA tensors (or on CPU tensors only under TRITON_INTERPRET=1)"


def problem(backend: str, device: torch.device, op: str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the CPU core takes CPU tensors, got a {device.type} tensor"
        module, why = _import("gradreg_fast._C")
        if module is None:
            return f"the CPU core (gradreg_fast._C) is not importable ({why}); reinstall gradreg_fast"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA core takes CUDA tensors, got a {device.type} tensor"
        why = _cuda_device_problem(device.index if device.index is not None else torch.cuda.current_device())
        if why:
            return why
        if not hasattr(cuda_core(), _CUDA_ENTRY_POINTS.get(op, f"{op}_forward")):
            return f"the CUDA core has no kernel for {op} yet"
        return None
    if backend == "triton":
        why = _triton_problem(device)
        if why:
            return why
        if _import(f"gradreg_fast.triton_kernels.{op}")[0] is None:
            return f"no Triton kernel for {op}: {_import(f'gradreg_fast.triton_kernels.{op}')[1]}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The concrete backend for one call."""
    name = get_backend() if backend is None else _validate_name(backend, "backend")
    if name != "auto":
        why = problem(name, device, op)
        if why:
            raise RuntimeError(f"gradreg_fast.{op}: backend {name!r} is not available: {why}")
        return name
    candidates = ("cpu",) if device.type == "cpu" else CUDA_ORDER.get(op, ("cuda", "triton")) \
        if device.type == "cuda" else ()
    reasons = []
    for candidate in candidates:
        why = problem(candidate, device, op)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    if reasons:
        _warn_once(
            f"{op}:{device.type}",
            f"gradreg_fast.{op}: falling back to the slow PyTorch reference on {device.type} ({'; '.join(reasons)})",
        )
    return "reference"
