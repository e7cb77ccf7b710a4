"""The benchmarked cases, shared by the pytest-benchmark files and ``peak_memory.py``.

A case is (op, implementation, pass, size). Its ``build()`` allocates the inputs once and returns a
zero-argument ``run`` that does exactly the timed work: the forward, or the forward and the backward
(``torch.autograd.grad`` with a fixed upstream gradient, so nothing accumulates between rounds).

Implementations:

* ``fused``: the gradreg_fast op with ``backend="cpu"`` (the compiled C++/OpenMP core; it raises if
  the core is missing instead of silently timing the reference).
* ``eager``: the naive PyTorch code, run eagerly: ``gradreg_fast.reference.gradient_magnitude`` /
  ``.warp``, and for MIND the widely used ConvexAdam-style ``mind_ssc_convexadam`` (conv3d shifts,
  avg_pool3d, a ``.item()`` variance clamp) and its loss ``mean |desc(warped) - desc(fixed)|``.
* ``compiled``: ``torch.compile(<the eager code>, dynamic=False)`` (inductor, CPU), one static graph
  per shape. The MIND code is compiled as it is: its ``.item()`` causes a graph break, which is what
  a user who compiles it gets.
* ``grid_sample`` (warp only): ``F.grid_sample(align_corners=True)`` on a grid built from identity +
  flow before timing (building the grid is not timed).

Passes: ``fwd`` (no input needs a gradient, so no autograd graph is recorded), ``fwd_bwd`` (every
differentiable input needs one: the volume; for warp the image and the flow; for the loss the warped
image, the fixed image being data), and for warp ``fwd_bwd_flow`` (only the flow needs a gradient, the
usual case when training a registration network).

Environment: ``BENCH_QUICK=1`` swaps the volumes for tiny ones (a dry run of the scripts; its timings
mean nothing), ``BENCH_THREADS`` (default 2) sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import gradreg_fast
from gradreg_fast import reference

QUICK = os.environ.get("BENCH_QUICK", "0") == "1"
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

# glibc returns large freed blocks to the OS by default, so naive PyTorch code, which allocates a fresh
# tensor per step, pays page faults on every call; these keep freed memory in the heap instead.
TIMING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

# (D, H, W). "main" is the volume the targets are stated for.
FULL_SIZES = {"small": (96, 96, 96), "main": (144, 144, 128), "large": (192, 160, 192)}
QUICK_SIZES = {"small": (20, 17, 16), "main": (32, 29, 24), "large": (40, 37, 32)}
SIZES = QUICK_SIZES if QUICK else FULL_SIZES

IMPLS = {
    "gradient_magnitude": ("fused", "eager", "compiled"),
    "warp": ("fused", "eager", "compiled", "grid_sample"),
    "mind_ssc": ("fused", "eager", "compiled"),
    "mind_loss": ("fused", "eager", "compiled"),
}
PASSES = {
    "gradient_magnitude": ("fwd", "fwd_bwd"),
    "warp": ("fwd", "fwd_bwd", "fwd_bwd_flow"),
    "mind_ssc": ("fwd", "fwd_bwd"),
    "mind_loss": ("fwd_bwd",),
}
# Which inputs need a gradient, by pass (indices into the op's inputs).
_GRAD_INPUTS = {
    ("gradient_magnitude", "fwd_bwd"): (0,),
    ("warp", "fwd_bwd"): (0, 1),
    ("warp", "fwd_bwd_flow"): (1,),
    ("mind_ssc", "fwd_bwd"): (0,),
    ("mind_loss", "fwd_bwd"): (0,),
}

FLOW_AMPLITUDE_VOXELS = 3.0
SEED = 1234


def naive_mind_loss(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """The MIND-SSC loss as usually written: mean |MIND-SSC(warped) - MIND-SSC(fixed)|."""
    return (reference.mind_ssc_convexadam(warped) - reference.mind_ssc_convexadam(fixed)).abs().mean()


def _grid_sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


FUSED = {
    "gradient_magnitude": functools.partial(gradreg_fast.gradient_magnitude, backend="cpu"),
    "warp": functools.partial(gradreg_fast.warp, backend="cpu"),
    "mind_ssc": functools.partial(gradreg_fast.mind_ssc, backend="cpu"),
    "mind_loss": gradreg_fast.MINDLoss(backend="cpu"),
}
NAIVE = {
    "gradient_magnitude": reference.gradient_magnitude,
    "warp": reference.warp,
    "mind_ssc": reference.mind_ssc_convexadam,
    "mind_loss": naive_mind_loss,
}


def smooth_flow(shape, generator: torch.Generator) -> torch.Tensor:
    """A smooth random displacement (N, 3, D, H, W) in voxels, at most FLOW_AMPLITUDE_VOXELS long per axis."""
    n, spatial = shape[0], shape[2:]
    coarse = torch.randn(n, 3, *(max(2, s // 16) for s in spatial), generator=generator)
    flow = F.interpolate(coarse, size=spatial, mode="trilinear", align_corners=True)
    return flow * (FLOW_AMPLITUDE_VOXELS / flow.abs().amax())


def grid_from_flow(flow: torch.Tensor) -> torch.Tensor:
    """The grid_sample(align_corners=True) grid (N, D, H, W, 3) that samples at identity + flow."""
    spatial = flow.shape[2:]
    identity = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype) for s in spatial], indexing="ij"))
    scale = torch.tensor([2.0 / (s - 1) for s in spatial], dtype=flow.dtype).view(1, 3, 1, 1, 1)
    grid = (identity + flow) * scale - 1
    return grid.flip(1).permute(0, 2, 3, 4, 1).contiguous()  # channels last, in (x, y, z) order


def grid_gradient_as_flow_gradient(grad_grid: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. grid_from_flow's grid, expressed w.r.t. its flow (for the result checks)."""
    spatial = grad_grid.shape[1:4]
    scale = torch.tensor([2.0 / (s - 1) for s in spatial], dtype=grad_grid.dtype).view(1, 3, 1, 1, 1)
    return grad_grid.permute(0, 4, 1, 2, 3).flip(1) * scale


