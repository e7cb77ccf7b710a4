"""GPU benchmark of gradreg_fast, in one run: build, check, time, report.

1. Builds the CUDA core in place (``python setup.py build_ext --inplace``) if ``gradreg_fast._cuda`` is
   missing or older than this script (lacks an entry point).
2. Checks every backend (cuda, triton, reference) of every op against the float64 reference, forward
   and gradients, on an odd-sized volume (float32 and float64).
3. Times, on CUDA, for gradient magnitude, warp, MIND-SSC and the MIND-SSC loss, at 1x1x144x144x128 and
   1x1x192x160x192 (the MIND cost volume on 12-channel descriptors at 1/4 of those sizes, radius 2; the
   engine's warped_sq_diff on 24 channels at 1/2 and coupled_argmin on 125 costs at 1/4),
   forward and forward+backward:
   the backends ``cuda``, ``triton``, ``reference`` (the custom op routed to the naive code), against
   ``naive`` PyTorch (gradreg_fast.reference; for MIND the ConvexAdam-style mind_ssc_convexadam that
   registration code uses), ``compiled`` (torch.compile of the naive code) and, for warp,
   ``grid_sample`` (grid built before timing).
   Timing: CUDA events around a loop over several input sets (rotated so that the working set exceeds
   twice the L2 cache and repeated runs cannot be served from it), after warm-up; the median of
   several samples. Peak memory: torch.cuda.max_memory_allocated during one call, minus what was
   allocated before it (inputs excluded), reset between cases.
4. Measures the device-to-device copy bandwidth (a large torch copy: bytes read + written over time)
   and reports each case's achieved fraction of it, from the fewest bytes the op must move (each input
   read once, each output written once).
5. Prints a markdown table and the targets (H100): gradient magnitude and warp forward >= 70% of copy
   bandwidth; MIND-SSC forward+backward >= 20x naive; warp forward+backward >= 1.5x grid_sample.

Usage: python benchmarks/gpu_benchmark.py [--quick | --fast] [--json results.json] [--samples 7] [--no-build]
(--quick: small volumes, a dry run whose timings mean nothing. --fast: the main size alone, 3 samples,
without the reference backend's timings and without torch.compile of the naive code: real figures
for the targets in about a minute, as scripts/device_check.sh runs it.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CORE_ENTRY_POINTS = (
    "gradient_magnitude_forward", "gradient_magnitude_backward", "warp_forward", "warp_backward",
    "warp_workspace_bytes", "descriptor_forward", "descriptor_backward", "descriptor_loss_backward",
    "descriptor_workspace_bytes", "penalty_sum", "penalty_workspace_bytes", "cost_volume_forward",
    "cost_volume_backward",
)

# lncc_loss and integrate_velocity (issue 14).
CORE_ENTRY_POINTS += ("lncc_forward", "lncc_backward", "lncc_workspace_bytes", "integrate_forward",
                      "integrate_backward")


def ensure_cuda_core(build: bool) -> None:
    """Builds gradreg_fast._cuda in place when it is missing or lacks an entry point (checked in a fresh
    interpreter, so that a failed import is not cached in this one)."""
    probe = f"import gradreg_fast._cuda as m; missing = [n for n in {CORE_ENTRY_POINTS!r} if not hasattr(m, n)]; " \
            "assert not missing, missing"
    if subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True).returncode == 0:
        return
    if not build:
        sys.exit("gradreg_fast._cuda is missing or out of date; run without --no-build to build it")
    print("building the CUDA core: python setup.py build_ext --inplace", flush=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, check=True)


# Imported after the build, so that this process loads the fresh extension.
torch = None
F = None
gradreg_fast = None
reference = None


def _import_torch_and_package():
    global torch, F, gradreg_fast, reference
    import torch as _torch
    import torch.nn.functional as _F

    sys.path.insert(0, str(ROOT))
    import gradreg_fast as _gradreg_fast
    from gradreg_fast import reference as _reference

    torch, F, gradreg_fast, reference = _torch, _F, _gradreg_fast, _reference


# ---------------------------------------------------------------- the ops and their implementations

FLOW_AMPLITUDE_VOXELS = 3.0


def smooth_flow(shape, generator, device, dtype):
    """A smooth random displacement (N, 3, D, H, W) in voxels, at most FLOW_AMPLITUDE_VOXELS per axis."""
    n, spatial = shape[0], shape[2:]
    coarse = torch.randn(n, 3, *(max(2, s // 16) for s in spatial), generator=generator, dtype=torch.float64)
    flow = F.interpolate(coarse, size=spatial, mode="trilinear", align_corners=True)
    return (flow * (FLOW_AMPLITUDE_VOXELS / flow.abs().amax())).to(device=device, dtype=dtype)


def grid_from_flow(flow):
    """The grid_sample(align_corners=True) grid (N, D, H, W, 3) that samples at identity + flow."""
    spatial = flow.shape[2:]
    identity = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=flow.dtype, device=flow.device)
                                            for s in spatial], indexing="ij"))
    scale = torch.tensor([2.0 / (s - 1) for s in spatial], dtype=flow.dtype, device=flow.device).view(1, 3, 1, 1, 1)
    return ((identity + flow) * scale - 1).flip(1).permute(0, 2, 3, 4, 1).contiguous()


def naive_mind_loss(warped, fixed):
    return (reference.mind_ssc_convexadam(warped) - reference.mind_ssc_convexadam(fixed)).abs().mean()


@dataclass
class Op:
    name: str
    make_inputs: Callable  # (shape, generator, device, dtype) -> list of tensors
    grad_inputs: tuple  # indices of the inputs differentiated in fwd_bwd
    backends: Callable  # backend name -> fn(*inputs)
    naive: Callable
    minimal_bytes: Callable  # (shape, pass, itemsize) -> bytes each pass must move at least
    extra_impls: dict = field(default_factory=dict)  # name -> (prepare(inputs) -> inputs, fn)


def _volume_inputs(shape, generator, device, dtype):
    return [torch.rand(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)]


def _warp_inputs(shape, generator, device, dtype):
    image = torch.rand(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return [image, smooth_flow(shape, generator, device, dtype)]


def _loss_inputs(shape, generator, device, dtype):
    return _volume_inputs(shape, generator, device, dtype) + _volume_inputs(shape, generator, device, dtype)


def _voxels(shape):
    return math.prod(shape[2:]) * shape[0]


def _gm_bytes(shape, pass_, itemsize):
    v = _voxels(shape) * shape[1]
    return itemsize * v * (2 if pass_ == "fwd" else 2 + 4)  # fwd: vol, out; bwd: grad_out, vol, out, grad_vol


def _warp_bytes(shape, pass_, itemsize):
    v, c = _voxels(shape), shape[1]
    fwd = 2 * c + 3  # image, flow, out
    bwd = (c + c + 3) + (c + 3)  # grad_out, image, flow in; grad_image, grad_flow out
    return itemsize * v * (fwd if pass_ == "fwd" else fwd + bwd)


def _mind_bytes(shape, pass_, itemsize, k=12):
    v = _voxels(shape)
    fwd = itemsize * v * (1 + k + 1) + v  # vol; out, variance; flags
    bwd = itemsize * v * (k + k + 1 + 1 + 1) + v  # grad_out, out, variance, vol, grad_vol; flags
    return fwd if pass_ == "fwd" else fwd + bwd


def _loss_bytes(shape, pass_, itemsize, k=12):
    mind_fwd = _mind_bytes(shape, "fwd", itemsize, k)
    mind_bwd = _mind_bytes(shape, "fwd_bwd", itemsize, k) - mind_fwd  # the target replaces grad_out
    fwd = 2 * mind_fwd + 2 * k * _voxels(shape) * itemsize  # both descriptors, then the penalty reads them
    return fwd if pass_ == "fwd" else fwd + mind_bwd


# mind_cost_volume runs on pooled descriptors (12 channels at 1/4 of each axis, as the registration
# engine calls it); radius 2 (125 displacements) keeps torch.compile of the naive loop short.
COST_VOLUME_RADIUS = 2


def _descriptor_pair_inputs(shape, generator, device, dtype):
    pooled = (shape[0], 12, *(max(1, s // 4) for s in shape[2:]))
    return [torch.rand(pooled, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(2)]


def _cost_volume_bytes(shape, pass_, itemsize):
    pooled = math.prod(max(1, s // 4) for s in shape[2:]) * shape[0]
    descriptors, costs = 2 * 12 * pooled, (2 * COST_VOLUME_RADIUS + 1) ** 3 * pooled
    return itemsize * (descriptors + costs if pass_ == "fwd" else 2 * (descriptors + costs) + descriptors)


def _lncc_bytes(shape, pass_, itemsize):
    """Two images read; with the backward, 3 coefficients written and read back, the upstream-free gradient
    written and both images read again."""
    volume = itemsize * _voxels(shape)
    return 2 * volume if pass_ == "fwd" else (2 + 3 + 3 + 2 + 1) * volume


def _integrate_bytes(shape, pass_, itemsize, steps=7):
    """Each squaring step reads and writes a 3-channel field; the backward recomputes 6 steps from its 2
    checkpoints and each of its steps reads the field and the running gradient and writes the next."""
    field = 3 * itemsize * _voxels(shape)
    forward = field * (1 + 2 * steps)
    return forward if pass_ == "fwd" else forward + 2 * field + field * (2 * 6 + 3 * steps)

# warped_sq_diff and coupled_argmin as the registration engine calls them: 24 descriptor channels (image and
# gradient-map MIND-SSC) at 1/2 of each axis for the Adam stage's objective; a cost volume of radius 2 (125
# displacements) at 1/4 for the convex search.
ENGINE_CHANNELS = 24


def _warped_sq_diff_inputs(shape, generator, device, dtype):
    half = (shape[0], ENGINE_CHANNELS, *(max(1, s // 2) for s in shape[2:]))
    moving, fixed = (torch.rand(half, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
                     for _ in range(2))
    return [moving, fixed, smooth_flow((shape[0], 1, *half[2:]), generator, device, dtype)]


def _warped_sq_diff_bytes(shape, pass_, itemsize):
    """Moving, fixed and flow read; with the flow's gradient, that gradient written (by the forward, which
    forms it) and read back and scaled by the backward."""
    half = math.prod(max(1, s // 2) for s in shape[2:]) * shape[0]
    forward = itemsize * half * (2 * ENGINE_CHANNELS + 3)
    return forward if pass_ == "fwd" else forward + 3 * itemsize * half * 3


def _coupled_argmin_inputs(shape, generator, device, dtype):
    quarter = tuple(max(1, s // 4) for s in shape[2:])
    cost = torch.rand((shape[0], (2 * COST_VOLUME_RADIUS + 1) ** 3, *quarter), generator=generator,
                      dtype=torch.float64).to(device=device, dtype=dtype)
    return [cost, smooth_flow((shape[0], 1, *quarter), generator, device, dtype) / 4]


def _coupled_argmin_bytes(shape, pass_, itemsize):
    quarter = math.prod(max(1, s // 4) for s in shape[2:]) * shape[0]
    return itemsize * quarter * ((2 * COST_VOLUME_RADIUS + 1) ** 3 + 3) + 8 * quarter  # cost, field; int64 index


# box_mean as the engine smooths its cost volume: 125 channels at 1/4, two passes.
BOX_PASSES = 2


def _box_mean_inputs(shape, generator, device, dtype):
    quarter = tuple(max(1, s // 4) for s in shape[2:])
    return [torch.rand((shape[0], (2 * COST_VOLUME_RADIUS + 1) ** 3, *quarter), generator=generator,
                       dtype=torch.float64).to(device=device, dtype=dtype)]


def _box_mean_bytes(shape, pass_, itemsize):
    """Each 1D stage (three per pass) reads and writes the volume; the backward's stages as many again."""
    volume = itemsize * (2 * COST_VOLUME_RADIUS + 1) ** 3 * math.prod(max(1, s // 4) for s in shape[2:]) * shape[0]
    stages = 3 * BOX_PASSES
    return 2 * stages * volume * (1 if pass_ == "fwd" else 2)


def _grid_sample_prepare(inputs):
    image, flow = inputs
    return [image, grid_from_flow(flow.detach()).requires_grad_(flow.requires_grad)]


OPS = {
    "gradient_magnitude": Op(
        "gradient_magnitude", _volume_inputs, (0,),
        lambda b: (lambda v: gradreg_fast.gradient_magnitude(v, backend=b)),
        lambda v: reference.gradient_magnitude(v), _gm_bytes),
    "warp": Op(
        "warp", _warp_inputs, (0, 1),
        lambda b: (lambda i, f: gradreg_fast.warp(i, f, backend=b)),
        lambda i, f: reference.warp(i, f), _warp_bytes,
        extra_impls={"grid_sample": (_grid_sample_prepare, lambda i, g: F.grid_sample(
            i, g, mode="bilinear", padding_mode="zeros", align_corners=True))}),
    "mind_ssc": Op(
        "mind_ssc", _volume_inputs, (0,),
        lambda b: (lambda v: gradreg_fast.mind_ssc(v, backend=b)),
        lambda v: reference.mind_ssc_convexadam(v), _mind_bytes),
    "mind_loss": Op(
        "mind_loss", _loss_inputs, (0,),
        lambda b: (lambda w, f: gradreg_fast.mind_loss(w, f, backend=b)),
        naive_mind_loss, _loss_bytes),
    "lncc_loss": Op(
        "lncc_loss", _loss_inputs, (0,),
        lambda b: (lambda w, f: gradreg_fast.lncc_loss(w, f, 9, backend=b)),
        lambda w, f: reference.lncc_loss(w, f, 9), lambda shape, pass_, itemsize: _lncc_bytes(shape, pass_, itemsize)),
    "integrate_velocity": Op(
        "integrate_velocity", lambda shape, gen, device, dtype: [4.0 * smooth_flow(shape, gen, device, dtype)], (0,),
        lambda b: (lambda v: gradreg_fast.integrate_velocity(v, 7, backend=b)),
        lambda v: reference.integrate_velocity_grid_sample(v, 7),
        lambda shape, pass_, itemsize: _integrate_bytes(shape, pass_, itemsize)),
    "mind_cost_volume": Op(
        "mind_cost_volume", _descriptor_pair_inputs, (0, 1),
        lambda b: (lambda f, m: gradreg_fast.mind_cost_volume(f, m, COST_VOLUME_RADIUS, backend=b)),
        lambda f, m: reference.mind_cost_volume(f, m, COST_VOLUME_RADIUS), _cost_volume_bytes),
    "warped_sq_diff": Op(
        "warped_sq_diff", _warped_sq_diff_inputs, (2,),  # the flow's gradient, as the engine needs
        lambda b: (lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, backend=b)),
        lambda m, f, u: reference.warped_sq_diff(m, f, u), _warped_sq_diff_bytes),
    "box_mean": Op(
        "box_mean", _box_mean_inputs, (0,),
        lambda b: (lambda v: gradreg_fast.box_mean(v, BOX_PASSES, backend=b)),
        lambda v: reference.box_mean(v, BOX_PASSES), _box_mean_bytes),
    "coupled_argmin": Op(  # not differentiable: forward only
        "coupled_argmin", _coupled_argmin_inputs, (),
        lambda b: (lambda c, u: gradreg_fast.coupled_argmin(c, u, 0.3, backend=b)),
        lambda c, u: reference.coupled_argmin(c, u, 0.3), _coupled_argmin_bytes),
}
BACKENDS = ("cuda", "triton", "reference")
PASSES = ("fwd", "fwd_bwd")


# ---------------------------------------------------------------- correctness


def relative_error(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_backends(shape) -> list[dict]:
    """Every backend of every op vs the float64 reference (the naive code for MIND-SSC is ConvexAdam's,
    equal to reference.mind_ssc; the op's own reference is used here)."""
    rows = []
    gen = torch.Generator().manual_seed(11)
    refs = {"gradient_magnitude": reference.gradient_magnitude, "warp": reference.warp,
            "mind_ssc": reference.mind_ssc, "mind_loss": reference.mind_loss,
            "mind_cost_volume": lambda f, m: reference.mind_cost_volume(f, m, COST_VOLUME_RADIUS)}
    refs.update(lncc_loss=lambda w, f: reference.lncc_loss(w, f, 9),
                integrate_velocity=lambda v: reference.integrate_velocity(v, 7),
                warped_sq_diff=reference.warped_sq_diff, coupled_argmin=lambda c, u: reference.coupled_argmin(c, u, 0.3),
                box_mean=lambda v: reference.box_mean(v, BOX_PASSES))
    for op in OPS.values():
        inputs64 = op.make_inputs(shape, gen, "cuda", torch.float64)
        expected, expected_grads = _forward_and_grads(refs[op.name], inputs64, op.grad_inputs, seed=3)
        # float32's own floor for this op: the reference run in float32. Scaling and squaring amplifies
        # rounding (integrate_velocity's float32 reference lands near 4e-4 on an H200), so a fixed 1e-4
        # would fail every backend, the reference included; a kernel may not be more than 2x worse than it.
        out32, grads32 = _forward_and_grads(refs[op.name], [x.float() for x in inputs64], op.grad_inputs, seed=3)
        float32_floor = max([relative_error(out32, expected)] +
                            [relative_error(g, e) for g, e in zip(grads32, expected_grads)])
        for backend in BACKENDS:
            for dtype in (torch.float32, torch.float64):
                row = {"op": op.name, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
                why = gradreg_fast._backend.problem(backend, torch.device("cuda"), _backend_op_name(op.name))
                if why:
                    row.update(ok=None, note=f"unavailable: {why}")
                    rows.append(row)
                    continue
                try:
                    inputs = [x.to(dtype) for x in inputs64]
                    out, grads = _forward_and_grads(op.backends(backend), inputs, op.grad_inputs, seed=3)
                    errors = [relative_error(out, expected)] + [relative_error(g, e) for g, e in
                                                                zip(grads, expected_grads)]
                    limit = max(1e-4, 2 * float32_floor) if dtype == torch.float32 else 1e-9
                    row.update(ok=max(errors) <= limit, max_rel_error=max(errors), limit=limit)
                except Exception as exc:  # report and go on: the table shows it
                    row.update(ok=False, note=f"{type(exc).__name__}: {exc}")
                rows.append(row)
    return rows


def _backend_op_name(op_name):
    if op_name in ("lncc_loss", "integrate_velocity"):
        return {"lncc_loss": "lncc", "integrate_velocity": "integrate"}[op_name]
    return {"mind_ssc": "mind", "mind_loss": "mind", "mind_cost_volume": "cost_volume"}.get(op_name, op_name)


def _forward_and_grads(fn, inputs, grad_indices, seed):
    leaves = [x.detach().clone().requires_grad_(i in grad_indices) for i, x in enumerate(inputs)]
    out = fn(*leaves)
    if not grad_indices:  # coupled_argmin: an index, no gradient
        return out.detach(), []
    gen = torch.Generator(device=out.device).manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [leaves[i] for i in grad_indices], grad_out)
    return out.detach(), grads


# ---------------------------------------------------------------- timing


def copy_bandwidth(samples: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), 1 GiB buffers."""
    n = (1 << 30) // 4
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 5)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(times)


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


@dataclass
class Case:
    op: Op
    impl: str
    pass_: str
    shape: tuple
    fn: Callable = None
    prepare: Callable = None


def build_runner(case: Case, sets):
    """A zero-argument callable doing one rotation's work for each set, and the per-set work item."""
    grad_indices = case.op.grad_inputs if case.pass_ == "fwd_bwd" else ()
    prepared = []
    for inputs in sets:
        leaves = [x.detach().clone().requires_grad_(i in grad_indices) for i, x in enumerate(inputs)]
        if case.prepare is not None:
            leaves = case.prepare(leaves)
        prepared.append(leaves)

    fn = case.fn

    def one(leaves):
        if not grad_indices:
            with torch.no_grad():
                return fn(*leaves)
        out = fn(*leaves)
        return torch.autograd.grad(out, [leaves[i] for i in grad_indices], torch.ones_like(out))

    return prepared, one


def time_case(case: Case, sets, samples: int, min_sample_s: float = 0.05) -> dict:
    prepared, one = build_runner(case, sets)
    for _ in range(2):  # warm-up: module load, JIT and torch.compile, allocator
        for leaves in prepared:
            one(leaves)
    torch.cuda.synchronize()
    # Peak memory of one call, beyond what the inputs already hold.
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one(prepared[0])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # Calls per sample: enough for min_sample_s, counted in whole rotations over the sets.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for leaves in prepared:
        one(leaves)
    end.record()
    end.synchronize()
    rotation_s = max(start.elapsed_time(end) / 1e3, 1e-6)
    rotations = max(1, math.ceil(min_sample_s / rotation_s))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(rotations):
            for leaves in prepared:
                one(leaves)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rotations * len(prepared)))
    result = {"time_s": statistics.median(times), "spread": (max(times) - min(times)) / statistics.median(times),
              "peak_bytes": peak}
    result.update(time_graph(prepared, one, samples, rotations))
    return result


