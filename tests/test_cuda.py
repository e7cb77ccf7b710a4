"""The CUDA core (gradreg_fast._cuda, csrc/cuda/*.cu) against the references, two ways.

* On a GPU (skipped without one): every op with ``backend="cuda"`` against the reference (odd sizes,
  size-1 axes, batch 2, non-contiguous inputs, float32 and float64), gradcheck, bit-identical
  deterministic warp, and scripts/cuda_sanitizer.sh (compute-sanitizer memcheck, racecheck, synccheck).
* Without a GPU: the same .cu sources compiled for the CPU against csrc/cuda/emulation.cuh (blocks of
  fibers with real barriers, grids capped at 3 blocks so that every grid-stride loop strides), checked
  at the core level. This covers the kernels' indexing, tiling, barrier placement and workspace layout;
  not warps, memory ordering or speed, which need the GPU part.

The core-level checks (``_check_*``) are shared by both: outputs and workspaces are poisoned first (NaN
and 0xFF bytes), so an element a kernel forgets to write, or scratch it reads before writing, fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import CONTRACT_FLAGS, CONTRACTION_IDS, CONTRACTIONS, GPU_BACKENDS, make_volume, requires_cuda

import gradreg_fast
from gradreg_fast import reference
from gradreg_fast.ops.mind_tables import MIND_PAIRS, SSC_PAIRS, flat_pairs
from gradreg_fast.reference.mind import self_similarity

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
EMULATION_MAX_BLOCKS = 3
# The emulated tests share one ~30 s build of the core (run in CI like every test, only flagged).
emulated = pytest.mark.slow

DESCRIPTORS = {"ssc": (SSC_PAIRS, True, 2, 2), "mind": (MIND_PAIRS, False, 1, 1)}  # pairs, subtract_min, r, d
PADDINGS = ("zeros", "border")


# ---------------------------------------------------------------- core-level checks (GPU or emulator)


class Core:
    """A CUDA core module (real or emulated) and the device its pointers live on."""

    def __init__(self, module, device):
        self.module, self.device = module, torch.device(device)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def workspace(self, nbytes: int) -> torch.Tensor:
        return torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device=self.device)  # NaN bytes

    def poisoned(self, shape, dtype) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=self.device)

    def call(self, name, *args):
        err = getattr(self.module, name)(*args)
        assert err == "", f"{name}: {err}"


def _assert_float32_accuracy(got, torch_float32, exact, what, floor=1e-5):
    """A float32 kernel result against the float64 one (``exact``): in relative L2 norm, no further off than
    torch's float32 computation of the same formula, times 2, or than ``floor``.

    torch's float32 result is no yardstick to a fixed tolerance: its box means sum up to 19^3 terms in
    another order (on an H200, 2e-4 off the exact descriptor at radius 9, where this test compared the two
    to 1e-5 and failed), and an L1 penalty's gradient flips sign wherever a difference rounds across 0."""
    scale = exact.norm().item()
    kernel_error = (got.double() - exact).norm().item() / scale
    torch_error = (torch_float32.detach().double() - exact).norm().item() / scale
    assert kernel_error <= max(2 * torch_error, floor), f"{what}: kernel {kernel_error:.2e}, torch {torch_error:.2e}"