def make_inputs(op: str, shape) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    if op == "warp":
        return [torch.rand(shape, generator=generator), smooth_flow(shape, generator)]
    if op == "mind_loss":
        return [torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)]
    return [torch.rand(shape, generator=generator)]


def output_shape(op: str, shape):
    if op == "mind_ssc":
        return (shape[0], 12, *shape[2:])
    if op == "mind_loss":
        return ()
    return tuple(shape)


@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    pass_: str
    size: str

    def __post_init__(self):
        if self.op not in IMPLS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {tuple(IMPLS)}")
        if self.impl not in IMPLS[self.op]:
            raise ValueError(f"{self.op}: unknown impl {self.impl!r}; expected one of {IMPLS[self.op]}")
        if self.pass_ not in PASSES[self.op]:
            raise ValueError(f"{self.op}: unknown pass {self.pass_!r}; expected one of {PASSES[self.op]}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, 1, *SIZES[self.size])

    @property
    def group(self) -> str:
        return f"{self.op} {self.pass_} {self.size} {'x'.join(map(str, self.shape))}"

    def info(self) -> dict:
        return {"op": self.op, "impl": self.impl, "pass": self.pass_, "size": self.size, "shape": list(self.shape),
                "quick": QUICK, "threads": THREADS}

    def _function_and_inputs(self):
        inputs = make_inputs(self.op, self.shape)
        if self.impl == "fused":
            return FUSED[self.op], inputs
        if self.impl == "eager":
            return NAIVE[self.op], inputs
        if self.impl == "compiled":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no shape generalisation
            return torch.compile(NAIVE[self.op], dynamic=False), inputs
        image, flow = inputs  # grid_sample
        return _grid_sample, [image, grid_from_flow(flow)]

    def build(self) -> Callable[[], list[torch.Tensor]]:
        """Allocate the inputs; return ``run``, which returns [output, *input gradients]."""
        fn, inputs = self._function_and_inputs()
        wrt = [inputs[i].requires_grad_() for i in _GRAD_INPUTS.get((self.op, self.pass_), ())]
        if not wrt:
            return lambda: [fn(*inputs)]
        grad_out = None
        if output_shape(self.op, self.shape):
            grad_out = torch.randn(output_shape(self.op, self.shape), generator=torch.Generator().manual_seed(SEED + 1))

        def run():
            out = fn(*inputs)
            return [out, *torch.autograd.grad(out, wrt, grad_out)]

        return run

    def check_against_fused(self, result: list[torch.Tensor]) -> None:
        """Raise unless ``result`` (from this case's ``run``) matches the fused op on the same inputs.

        A benchmark that compares different computations is meaningless, so every baseline is checked
        once, untimed. Outputs must agree to 1e-3 of their largest value, everywhere. Gradients are
        compared in relative L2 norm (1e-2): they are only piecewise smooth (the per-voxel minimum of
        MIND-SSC, whose channels tie exactly near replicate edges; trilinear weights at integer sample
        points), so a float32 rounding difference legitimately changes them at a few voxels. A wrong
        convention (axis order, grid scaling, channel order) is off by far more than either bound.
        """
        expected = Case(self.op, "fused", self.pass_, self.size).build()()
        result = [t.detach() for t in result]
        if self.impl == "grid_sample" and self.pass_ != "fwd":
            result[-1] = grid_gradient_as_flow_gradient(result[-1])
        names = ["output"] + [f"gradient of input {i}" for i in _GRAD_INPUTS.get((self.op, self.pass_), ())]
        tiny = torch.finfo(torch.float32).tiny
        for name, got, want in zip(names, result, expected):
            want = want.detach()
            if got.shape != want.shape:
                raise AssertionError(f"{self}: {name} has shape {tuple(got.shape)}, fused gives {tuple(want.shape)}")
            if name == "output":
                error, bound, what = ((got - want).abs().max() / want.abs().max().clamp_min(tiny)).item(), 1e-3, "max"
            else:
                error, bound, what = ((got - want).norm() / want.norm().clamp_min(tiny)).item(), 1e-2, "L2 norm"
            if not error <= bound:
                raise AssertionError(f"{self}: {name} differs from the fused op by {error:.2e} (relative {what}), "
                                     f"more than {bound:.0e}")