def time_graph(prepared, one, samples: int, rotations: int) -> dict:
    """The same rotation captured once in a CUDA graph and replayed: the GPU time of the kernels without
    the host's per-call cost (Python, dispatch, launch), which at these sizes is larger than the kernels'
    own time on an H100/H200 and would hide them. A case that cannot be captured (a host sync inside)
    reports why instead."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for leaves in prepared:
                one(leaves)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for leaves in prepared:
                one(leaves)
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # reported in the table: capturability is itself a result
        torch.cuda.synchronize()
        return {"graph_note": f"not capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(rotations):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rotations * len(prepared)))
    del graph
    return {"graph_time_s": statistics.median(times)}


def cases_for(op: Op, shape, fast: bool = False) -> list[Case]:
    cases = []
    for backend in BACKENDS:
        if not (fast and backend == "reference"):
            cases.append(Case(op, backend, "", shape, fn=op.backends(backend)))
    cases.append(Case(op, "naive", "", shape, fn=op.naive))
    if not fast:  # compiling the naive code takes longer than timing everything else
        cases.append(Case(op, "compiled", "", shape, fn=torch.compile(op.naive, dynamic=False)))
    for name, (prepare, fn) in op.extra_impls.items():
        cases.append(Case(op, name, "", shape, fn=fn, prepare=prepare))
    return cases


def run_timings(sizes, samples, bandwidth, fast: bool = False) -> list[dict]:
    rows = []
    budget = l2_bytes()
    for op in OPS.values():
        for spatial in sizes:
            shape = (1, 1, *spatial)
            gen = torch.Generator().manual_seed(1234)
            one_set = op.make_inputs(shape, gen, "cuda", torch.float32)
            set_bytes = sum(x.numel() * x.element_size() for x in one_set)
            count = min(8, max(1, math.ceil(2 * budget / set_bytes)))
            sets = [one_set] + [op.make_inputs(shape, gen, "cuda", torch.float32) for _ in range(count - 1)]
            for template in cases_for(op, shape, fast):
                for pass_ in PASSES:
                    if pass_ == "fwd_bwd" and not op.grad_inputs:
                        continue
                    case = Case(op, template.impl, pass_, shape, template.fn, template.prepare)
                    row = {"op": op.name, "size": "x".join(map(str, shape)), "pass": pass_, "impl": case.impl}
                    if case.impl in BACKENDS:
                        why = gradreg_fast._backend.problem(case.impl, torch.device("cuda"),
                                                            _backend_op_name(op.name))
                        if why:
                            rows.append({**row, "note": f"unavailable: {why}"})
                            continue
                    try:
                        row.update(time_case(case, sets, samples))
                        moved = op.minimal_bytes(shape, pass_, 4)
                        row["bandwidth_fraction"] = moved / row["time_s"] / bandwidth
                        if "graph_time_s" in row:
                            row["graph_bandwidth_fraction"] = moved / row["graph_time_s"] / bandwidth
                    except Exception as exc:
                        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        traceback.print_exc(limit=2)
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(_row_line(row), flush=True)
            del sets, one_set
            torch.cuda.empty_cache()
    return rows


def _row_line(row):
    if "time_s" not in row:
        return f"{row['op']:>18} {row['size']:>16} {row['pass']:>7} {row['impl']:>11}  {row.get('note', '')}"
    return (f"{row['op']:>18} {row['size']:>16} {row['pass']:>7} {row['impl']:>11} {row['time_s'] * 1e3:9.3f} ms "
            f"({row['spread'] * 100:4.1f}% spread) {row['bandwidth_fraction'] * 100:6.1f}% copy BW "
            f"{row['peak_bytes'] / 2**20:8.1f} MiB | graph: " +
            (f"{row['graph_time_s'] * 1e3:.3f} ms {row['graph_bandwidth_fraction'] * 100:.1f}% copy BW"
             if "graph_time_s" in row else row.get("graph_note", "")))


# ---------------------------------------------------------------- report


def _time(rows, op, size, pass_, impl, key="time_s"):
    for r in rows:
        if (r["op"], r["size"], r["pass"], r["impl"]) == (op, size, pass_, impl) and key in r:
            return r[key]
    return None


def targets(rows, sizes) -> list[str]:
    lines = []
    for spatial in sizes:
        size = "x".join(map(str, (1, 1, *spatial)))
        for op in ("gradient_magnitude", "warp"):
            r = next((r for r in rows if (r["op"], r["size"], r["pass"], r["impl"]) == (op, size, "fwd", "cuda")
                      and "time_s" in r), None)
            if r:
                for key, how in (("bandwidth_fraction", "eager calls"), ("graph_bandwidth_fraction", "graph replay")):
                    if key in r:
                        frac = r[key]
                        lines.append(f"- {op} forward, cuda, {size}, {how}: {frac * 100:.1f}% of copy bandwidth "
                                     f"(target >= 70%): {'MET' if frac >= 0.7 else 'MISSED'}")
        for key, how in (("time_s", "eager calls"), ("graph_time_s", "graph replay")):
            naive = _time(rows, "mind_ssc", size, "fwd_bwd", "naive", key)
            fused = _time(rows, "mind_ssc", size, "fwd_bwd", "cuda", key)
            if naive and fused:
                lines.append(f"- MIND-SSC forward+backward, cuda vs naive, {size}, {how}: {naive / fused:.1f}x "
                             f"(target >= 20x): {'MET' if naive / fused >= 20 else 'MISSED'}")
            grid = _time(rows, "warp", size, "fwd_bwd", "grid_sample", key)
            fused = _time(rows, "warp", size, "fwd_bwd", "cuda", key)
            if grid and fused:
                lines.append(f"- warp forward+backward, cuda vs grid_sample, {size}, {how}: {grid / fused:.2f}x "
                             f"(target >= 1.5x): {'MET' if grid / fused >= 1.5 else 'MISSED'}")
    return lines


def markdown(rows, checks, bandwidth, device, sizes) -> str:
    out = [f"## gradreg_fast GPU benchmark on {device}", "",
           f"Device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write).", "",
           "### Correctness (relative L2 error vs the float64 reference, forward and gradients)", "",
           "| op | backend | dtype | result |", "|---|---|---|---|"]
    for c in checks:
        if c.get("ok") is None:
            result = c["note"]
        elif "max_rel_error" in c:
            result = f"{'ok' if c['ok'] else 'FAIL'} ({c['max_rel_error']:.1e})"
        else:
            result = f"FAIL: {c['note']}"
        out.append(f"| {c['op']} | {c['backend']} | {c['dtype']} | {result} |")
    out += ["", "### Timings (float32, median; speedup vs naive PyTorch)", "",
            "Eager: one Python call after another (what a training loop pays, host cost included). Graph: the same "
            "calls captured in a CUDA graph and replayed (the kernels' own GPU time).", "",
            "| op | size | pass | impl | eager (ms) | vs naive | % copy BW | graph (ms) | vs naive | % copy BW "
            "| peak extra (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "time_s" not in r:
            out.append(f"| {r['op']} | {r['size']} | {r['pass']} | {r['impl']} | {r.get('note', '')} | | | | | | |")
            continue
        naive = _time(rows, r["op"], r["size"], r["pass"], "naive")
        speedup = f"{naive / r['time_s']:.1f}x" if naive else ""
        if "graph_time_s" in r:
            graph_naive = _time(rows, r["op"], r["size"], r["pass"], "naive", "graph_time_s")
            graph_speedup = f"{graph_naive / r['graph_time_s']:.1f}x" if graph_naive else ""
            graph = f"{r['graph_time_s'] * 1e3:.4f} | {graph_speedup} | {r['graph_bandwidth_fraction'] * 100:.0f}%"
        else:
            graph = f"{r.get('graph_note', '')} | | "
        out.append(f"| {r['op']} | {r['size']} | {r['pass']} | {r['impl']} | {r['time_s'] * 1e3:.3f} | {speedup} | "
                   f"{r['bandwidth_fraction'] * 100:.0f}% | {graph} | {r['peak_bytes'] / 2**20:.0f} |")
    out += ["", "### Targets", ""] + targets(rows, sizes)
    return "\n".join(out)


def write_json_atomically(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small volumes: a dry run, timings mean nothing")
    mode.add_argument("--fast", action="store_true",
                      help="main size only, 3 samples, no reference-backend timings, no torch.compile: about a minute")
    parser.add_argument("--samples", type=int, default=7, help="timed samples per case (median reported)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building a missing CUDA core")
    args = parser.parse_args()

    ensure_cuda_core(build=not args.no_build)
    _import_torch_and_package()
    if not torch.cuda.is_available():
        sys.exit("gpu_benchmark.py needs a CUDA device")
    device = torch.cuda.get_device_name(0)
    sizes = [(24, 21, 19), (32, 27, 30)] if args.quick else [(144, 144, 128), (192, 160, 192)]
    if args.fast:
        sizes, args.samples = [(144, 144, 128)], min(args.samples, 3)

    bandwidth = copy_bandwidth(args.samples)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s on {device}", flush=True)
    checks = check_backends((2, 1, 13, 17, 19) if not args.quick else (1, 1, 7, 9, 11))
    for c in checks:
        print("check:", c, flush=True)
    rows = run_timings(sizes, args.samples, bandwidth, args.fast)
    report = markdown(rows, checks, bandwidth, device, sizes)
    if args.json:
        write_json_atomically(args.json, {"device": device, "copy_bandwidth": bandwidth, "checks": checks,
                                          "timings": rows, "report": report})
    print()
    print(report)


if __name__ == "__main__":
    main()