def _grad_tolerance(dtype, expected):
    """Gradients scale with 1 / variance, so float32 gets a tolerance relative to their magnitude."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    return dict(rtol=1e-9, atol=1e-10)


def _check_gradient_magnitude(core: Core, shape, dtype, gen):
    vol = make_volume(shape, dtype, False, gen).to(core.device)
    n, c, d, h, w = shape
    out = core.poisoned(shape, dtype)
    is_double = dtype == torch.float64
    core.call("gradient_magnitude_forward", is_double, vol.data_ptr(), out.data_ptr(), n * c, d, h, w, 1e-6,
              core.stream())
    leaf = vol.clone().requires_grad_()
    expected = reference.gradient_magnitude(leaf, 1e-6)
    torch.testing.assert_close(out, expected.detach())
    grad_out = make_volume(shape, dtype, False, gen).to(core.device)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out)
    grad = core.poisoned(shape, dtype)
    core.call("gradient_magnitude_backward", is_double, grad_out.data_ptr(), vol.data_ptr(), out.data_ptr(),
              grad.data_ptr(), n * c, d, h, w, core.stream())
    torch.testing.assert_close(grad, expected_grad)


def _check_warp(core: Core, shape, dtype, mode, padding_mode, gen):
    n, c, d, h, w = shape
    image = make_volume(shape, dtype, False, gen).to(core.device)
    flow = make_volume((n, 3, d, h, w), dtype, False, gen, scale=2.5).to(core.device)  # many samples outside
    padding = PADDINGS.index(padding_mode)
    is_double = dtype == torch.float64
    out = core.poisoned(shape, dtype)
    core.call("warp_forward", is_double, image.data_ptr(), flow.data_ptr(), out.data_ptr(), n, c, d, h, w,
              mode == "nearest", padding, core.stream())
    leaves = image.clone().requires_grad_(), flow.clone().requires_grad_()
    expected = reference.warp(*leaves, mode, padding_mode)
    torch.testing.assert_close(out, expected.detach())
    if mode == "nearest":
        return  # the op computes the nearest backward with the reference
    grad_out = make_volume(shape, dtype, False, gen).to(core.device)
    expected_image, expected_flow = torch.autograd.grad(expected, leaves, grad_out)
    for deterministic in (False, True):
        for want_image, want_flow in ((True, True), (True, False), (False, True)):
            grad_image = core.poisoned(shape, dtype) if want_image else None
            grad_flow = core.poisoned(flow.shape, dtype) if want_flow else None
            nbytes = core.module.warp_workspace_bytes(n, d, h, w, deterministic)
            scratch = core.workspace(nbytes)
            core.call("warp_backward", is_double, grad_out.data_ptr(), image.data_ptr(), flow.data_ptr(),
                      grad_image.data_ptr() if want_image else 0, grad_flow.data_ptr() if want_flow else 0,
                      n, c, d, h, w, padding, deterministic, scratch.data_ptr(), nbytes, core.stream())
            if want_image:
                torch.testing.assert_close(grad_image, expected_image)
            if want_flow:
                torch.testing.assert_close(grad_flow, expected_flow)


def _descriptor_forward(core: Core, vol, kind, radius, dilation, per_item):
    pairs, subtract_min, _, _ = DESCRIPTORS[kind]
    n, _, d, h, w = vol.shape
    k = len(pairs)
    out = core.poisoned((n, k, d, h, w), vol.dtype)
    variance = core.poisoned((n, 1, d, h, w), vol.dtype)
    flags = torch.full((n, 1, d, h, w), 0xEE, dtype=torch.uint8, device=core.device)
    is_double = vol.dtype == torch.float64
    nbytes = core.module.descriptor_workspace_bytes(is_double, n, d, h, w, k, False)
    scratch = core.workspace(nbytes)
    core.call("descriptor_forward", is_double, vol.data_ptr(), out.data_ptr(), variance.data_ptr(),
              flags.data_ptr(), n, d, h, w, list(flat_pairs(pairs)), radius, dilation, subtract_min, per_item,
              scratch.data_ptr(), nbytes, core.stream())
    return out, variance, flags


def _check_descriptor(core: Core, shape, dtype, kind, radius, dilation, per_item, gen, item_scales=None):
    """item_scales: per-item factors; items 100x apart put many variances outside the clamp range."""
    pairs, subtract_min, _, _ = DESCRIPTORS[kind]
    flat = list(flat_pairs(pairs))
    n, _, d, h, w = shape
    is_double = dtype == torch.float64
    vol = make_volume(shape, dtype, False, gen)
    if item_scales is not None:
        vol = vol * torch.tensor(item_scales, dtype=dtype).view(n, 1, 1, 1, 1)
    vol = vol.to(core.device)
    out, variance, flags = _descriptor_forward(core, vol, kind, radius, dilation, per_item)

    def descriptor(v):
        return self_similarity(v, pairs, radius, dilation, subtract_min, per_item)

    leaf = vol.clone().requires_grad_()
    expected = descriptor(leaf)
    exact_leaf = vol.double().requires_grad_()
    exact = descriptor(exact_leaf)
    if is_double:
        torch.testing.assert_close(out, expected.detach())
    else:
        _assert_float32_accuracy(out, expected, exact, "descriptor")
    # The variance and flag outputs (the backward's inputs) against the CPU core, exactly for the flags.
    cpu = gradreg_fast._backend.cpu_core()
    cpu_vol = vol.cpu()
    cpu_out, cpu_var = torch.empty(out.shape, dtype=dtype), torch.empty(variance.shape, dtype=dtype)
    cpu_flags = torch.empty(flags.shape, dtype=torch.uint8)
    cpu.descriptor_forward("float64" if is_double else "float32", cpu_vol.data_ptr(), cpu_out.data_ptr(),
                           cpu_var.data_ptr(), cpu_flags.data_ptr(), n, d, h, w, flat, radius, dilation,
                           subtract_min, per_item, 1)
    torch.testing.assert_close(variance.cpu(), cpu_var)
    assert torch.equal(flags.cpu(), cpu_flags)

    nbytes = core.module.descriptor_workspace_bytes(is_double, n, d, h, w, len(pairs), True)
    tail = (out.data_ptr(), vol.data_ptr(), variance.data_ptr(), flags.data_ptr())
    sizes = (n, d, h, w, flat, radius, dilation, subtract_min)
    grad_out = make_volume(out.shape, dtype, False, gen).to(core.device)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out)
    grad = core.poisoned(shape, dtype)
    scratch = core.workspace(nbytes)
    core.call("descriptor_backward", is_double, grad_out.data_ptr(), *tail, grad.data_ptr(), *sizes,
              scratch.data_ptr(), nbytes, core.stream())
    if is_double:
        torch.testing.assert_close(grad, expected_grad, **_grad_tolerance(dtype, expected_grad))
    else:
        (exact_grad,) = torch.autograd.grad(exact, exact_leaf, grad_out.double())
        _assert_float32_accuracy(grad, expected_grad, exact_grad, "descriptor backward")

    # The fused loss: d/dvol of scale * sum penalty(descriptor(vol) - target), and the penalty sum.
    target = descriptor(make_volume(shape, dtype, False, gen).to(core.device))
    scale = torch.tensor(0.37, dtype=dtype, device=core.device)
    for squared in (False, True):
        leaf = vol.clone().requires_grad_()
        diff = descriptor(leaf) - target
        penalty = (diff * diff if squared else diff.abs()).sum()
        (expected_grad,) = torch.autograd.grad(penalty * scale, leaf)
        grad = core.poisoned(shape, dtype)
        scratch = core.workspace(nbytes)
        core.call("descriptor_loss_backward", is_double, scale.data_ptr(), squared, target.data_ptr(), *tail,
                  grad.data_ptr(), *sizes, scratch.data_ptr(), nbytes, core.stream())
        if is_double:
            torch.testing.assert_close(grad, expected_grad, **_grad_tolerance(dtype, expected_grad))
        else:
            exact_leaf = vol.double().requires_grad_()
            exact_diff = descriptor(exact_leaf) - target.double()
            exact_penalty = (exact_diff * exact_diff if squared else exact_diff.abs()).sum()
            (exact_grad,) = torch.autograd.grad(exact_penalty * scale.double(), exact_leaf)
            _assert_float32_accuracy(grad, expected_grad, exact_grad, f"loss backward, squared={squared}")

        total = core.poisoned((), dtype)
        penalty_bytes = core.module.penalty_workspace_bytes(out.numel())
        scratch = core.workspace(penalty_bytes)
        core.call("penalty_sum", is_double, out.data_ptr(), target.data_ptr(), out.numel(), squared,
                  total.data_ptr(), scratch.data_ptr(), penalty_bytes, core.stream())
        torch.testing.assert_close(total, penalty.detach(), rtol=1e-5 if not is_double else 1e-12, atol=0)


def _check_bad_arguments(core: Core):
    """Bad sizes, tables and workspaces come back as error strings naming the argument."""
    m, s = core.module, core.stream()
    vol = torch.randn(1, 1, 3, 4, 5, device=core.device)
    out = torch.empty_like(vol)
    assert "padding" in m.warp_forward(False, vol.data_ptr(), vol.data_ptr(), out.data_ptr(), 1, 1, 3, 4, 5, False, 7,
                                       s)
    assert "sizes" in m.gradient_magnitude_forward(False, vol.data_ptr(), out.data_ptr(), 1, 0, 4, 5, 1e-6, s)
    assert "pointers" in m.gradient_magnitude_forward(False, 0, out.data_ptr(), 1, 3, 4, 5, 1e-6, s)
    pairs = list(flat_pairs(SSC_PAIRS))
    small = core.workspace(64)
    flags = torch.empty(vol.shape, dtype=torch.uint8, device=core.device)
    args = (False, vol.data_ptr(), out.data_ptr(), out.data_ptr(), flags.data_ptr(), 1, 3, 4, 5)
    assert "pairs" in m.descriptor_forward(*args, pairs[:8], 2, 2, True, False, small.data_ptr(), 64, s)
    assert "radius" in m.descriptor_forward(*args, pairs, -1, 2, True, False, small.data_ptr(), 64, s)
    assert "dilation" in m.descriptor_forward(*args, pairs, 2, 0, True, False, small.data_ptr(), 64, s)
    assert "workspace" in m.descriptor_forward(*args, pairs, 2, 2, True, False, small.data_ptr(), 64, s)
    assert "workspace" in m.descriptor_forward(*args, pairs, 2, 2, True, False, 0, 10**9, s)
    total = torch.empty((), device=core.device)
    assert "workspace" in m.penalty_sum(False, vol.data_ptr(), vol.data_ptr(), vol.numel(), False, total.data_ptr(),
                                        small.data_ptr(), 8, s)
    assert "workspace" in m.warp_backward(False, vol.data_ptr(), vol.data_ptr(), vol.data_ptr(), out.data_ptr(), 0,
                                          1, 1, 3, 4, 5, 0, True, 0, 0, s)
    with pytest.raises(ValueError, match="sizes"):
        m.descriptor_workspace_bytes(False, 1, 3, 4, 5, 13, False)


GM_SHAPES = [(2, 3, 5, 4, 7), (1, 2, 1, 5, 3), (2, 1, 4, 1, 3), (1, 2, 3, 5, 1), (1, 1, 9, 19, 37)]
WARP_SHAPES = [(2, 3, 5, 4, 7), (1, 2, 1, 5, 3), (2, 1, 4, 1, 3), (1, 2, 3, 5, 1), (1, 1, 6, 9, 37)]
MIND_SHAPES = [(2, 1, 5, 4, 7), (1, 1, 1, 5, 3), (2, 1, 4, 1, 3), (1, 1, 3, 5, 1), (1, 1, 6, 11, 37)]
# (radius, dilation): the defaults, r = 0, and halos larger than a 8 x 32 tile (several halo chunks).
MIND_GEOMETRIES = [(None, None), (0, 1), (1, 3), (9, 1)]


# ---------------------------------------------------------------- the emulated core (no GPU needed)


@pytest.fixture(scope="session", params=CONTRACTIONS, ids=CONTRACTION_IDS)
def emulated_core(request, tmp_path_factory):
    """csrc/cuda compiled for the CPU against emulation.cuh, as an importable module; once as the host
    compiles it, once with products fused into FMAs as nvcc does (conftest.build_emulated_cuda)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler to build the emulated CUDA core")
    pybind11 = pytest.importorskip("pybind11")
    out = tmp_path_factory.mktemp(f"cuda_emulation_{CONTRACTION_IDS[int(request.param)]}")
    common = ["-std=c++17", "-O1", "-fPIC", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}",
              "-DGRADREG_CUDA_EMULATION", f"-DGRADREG_EMULATION_MAX_BLOCKS={EMULATION_MAX_BLOCKS}",
              "-DGRADREG_PTX_ARCH=90", "-Wall", "-Wextra"] + (CONTRACT_FLAGS if request.param else [])
    objects = []
    for source in CUDA_SOURCES:
        obj = out / (source.stem + ".o")
        subprocess.run([compiler, "-x", "c++", *common, "-c", str(source), "-o", str(obj)], check=True)
        objects.append(str(obj))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    library = out / f"_cuda_emulated{suffix}"
    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    subprocess.run([compiler, *common, "-shared", *includes, "-DGRADREG_CUDA_MODULE=_cuda_emulated",
                    str(ROOT / "csrc" / "cuda" / "module.cpp"), *objects, "-o", str(library)], check=True)
    spec = importlib.util.spec_from_file_location("_cuda_emulated", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Core(module, "cpu")


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_gradient_magnitude(emulated_core, dtype, gen):
    for shape in GM_SHAPES:
        _check_gradient_magnitude(emulated_core, shape, dtype, gen)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_emulated_warp(emulated_core, dtype, mode, padding_mode, gen):
    for shape in WARP_SHAPES:
        _check_warp(emulated_core, shape, dtype, mode, padding_mode, gen)


@emulated
@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_descriptor(emulated_core, kind, dtype, gen):
    _, _, radius, dilation = DESCRIPTORS[kind]
    for shape, per_item in zip(MIND_SHAPES, (False, True, False, True, False)):
        _check_descriptor(emulated_core, shape, dtype, kind, radius, dilation, per_item, gen)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius, dilation", MIND_GEOMETRIES[1:])
def test_emulated_descriptor_geometry(emulated_core, radius, dilation, dtype, gen):
    _check_descriptor(emulated_core, (2, 1, 4, 10, 35), dtype, "ssc", radius, dilation, True, gen)


@emulated
@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_emulated_descriptor_clamped_variance(emulated_core, kind, gen):
    _, _, radius, dilation = DESCRIPTORS[kind]
    _check_descriptor(emulated_core, (2, 1, 5, 4, 6), torch.float64, kind, radius, dilation, False, gen,
                      item_scales=(1.0, 100.0))


@emulated
def test_emulated_bad_arguments(emulated_core):
    _check_bad_arguments(emulated_core)


@emulated
def test_emulated_deterministic_warp_gathers_many_collisions(emulated_core, gen):
    # Flows that squeeze the volume towards a few points: many sources share each cell, so the
    # deterministic path's buckets hold long runs (the sort and the run bounds are exercised).
    shape = (2, 2, 5, 6, 7)
    n, c, d, h, w = shape
    image = make_volume(shape, torch.float64, False, gen)
    base = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape[2:]), indexing="ij"))
    flow = (-0.8 * base + 0.3 * make_volume((n, 3, d, h, w), torch.float64, False, gen)).contiguous()
    grad_out = make_volume(shape, torch.float64, False, gen)
    leaves = image.clone().requires_grad_(), flow.clone().requires_grad_()
    expected_image, _ = torch.autograd.grad(reference.warp(*leaves), leaves, grad_out)
    core = emulated_core
    nbytes = core.module.warp_workspace_bytes(n, d, h, w, True)
    grad_image = core.poisoned(shape, torch.float64)
    workspace = core.workspace(nbytes)  # bound to a name: a temporary would be freed before the kernel runs
    core.call("warp_backward", True, grad_out.data_ptr(), image.data_ptr(), flow.data_ptr(), grad_image.data_ptr(), 0,
              n, c, d, h, w, 0, True, workspace.data_ptr(), nbytes, 0)
    torch.testing.assert_close(grad_image, expected_image)


