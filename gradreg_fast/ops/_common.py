"""Argument checks and launch helpers shared by the op files."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator

import torch

from .. import _backend

# A torch without the custom-op API would fail at the first op definition with an AttributeError naming neither
# gradreg_fast nor the version it needs.
if not (hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_vmap")):
    raise ImportError(f"gradreg_fast needs torch >= 2.5 (torch.library.custom_op and register_vmap); this is torch "
                      f"{torch.__version__}")

_COMPUTE_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)


def check_volume(op: str, name: str, t, channels: int | None = None) -> None:
    """Raise a clear error unless ``t`` is a non-empty floating (N, C, D, H, W) tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{op}: `{name}` must have 5 dimensions (N, C, D, H, W), got shape {tuple(t.shape)}")
    # Only these reach the kernels (the two half types as float32): any other floating type (float8 ...) would be
    # read as float32 memory.
    if t.dtype not in _UPCAST_DTYPES + (torch.float32, torch.float64):
        raise TypeError(
            f"{op}: `{name}` must be a floating-point tensor (float32 or float64; float16 and bfloat16 are "
            f"computed in float32), got {t.dtype}"
        )
    if t.numel() == 0:
        raise ValueError(f"{op}: `{name}` must not be empty, got shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{op}: `{name}` must have {channels} channel(s) in dim 1, got shape {tuple(t.shape)}")


def check_same(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor, spatial_only=False) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: `{names[0]}` is on {a.device} but `{names[1]}` is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: `{names[0]}` is {a.dtype} but `{names[1]}` is {b.dtype}; use one dtype")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or (not spatial_only and a.shape != b.shape):
        what = "batch and spatial shapes" if spatial_only else "shapes"
        raise ValueError(
            f"{op}: `{names[0]}` and `{names[1]}` must have the same {what}, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_backend(backend) -> str:
    """The backend string as given ("" = the global default)."""
    if backend is None:
        return ""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"`backend` must be one of {_backend.BACKENDS} or None, got {backend!r}")
    return backend


def backend_for(backend, t: torch.Tensor, op: str) -> str:
    """The concrete backend of one call, resolved once, in the public function, and carried into the
    custom op and from there into its backward. The backward then runs on the backend whose buffers the
    forward saved, whatever :func:`gradreg_fast.set_backend` says by then (the reference forward saves
    placeholders that another backend's backward would read as data)."""
    return _resolved(check_backend(backend), t.device, op)


# Under torch.compile the choice is made when the graph is traced and is part of the graph: a later
# set_backend does not recompile it (dynamo cannot trace the import probes of the resolution).
@torch.compiler.assume_constant_result
def _resolved(backend: str, device: torch.device, op: str) -> str:
    return _backend.resolve(backend or None, device, op)


# Larger boxes and offsets than any volume has: refused before a kernel sizes buffers or indices
# from them (2 * radius + 1 and 4 * radius must stay far inside 32-bit integers).
MAX_RADIUS = 4096
MAX_DILATION = 4096


def check_int_argument(op: str, name: str, value, minimum: int, maximum: int) -> int:
    """``value`` as an int (Python or numpy integers; not bool, not float) in [minimum, maximum]."""
    valid = not isinstance(value, bool)
    try:
        number = operator.index(value) if valid else None
    except TypeError:
        valid = False
    if not valid or not minimum <= number <= maximum:
        raise ValueError(f"{op}: `{name}` must be an int >= {minimum} (and at most {maximum}), got {value!r}")
    return number


def check_bool_argument(op: str, name: str, value) -> bool:
    """``value`` as a bool (Python or numpy bools only: ``bool("false")`` would be True)."""
    if type(value).__name__ not in ("bool", "bool_"):  # bool, numpy.bool_ (without importing numpy)
        raise TypeError(f"{op}: `{name}` must be a bool, got {value!r}")
    return bool(value)


