"""The Triton backend against the references (and against the CPU core where the contract is stricter
than the reference: non-finite flows, coordinates exactly on the border, eps = 0, the variance and flag
outputs of the descriptor), forward and backward, for every op.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The interpreter is chosen by
TRITON_INTERPRET=1 when the kernels are defined, i.e. before they are imported; in a whole-suite run
triton may already be imported in compiled mode, and setting the variable in the pytest process would
leak into every later test. So each check group runs in a fresh subprocess,
``python tests/test_triton.py GROUP DEVICE``, which sets the variable at its very top. With a GPU the
same groups also run compiled on CUDA tensors.
"""

if __name__ == "__main__":  # the check subprocess: the interpreter must be on before triton is imported
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
from conftest import make_volume  # noqa: E402

HERE = Path(__file__).resolve().parent
GROUPS = {}


def group(fn):
    """Register a check group: fn(device) raises on the first mismatch."""
    GROUPS[fn.__name__] = fn
    return fn


def _tolerances(dtype, scale=1.0):
    """Absolute tolerance relative to the magnitude of the expected values."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    return dict(rtol=1e-9, atol=1e-11 * max(scale, 1.0))


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, **_tolerances(dtype, scale), msg=lambda m: f"{what}: {m}")


def _gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _volume(shape, dtype, device, gen, noncontiguous=False, scale=1.0):
    return make_volume(shape, dtype, noncontiguous, gen, scale).to(device)


def _vjp(fn, inputs, grad_out, needs=None):
    """fn(*inputs) and its gradients w.r.t. the inputs marked in ``needs`` (default: all)."""
    needs = needs or [True] * len(inputs)
    leaves = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
    out = fn(*leaves)
    wrt = [x for x, need in zip(leaves, needs) if need]
    return out.detach(), torch.autograd.grad(out, wrt, grad_out)


# --------------------------------------------------------------------------------------- gradient magnitude


@group
def gradient_magnitude(device):
    import gradreg_fast as gr

    gen = _gen("gradient_magnitude")
    shapes = [(2, 3, 5, 4, 7), (1, 2, 1, 5, 3), (2, 1, 4, 1, 3), (1, 1, 3, 5, 1), (1, 1, 7, 6, 9)]
    for shape in shapes:
        for dtype in (torch.float32, torch.float64):
            for noncontiguous in (False, True):
                what = f"gradient_magnitude {shape} {dtype} noncontiguous={noncontiguous}"
                vol = _volume(shape, dtype, device, gen, noncontiguous)
                grad_out = _volume(shape, dtype, device, gen)
                out, (grad,) = _vjp(lambda v: gr.gradient_magnitude(v, backend="triton"), [vol], grad_out)
                ref, (ref_grad,) = _vjp(lambda v: gr.gradient_magnitude(v, backend="reference"), [vol], grad_out)
                _close(out, ref, dtype, what)
                _close(grad, ref_grad, dtype, what + " grad")

    # eps = 0 on a partly flat volume: out == 0 there and the gradient takes the zero subgradient
    # (the reference gives NaN), as the CPU core does.
    vol = _volume((1, 2, 5, 4, 6), torch.float64, "cpu", gen)
    vol[:, :, 1:4, :, 1:5] = 0.5  # voxels (2, y, 2..3) and their neighbours
    grad_out = _volume(vol.shape, torch.float64, "cpu", gen)
    results = {}
    for backend, dev in (("triton", device), ("cpu", "cpu")):
        out, (grad,) = _vjp(lambda v: gr.gradient_magnitude(v, eps=0.0, backend=backend), [vol.to(dev)],
                            grad_out.to(dev))
        results[backend] = (out.cpu(), grad.cpu())
    assert (results["cpu"][0] == 0).any(), "the eps = 0 case must contain flat voxels"
    _close(results["triton"][0], results["cpu"][0], torch.float64, "eps=0 out")
    _close(results["triton"][1], results["cpu"][1], torch.float64, "eps=0 grad")

    vol = _volume((1, 1, 4, 5, 3), torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: gr.gradient_magnitude(v, backend="triton"), (vol,), fast_mode=True)


# --------------------------------------------------------------------------------------------------- warp

WARP_SHAPES = [(2, 3, 5, 4, 7), (1, 2, 1, 5, 3), (2, 1, 4, 1, 3), (1, 2, 3, 5, 1)]


def _warp(mode, padding, backend, deterministic=False):
    import gradreg_fast as gr

    return lambda i, f: gr.warp(i, f, mode, padding, deterministic=deterministic, backend=backend)


@group
def warp(device):
    gen = _gen("warp")
    for shape in WARP_SHAPES:
        n, c, d, h, w = shape
        for dtype in (torch.float32, torch.float64):
            noncontiguous = dtype == torch.float64  # both layouts, without doubling the run time
            image = _volume(shape, dtype, device, gen, noncontiguous)
            # ~2.5 voxels: many samples leave the volume, so both paddings matter.
            flow = _volume((n, 3, d, h, w), dtype, device, gen, noncontiguous, scale=2.5)
            grad_out = _volume(shape, dtype, device, gen)
            for mode in ("bilinear", "nearest"):
                needs = [True, mode == "bilinear"]
                for padding in ("zeros", "border"):
                    what = f"warp {shape} {dtype} {mode} {padding}"
                    ref, ref_grads = _vjp(_warp(mode, padding, "reference"), [image, flow], grad_out, needs)
                    for deterministic in (False, True):
                        out, grads = _vjp(_warp(mode, padding, "triton", deterministic), [image, flow], grad_out,
                                          needs)
                        _close(out, ref, dtype, what)
                        for name, g, rg in zip(("image", "flow"), grads, ref_grads):
                            _close(g, rg, dtype, f"{what} deterministic={deterministic} grad {name}")


@group
def warp_special_points(device):
    """Half-integer points (nearest: half to even), points exactly on the border (border padding: no flow
    gradient there), non-finite flows (0, no gradient), and one input needing no gradient."""
    gen = _gen("warp_special_points")
    shape = (2, 2, 5, 4, 6)
    n, c, d, h, w = shape
    image = _volume(shape, torch.float64, "cpu", gen)
    grad_out = _volume(shape, torch.float64, "cpu", gen)

    # Steps of 0.5 voxel: every nearest sample lands on a whole voxel or on a tie between two.
    half = torch.randint(-9, 10, (n, 3, d, h, w), generator=gen).double() * 0.5
    ref, _ = _vjp(_warp("nearest", "zeros", "reference"), [image, half], grad_out, [True, False])
    out, _ = _vjp(_warp("nearest", "zeros", "triton"), [image.to(device), half.to(device)], grad_out.to(device),
                  [True, False])
    _close(out.cpu(), ref, torch.float64, "nearest on half-integer points")

    flow = _volume((n, 3, d, h, w), torch.float64, "cpu", gen, scale=2.5)
    # Points exactly on the low and high border along each axis.
    base = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (d, h, w)), indexing="ij")
    for axis, size in enumerate((d, h, w)):
        flow[0, axis, :, :, 0] = -base[axis][:, :, 0]
        flow[1, axis, :, 1, :] = (size - 1) - base[axis][:, 1, :]
    flow[0, 0, 1, 1, 1] = float("nan")
    flow[0, 1, 2, 2, 2] = float("inf")
    flow[1, 2, 3, 0, 2] = -float("inf")
    for mode in ("bilinear", "nearest"):
        for padding in ("zeros", "border"):
            for needs in ([True, True], [False, True], [True, False]):
                if mode == "nearest" and needs[1]:
                    continue  # no flow gradient in nearest mode
                what = f"special points {mode} {padding} needs={needs}"
                expected, expected_grads = _vjp(_warp(mode, padding, "cpu"), [image, flow], grad_out, needs)
                for deterministic in (False, True):
                    out, grads = _vjp(_warp(mode, padding, "triton", deterministic), [image.to(device),
                                      flow.to(device)], grad_out.to(device), needs)
                    _close(out.cpu(), expected, torch.float64, what)
                    for g, eg in zip(grads, expected_grads):
                        _close(g.cpu(), eg, torch.float64, f"{what} deterministic={deterministic} grad")


@group
def warp_deterministic_and_gradcheck(device):
    gen = _gen("warp_deterministic_and_gradcheck")
    shape = (2, 3, 6, 5, 7)
    image = _volume(shape, torch.float32, device, gen)
    # Large displacements: many voxels sample the same cells, so the scatter has real collisions.
    flow = _volume((2, 3, *shape[2:]), torch.float32, device, gen, scale=4.0)
    grad_out = _volume(shape, torch.float32, device, gen)
    for padding in ("zeros", "border"):
        runs = [_vjp(_warp("bilinear", padding, "triton", True), [image, flow], grad_out)[1] for _ in range(2)]
        for g0, g1 in zip(*runs):
            assert torch.equal(g0, g1), f"deterministic warp backward ({padding}) differs between runs"
        atomic = _vjp(_warp("bilinear", padding, "triton", False), [image, flow], grad_out)[1]
        for g, ga in zip(runs[0], atomic):
            _close(g, ga, torch.float32, f"deterministic vs atomic ({padding})")

    # Tiny, so that a failing gradcheck's full-Jacobian rerun stays short under the interpreter.
    image = _volume((1, 2, 3, 4, 2), torch.float64, device, gen).requires_grad_()
    # Displacements away from whole voxels, where the trilinear warp is smooth.
    flow = (torch.rand((1, 3, 3, 4, 2), generator=gen, dtype=torch.float64) * 0.8 + 0.1
            + torch.randint(-2, 2, (1, 3, 3, 4, 2), generator=gen)).to(device).requires_grad_()
    for padding in ("zeros", "border"):
        for deterministic in (False, True):
            assert torch.autograd.gradcheck(_warp("bilinear", padding, "triton", deterministic), (image, flow),
                                            fast_mode=True)


# --------------------------------------------------------------------------------------------------- MIND


def _descriptor(kind, backend, **kwargs):
    import gradreg_fast as gr

    fn = gr.mind_ssc if kind == "ssc" else gr.mind
    return lambda v: fn(v, backend=backend, **kwargs)


def _mind_cases():
    # (kind, shape, dtype, noncontiguous, kwargs); (1, 1, 7, 6, 9) spans two blocks of voxels.
    return [
        ("ssc", (2, 1, 5, 4, 7), torch.float32, False, {}),
        ("ssc", (2, 1, 5, 4, 7), torch.float64, True, {}),
        ("ssc", (2, 1, 3, 5, 1), torch.float32, True, dict(radius=1, dilation=3, per_item=True)),
        ("ssc", (1, 1, 7, 6, 9), torch.float64, False, dict(radius=0, dilation=1)),
        ("mind", (2, 1, 5, 4, 7), torch.float64, False, {}),
        ("mind", (1, 1, 4, 1, 5), torch.float32, True, dict(radius=2, dilation=2, per_item=True)),
    ]


@group
def mind_descriptors(device):
    gen = _gen("mind_descriptors")
    for kind, shape, dtype, noncontiguous, kwargs in _mind_cases():
        what = f"{kind} {shape} {dtype} {kwargs}"
        vol = _volume(shape, dtype, device, gen, noncontiguous)
        channels = 12 if kind == "ssc" else 6
        grad_out = _volume((shape[0], channels, *shape[2:]), dtype, device, gen)
        out, (grad,) = _vjp(_descriptor(kind, "triton", **kwargs), [vol], grad_out)
        ref, (ref_grad,) = _vjp(_descriptor(kind, "reference", **kwargs), [vol], grad_out)
        _close(out, ref, dtype, what)
        _close(grad, ref_grad, dtype, what + " grad")


@group
def mind_variance_flags_and_clamp(device):
    """The clamped variance and the flag byte against the CPU core, on volumes where the clamp acts
    (a flat block: variance 0 < 0.001 m; one huge spike: variance > 1000 m) and on a constant volume."""
    import gradreg_fast  # noqa: F401  (registers torch.ops.gradreg)

    gen = _gen("mind_variance_flags_and_clamp")
    # Clamped from below: a flat block (variance 0 < 0.001 m).
    flat = _volume((2, 1, 6, 5, 7), torch.float64, "cpu", gen)
    flat[0, 0, :4, :4, :5] = 0.25
    # Clamped from above: one spike in > 2000 voxels (its variance is ~N/2 times the mean m).
    spike = _volume((1, 1, 13, 13, 13), torch.float64, "cpu", gen)
    spike[0, 0, 6, 6, 6] = 1e4
    cases = [("ssc", flat, 1, 1, False, "below"), ("mind", spike, 0, 1, True, "above")]
    for kind, vol, radius, dilation, per_item, clamped in cases:
        what = f"{kind} clamped {clamped}"
        args = (kind, radius, dilation, per_item)
        out, variance, flags = torch.ops.gradreg.mind_descriptor(vol.to(device), *args, "triton")
        cpu_out, cpu_variance, cpu_flags = torch.ops.gradreg.mind_descriptor(vol, *args, "cpu")
        _close(out.cpu(), cpu_out, torch.float64, what + " out")
        _close(variance.cpu(), cpu_variance, torch.float64, what + " variance")
        assert flags.dtype == torch.uint8 and torch.equal(flags.cpu(), cpu_flags), what + " flags"
        outside = (cpu_flags & 0x80) == 0
        side = cpu_variance > cpu_variance.median() if clamped == "above" else cpu_variance < cpu_variance.median()
        assert (outside & side).any() and (~outside).any(), what + ": the volume must exercise the clamp"
        grad_out = _volume(out.shape, torch.float64, "cpu", gen)
        fn = _descriptor(kind, "triton", radius=radius, dilation=dilation, per_item=per_item)
        _, (grad,) = _vjp(fn, [vol.to(device)], grad_out.to(device))
        ref_fn = _descriptor(kind, "reference", radius=radius, dilation=dilation, per_item=per_item)
        _, (ref_grad,) = _vjp(ref_fn, [vol], grad_out)
        _close(grad.cpu(), ref_grad, torch.float64, what + " grad")

    # A constant volume: every patch distance is 0, the descriptor is 1 and its gradient 0 (not NaN).
    for dtype in (torch.float32, torch.float64):
        vol = torch.full((1, 1, 4, 3, 5), 2.5, dtype=dtype, device=device)
        grad_out = _volume((1, 12, 4, 3, 5), dtype, device, gen)
        out, (grad,) = _vjp(_descriptor("ssc", "triton"), [vol], grad_out)
        assert torch.equal(out, torch.ones_like(out)), f"constant volume {dtype}: descriptor must be 1"
        assert torch.equal(grad, torch.zeros_like(grad)), f"constant volume {dtype}: gradient must be 0"


def _directional_gradcheck(fn, x, gen, what, directions=2, eps=1e-6):
    """gradcheck's fast mode: v . (J u) by central differences against (v^T J) . u from the backward,
    for random u and v. Written out because on a mismatch torch's gradcheck recomputes full Jacobians
    (one backward per output element), which under the interpreter takes many minutes."""
    x = x.detach().requires_grad_()
    out = fn(x)
    for _ in range(directions):
        u = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        v = torch.randn(out.shape, generator=gen, dtype=x.dtype).to(x.device)
        analytic = (torch.autograd.grad(out, x, v, retain_graph=True)[0] * u).sum()
        with torch.no_grad():
            numeric = ((fn(x + eps * u) - fn(x - eps * u)) * v).sum() / (2 * eps)
        assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8), f"{what}: {analytic} vs {numeric}"


@group
def mind_gradcheck(device):
    gen = _gen("mind_gradcheck")
    for kind, kwargs in (("ssc", dict(radius=1, dilation=1)), ("mind", dict(per_item=True))):
        vol = _volume((2, 1, 4, 5, 3), torch.float64, device, gen)
        _directional_gradcheck(_descriptor(kind, "triton", **kwargs), vol, gen, f"{kind} {kwargs}")


@group
def mind_loss(device):
    import gradreg_fast as gr

    gen = _gen("mind_loss")
    cases = [
        ("ssc", "l1", "mean", False, torch.float64, (2, 1, 5, 4, 7)),
        ("ssc", "l2", "sum", True, torch.float32, (1, 1, 6, 1, 5)),
        ("mind", "l1", "sum", False, torch.float32, (2, 1, 4, 5, 3)),
        ("mind", "l2", "mean", True, torch.float64, (1, 1, 5, 4, 6)),
    ]
    for descriptor, penalty, reduction, per_item, dtype, shape in cases:
        what = f"mind_loss {descriptor} {penalty} {reduction} per_item={per_item} {dtype}"
        warped = _volume(shape, dtype, device, gen, noncontiguous=True)
        fixed = _volume(shape, dtype, device, gen)
        losses = {}
        for backend in ("triton", "reference"):
            fn = lambda w: gr.mind_loss(w, fixed, descriptor, penalty, reduction=reduction,  # noqa: E731
                                        per_item=per_item, backend=backend)
            losses[backend] = _vjp(fn, [warped], torch.ones((), dtype=dtype, device=device))
        _close(losses["triton"][0], losses["reference"][0], dtype, what)
        _close(losses["triton"][1][0], losses["reference"][1][0], dtype, what + " grad")

    # The MINDLoss module through the fused path, upstream gradient != 1.
    warped = _volume((1, 1, 5, 4, 3), torch.float64, device, gen).requires_grad_()
    fixed = _volume((1, 1, 5, 4, 3), torch.float64, device, gen)
    grads = []
    for backend in ("triton", "reference"):
        loss = 3.5 * gr.MINDLoss(descriptor="mind", penalty="l2", backend=backend)(warped, fixed)
        grads.append(torch.autograd.grad(loss, warped)[0])
    _close(grads[0], grads[1], torch.float64, "MINDLoss grad")

    # The value-only op (no gradient needed) and a precomputed fixed descriptor, with and without grad.
    warped = _volume((2, 1, 5, 6, 4), torch.float64, device, gen)
    fixed = _volume((2, 1, 5, 6, 4), torch.float64, device, gen)
    expected = gr.mind_loss(warped, fixed, backend="reference")
    with torch.no_grad():
        _close(gr.mind_loss(warped.clone().requires_grad_(), fixed, backend="triton"), expected, torch.float64,
               "mind_loss value only")
    descriptor = gr.mind_ssc(fixed, backend="triton")
    _close(gr.mind_loss(warped, fixed_descriptor=descriptor, backend="triton"), expected, torch.float64,
           "mind_loss fixed_descriptor")
    leaves = [warped.clone().requires_grad_() for _ in range(2)]
    grad_cached = torch.autograd.grad(gr.mind_loss(leaves[0], fixed_descriptor=descriptor, backend="triton"),
                                      leaves[0])[0]
    grad_fixed = torch.autograd.grad(gr.mind_loss(leaves[1], fixed, backend="triton"), leaves[1])[0]
    _close(grad_cached, grad_fixed, torch.float64, "mind_loss fixed_descriptor grad")


@group
def size_limits(device):
    """Shapes the kernels cannot index are refused with a message, before any allocation or launch."""
    from gradreg_fast.triton_kernels import check_voxels, mind, volume_grid

    assert check_voxels("warp", (3, 5, 7)) == 105
    for call, needle in ((lambda: check_voxels("warp", (1025, 1024, 1024)), "1025x1024x1024"),
                         (lambda: volume_grid("mind", 2**30, 2**12, 256), "programs"),
                         (lambda: mind._channels([0] * 8), "7 ints per channel"),
                         (lambda: mind._channels([0] * 6 + [1]), "tie ranks"),
                         (lambda: mind._channels([0] * 7 * 128), "at most 127 channels")):
        try:
            call()
        except ValueError as exc:
            assert needle in str(exc), str(exc)
        else:
            raise AssertionError(f"no error for {needle!r}")


@group
def cost_volume_grid_beyond_the_volume(device):
    """A control grid larger than the volume (one partial block per axis) gives the reference's cost; the kernel's
    block loops stop at the volume's size (before, grid**3 masked steps: minutes in the interpreter at grid 40)."""
    import gradreg_fast as gr

    gen = _gen("cost_volume_grid_beyond_the_volume")
    for shape, radius, spacing, grid in (((1, 2, 3, 2, 5), 1, 1, 40), ((2, 1, 1, 4, 3), 1, 2, 4096)):
        fixed = _volume(shape, torch.float64, device, gen)
        moving = _volume(shape, torch.float64, device, gen)
        what = f"mind_cost_volume {shape} r={radius} s={spacing} grid={grid}"
        grad_out = _volume((shape[0], (2 * radius + 1) ** 3, 1, 1, 1), torch.float64, device, gen)  # one block
        expected = _vjp(lambda f, m: gr.mind_cost_volume(f, m, radius, spacing, grid, backend="reference"),
                        [fixed, moving], grad_out)
        actual = _vjp(lambda f, m: gr.mind_cost_volume(f, m, radius, spacing, grid, backend="triton"),
                      [fixed, moving], grad_out)
        _close(actual[0], expected[0], torch.float64, what)
        for a, e, name in zip(actual[1], expected[1], ("fixed", "moving")):
            _close(a, e, torch.float64, f"{what} grad {name}")