# ---------------------------------------------------------------- the real core on a GPU


@pytest.fixture(scope="module")
def cuda_core():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    module = gradreg_fast._backend.cuda_core()
    if module is None:
        pytest.fail("gradreg_fast._cuda is not importable on a machine with a GPU: build it with nvcc on PATH")
    return Core(module, "cuda")


@requires_cuda
def test_core_gradient_magnitude(cuda_core, gen):
    for shape in GM_SHAPES:
        for dtype in (torch.float32, torch.float64):
            _check_gradient_magnitude(cuda_core, shape, dtype, gen)


@requires_cuda
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_core_warp(cuda_core, mode, padding_mode, gen):
    for shape in WARP_SHAPES:
        for dtype in (torch.float32, torch.float64):
            _check_warp(cuda_core, shape, dtype, mode, padding_mode, gen)


@requires_cuda
@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("radius, dilation", MIND_GEOMETRIES)
def test_core_descriptor(cuda_core, kind, radius, dilation, gen):
    default_radius, default_dilation = DESCRIPTORS[kind][2:]
    radius = default_radius if radius is None else radius
    dilation = default_dilation if dilation is None else dilation
    for shape, per_item in zip(MIND_SHAPES, (False, True, False, True, False)):
        for dtype in (torch.float32, torch.float64):
            _check_descriptor(cuda_core, shape, dtype, kind, radius, dilation, per_item, gen)