def check_number_argument(op: str, name: str, value, allow_zero: bool = True) -> float:
    """``value`` as a float: a finite real number (Python or numpy; not a bool) >= 0, or > 0."""
    valid = isinstance(value, numbers.Real) and type(value).__name__ not in ("bool", "bool_")
    try:
        valid = valid and math.isfinite(value)
    except OverflowError:  # an int beyond float, like 10**400
        valid = False
    if not valid or value < 0 or (not allow_zero and value == 0):
        raise ValueError(f"{op}: `{name}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (and cast back); float32/float64 as they are."""
    return torch.float32 if t.dtype in _UPCAST_DTYPES else t.dtype


def resolve(backend: str, t: torch.Tensor, op: str) -> str:
    return _backend.resolve(backend or None, t.device, op)


def dtype_name(t: torch.Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


# Below this many elements, starting an OpenMP team costs more than the work (and much more on a
# loaded machine), so small calls run on one thread.
_PARALLEL_MIN_ELEMENTS = 32768


def threads(numel: int) -> int:
    """torch's thread setting, or 1 for small calls."""
    return torch.get_num_threads() if numel >= _PARALLEL_MIN_ELEMENTS else 1


def without_autocast(device: torch.device):
    """Autocast switched off for ``device`` type while a loss is computed in the dtype chosen for it."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def on_device_of(t: torch.Tensor):
    """Make ``t``'s GPU current while a kernel is launched on it (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def workspace(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Scratch memory for a CUDA kernel from torch's caching allocator (so it shows in torch's memory
    statistics). Dropping it right after the launch is safe: the allocator reuses the block only for
    work queued later on the same stream."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=t.device)


def raise_cuda_error(op: str, err: str) -> None:
    if err:
        raise RuntimeError(f"gradreg_fast.{op}: CUDA kernel failed: {err}")


def reference_vjp(fn, inputs, grad_outputs, needs):
    """Gradients of ``fn(*inputs)`` through the reference (None where not needed).

    torch.func.vjp, not torch.autograd.grad: inside a custom op's implementation the autograd
    dispatch key is excluded, and only functorch's transform re-enables differentiation there.
    """
    _, vjp = torch.func.vjp(fn, *inputs)
    grads = vjp(grad_outputs)
    return [g if need else None for g, need in zip(grads, needs)]


def _forward_mode_error(public_name: str):
    return NotImplementedError(
        f"gradreg_fast.{public_name}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad, jacfwd) is not "
        "implemented; use reverse mode (.backward(), torch.autograd.grad, torch.func.grad/vjp/jacrev)"
    )


def _no_double_backward(public_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"gradreg_fast.{public_name}: double backward (the gradient of a gradient) is not "
                           "supported; the backward of this op has no derivative of its own")
    return backward


def _loop_vmap_rule(op):
    """vmap of ``op`` as one call per slice along the vmapped dimension, stacked: exactly what vmap means
    for an op whose result depends on its whole input (MIND's mean over the batch)."""
    def rule(info, in_dims, *args):
        results = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        if isinstance(results[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])
        return torch.stack(results), 0
    return rule


def functorch_ready(op, public_name: str, setup_context=None, backward=None):
    """``op`` (a custom op) as torch.func and forward-mode AD see it correctly.

    A custom op's registered autograd formula is an autograd.Function without ``setup_context``, which
    torch.func transforms refuse, and forward-mode AD passes it by with a zero tangent. Eager calls go
    through an autograd.Function built here instead, with the same ``setup_context`` and ``backward``
    (none: the backward of a backward, which raises), a ``jvp`` that raises a clear error, and vmap
    through a per-slice rule registered on the op. Under torch.compile the op is called as it is (its
    registered formula is what AOTAutograd uses; dynamo cannot trace a custom ``jvp``)."""
    torch.library.register_vmap(op, _loop_vmap_rule(op))

    def forward(*args):
        return op(*args)

    def jvp(ctx, *tangents):
        raise _forward_mode_error(public_name)

    function = type(f"{public_name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context or (lambda ctx, inputs, output: None)),
        "backward": staticmethod(backward or _no_double_backward(public_name)),
        "jvp": staticmethod(jvp),
        "generate_vmap_rule": True,
    })

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return function.apply(*args)

    return call


cpu_core = _backend.cpu_core
cuda_core = _backend.cuda_core