@group
def channel_offsets_past_int32(device):
    """Volumes of 2**29 and 2**30 voxels (accepted) put their channel offsets k * D*H*W past 2**31. One program of
    the real kernel runs over the first 256 voxels; its output or flow is a view 2**31 elements into a larger,
    lazily allocated buffer (only written pages are backed), so an offset wrapped in int32 would land in front of
    it, where a marker shows it. CPU only: a CUDA buffer is not allocated lazily."""
    if device != "cpu":
        return
    import triton

    from gradreg_fast.triton_kernels import lncc, warp

    # LNCC's five product channels, 512 x 1024 x 1024 voxels: channel 4 (fixed * warped) at out + 4 * D*H*W.
    d, h, w = 512, 1024, 1024
    voxels = d * h * w
    buffer = torch.empty(2**31 + 5 * voxels, dtype=torch.float16)
    buffer[:256] = -1.0
    out = buffer[2**31:]
    out[4 * voxels:4 * voxels + 256] = -1.0
    warped = torch.full((256,), 2.0, dtype=torch.float16)
    fixed = torch.full((256,), 3.0, dtype=torch.float16)
    lncc._products_kernel[(1,)](warped, fixed, 0, out, d, h, w, triton.cdiv(voxels, 256), BLOCK=256)
    assert out[4 * voxels:4 * voxels + 256].eq(6.0).all(), "lncc: channel 4 not where it belongs"
    assert buffer[:256].eq(-1.0).all(), "lncc: channel 4 written 2**31 elements before its buffer"
    del buffer, out

    # warp, 1024**3 voxels: the x displacement is read at flow + 2 * D*H*W.
    d = h = w = 1024
    voxels = d * h * w
    buffer = torch.empty(2**31 + 3 * voxels, dtype=torch.float32)
    buffer[:256] = 1.0  # a marker: read as the x displacement if the offset wraps
    flow = buffer[2**31:]
    for channel in range(3):
        flow[channel * voxels:channel * voxels + 256] = 0.0
    image = torch.zeros(2 * h * w, dtype=torch.float32)  # the rows z, y in {0, 1} hold the image x
    for z in (0, 1):
        for y in (0, 1):
            image[(z * h + y) * w:(z * h + y + 1) * w] = torch.arange(w, dtype=torch.float32)
    out = torch.full((256,), -1.0, dtype=torch.float32)
    warp._forward_kernel[(1,)](image, flow, out, 1, d, h, w, triton.cdiv(voxels, 256), NEAREST=False, BORDER=False,
                               BLOCK=256)
    assert torch.equal(out, torch.arange(256, dtype=torch.float32)), f"warp: {out[:4].tolist()} for zero flow"


# ------------------------------------------------------------------------------------------------ runners


def _run_group(name: str, device: str, interpret: bool) -> None:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if interpret else "0"
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), name, device], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"check group {name!r} on {device} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    )


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="triton is not installed (pip install 'gradreg_fast[triton]')")


@requires_triton
@pytest.mark.parametrize("name", list(GROUPS))
def test_triton_interpreter_on_cpu(name):
    _run_group(name, "cpu", interpret=True)


@requires_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GROUPS))
def test_triton_compiled_on_cuda(name):
    _run_group(name, "cuda", interpret=False)


if __name__ == "__main__":
    # Tiny tensors: one intra-op thread avoids waking an OpenMP team for every small torch op.
    torch.set_num_threads(1)
    GROUPS[sys.argv[1]](sys.argv[2])