@requires_cuda
@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_descriptor_clamped_variance(cuda_core, kind, dtype, gen):
    _, _, radius, dilation = DESCRIPTORS[kind]
    _check_descriptor(cuda_core, (2, 1, 5, 4, 6), dtype, kind, radius, dilation, False, gen, item_scales=(1.0, 100.0))


@requires_cuda
def test_core_bad_arguments(cuda_core):
    _check_bad_arguments(cuda_core)


def _on_cuda(t: torch.Tensor, noncontiguous: bool) -> torch.Tensor:
    """``t`` on the GPU; with ``noncontiguous``, as a strided view into a larger buffer (see make_volume)."""
    if not noncontiguous:
        return t.cuda()
    n, c, d, h, w = t.shape
    storage = torch.empty((2 * w + 1, h + 1, d, c, n), dtype=t.dtype, device="cuda")
    view = storage.permute(4, 3, 2, 1, 0)[:, :, :, 1:, ::2][..., :w]
    view.copy_(t)
    return view


def _value_and_grads(fn, inputs, grad_output):
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_output, materialize_grads=True)
    return out.detach(), grads


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_gradient_magnitude_matches_reference(dtype, noncontiguous, gen):
    for shape in GM_SHAPES:
        vol = _on_cuda(make_volume(shape, dtype, False, gen), noncontiguous)
        grad_out = make_volume(shape, dtype, False, gen).cuda()
        out, grads = _value_and_grads(lambda v: gradreg_fast.gradient_magnitude(v, backend="cuda"), [vol], grad_out)
        ref, ref_grads = _value_and_grads(reference.gradient_magnitude, [vol], grad_out)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grads[0], ref_grads[0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_warp_matches_reference(dtype, noncontiguous, mode, padding_mode, deterministic, gen):
    for shape in WARP_SHAPES:
        image = _on_cuda(make_volume(shape, dtype, False, gen), noncontiguous)
        flow = _on_cuda(make_volume((shape[0], 3, *shape[2:]), dtype, False, gen, scale=2.5), noncontiguous)
        grad_out = make_volume(shape, dtype, False, gen).cuda()
        fused = lambda i, f: gradreg_fast.warp(i, f, mode, padding_mode, deterministic, backend="cuda")  # noqa: E731
        ref = lambda i, f: reference.warp(i, f, mode, padding_mode)  # noqa: E731
        out, (grad_image, grad_flow) = _value_and_grads(fused, [image, flow], grad_out)
        ref_out, (ref_grad_image, ref_grad_flow) = _value_and_grads(ref, [image, flow], grad_out)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(grad_image, ref_grad_image)
        torch.testing.assert_close(grad_flow, ref_grad_flow)


@requires_cuda
@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("per_item", [False, True])
def test_descriptor_matches_reference(kind, dtype, noncontiguous, per_item, gen):
    op = gradreg_fast.mind_ssc if kind == "ssc" else gradreg_fast.mind
    ref_op = reference.mind_ssc if kind == "ssc" else reference.mind
    for shape in MIND_SHAPES:
        vol = _on_cuda(make_volume(shape, dtype, False, gen), noncontiguous)
        channels = len(DESCRIPTORS[kind][0])
        grad_out = make_volume((shape[0], channels, *shape[2:]), dtype, False, gen).cuda()
        out, (grad,) = _value_and_grads(lambda v: op(v, per_item=per_item, backend="cuda"), [vol], grad_out)
        ref, (ref_grad,) = _value_and_grads(lambda v: ref_op(v, per_item=per_item), [vol], grad_out)
        torch.testing.assert_close(out, ref, **(dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}))
        torch.testing.assert_close(grad, ref_grad, **_grad_tolerance(dtype, ref_grad))


@requires_cuda
@pytest.mark.parametrize("descriptor", ["ssc", "mind"])
@pytest.mark.parametrize("penalty", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mind_loss_matches_reference(descriptor, penalty, reduction, dtype, gen):
    for shape in MIND_SHAPES[:3]:
        warped = make_volume(shape, dtype, False, gen).cuda()
        fixed = make_volume(shape, dtype, False, gen).cuda()
        kwargs = dict(descriptor=descriptor, penalty=penalty, reduction=reduction)
        leaf = warped.clone().requires_grad_()
        loss = gradreg_fast.mind_loss(leaf, fixed, backend="cuda", **kwargs)
        (grad,) = torch.autograd.grad(loss, leaf)
        ref_leaf = warped.clone().requires_grad_()
        ref_loss = reference.mind_loss(ref_leaf, fixed, **kwargs)
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0)
        torch.testing.assert_close(grad, ref_grad, **_grad_tolerance(dtype, ref_grad))


@requires_cuda
def test_gradcheck():
    gen = torch.Generator().manual_seed(7)
    vol = make_volume((2, 1, 3, 4, 5), torch.float64, False, gen).cuda().requires_grad_()
    image = make_volume((2, 2, 3, 4, 5), torch.float64, False, gen).cuda().requires_grad_()
    # Away from integer sample coordinates, where trilinear interpolation has kinks.
    flow = (torch.rand((2, 3, 3, 4, 5), generator=gen, dtype=torch.float64) * 0.8 + 0.1).cuda().requires_grad_()
    fixed = make_volume((2, 1, 3, 4, 5), torch.float64, False, gen).cuda()
    checks = {
        "gradient_magnitude": (lambda v: gradreg_fast.gradient_magnitude(v, backend="cuda"), (vol,)),
        "warp": (lambda i, f: gradreg_fast.warp(i, f, backend="cuda"), (image, flow)),
        "warp_deterministic": (lambda i, f: gradreg_fast.warp(i, f, deterministic=True, backend="cuda"), (image, flow)),
        "mind_ssc": (lambda v: gradreg_fast.mind_ssc(v, radius=1, dilation=1, backend="cuda"), (vol,)),
        "mind": (lambda v: gradreg_fast.mind(v, backend="cuda"), (vol,)),
        "mind_loss_l2": (lambda v: gradreg_fast.mind_loss(v, fixed, penalty="l2", backend="cuda"), (vol,)),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, inputs), name


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_warp_is_bit_identical(dtype, gen):
    # Large flows on a volume big enough for many blocks: the atomic path's sums land in varying order.
    shape = (2, 2, 24, 28, 40)
    image = make_volume(shape, dtype, False, gen).cuda()
    flow = make_volume((2, 3, *shape[2:]), dtype, False, gen, scale=6.0).cuda()
    grad_out = make_volume(shape, dtype, False, gen).cuda()

    def grads(deterministic):
        _, g = _value_and_grads(lambda i, f: gradreg_fast.warp(i, f, deterministic=deterministic, backend="cuda"),
                                [image, flow], grad_out)
        return g

    first = grads(True)
    for _ in range(5):
        again = grads(True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    atomic = grads(False)
    torch.testing.assert_close(first[0], atomic[0])  # same values up to summation order
    assert torch.equal(first[1], atomic[1])  # the flow gradient is a gather either way


@requires_cuda
def test_compute_sanitizer():
    if shutil.which("compute-sanitizer") is None and not Path("/usr/local/cuda/bin/compute-sanitizer").exists():
        pytest.skip("compute-sanitizer is not installed")
    result = subprocess.run(["bash", str(ROOT / "scripts" / "cuda_sanitizer.sh")], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_sanitizer_workload_runs_on_the_cpu_core():
    """scripts/kernel_workout.py (what cuda_sanitizer.sh runs on a GPU) with the CPU core: every call it makes
    is valid, so the sanitizer run on a lent GPU does not fail on the workload itself."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_workout.py"), "--device", "cpu",
                             "--backend", "cpu"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "every cpu kernel ran" in result.stdout


def _graph_cases(backend):
    """name -> (function of the leaves, [leaf shapes]); every op of the package, forward and backward."""
    spatial = (6, 7, 9)
    one, three, four = (2, 1, *spatial), (2, 3, *spatial), (1, 4, *spatial)
    b = backend
    return {
        "gradient_magnitude": (lambda v: gradreg_fast.gradient_magnitude(v, backend=b), [one]),
        "warp": (lambda v, f: gradreg_fast.warp(v, f, "bilinear", "border", backend=b), [one, three]),
        "mind_ssc": (lambda v: gradreg_fast.mind_ssc(v, backend=b), [one]),
        "mind_loss": (lambda v, f: gradreg_fast.mind_loss(v, f, backend=b), [one, one]),
        "lncc_loss": (lambda v, f: gradreg_fast.lncc_loss(v, f, 3, backend=b), [one, one]),
        "integrate_velocity": (lambda v: gradreg_fast.integrate_velocity(v, 3, "border", backend=b), [three]),
        "mind_cost_volume": (lambda f, m: gradreg_fast.mind_cost_volume(f, m, 1, backend=b), [four, four]),
        "warped_sq_diff": (lambda m, f, u: gradreg_fast.warped_sq_diff(m, f, u, backend=b), [one, one, three]),
    }


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_every_op_captures_in_a_cuda_graph(backend):
    """Forward and backward of every op captured once in a CUDA graph and replayed on new inputs give what
    eager calls give: no host synchronisation or host-to-device copy inside (an H200 found one in Triton's
    LNCC), and no buffer that outlives its launch."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    for name, (fn, shapes) in _graph_cases(backend).items():
        leaves = [torch.rand(s, device="cuda", generator=gen).requires_grad_() for s in shapes]

        def step():
            out = fn(*leaves)
            return [out.detach()] + list(torch.autograd.grad(out, leaves, torch.ones_like(out)))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up (Triton compiles, workspaces) off the capturing stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        with torch.no_grad():
            for leaf in leaves:
                leaf.copy_(torch.rand(leaf.shape, device="cuda", generator=gen))
        graph.replay()
        expected = step()
        for got, want in zip(captured, expected):
            torch.testing.assert_close(got, want, msg=lambda m: f"{name} ({backend}): {m}")
    field = torch.rand((1, 27, 4, 5, 6), device="cuda", generator=gen), torch.rand((1, 3, 4, 5, 6), device="cuda")
    graph = torch.cuda.CUDAGraph()
    gradreg_fast.coupled_argmin(*field, 0.3, backend=backend)  # warm-up
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        index = gradreg_fast.coupled_argmin(*field, 0.3, backend=backend)
    graph.replay()
    assert torch.equal(index, gradreg_fast.coupled_argmin(*field, 0.3, backend=backend))
