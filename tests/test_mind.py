"""mind_ssc and mind: the fused CPU core against the references (ConvexAdam's included), gradients,
degenerate volumes, batch statistics, dtypes and bad input."""

import pytest
import torch
from conftest import make_volume, non_contiguous_grad_output, value_and_grads

import gradreg_fast
from gradreg_fast import reference

OPS = {"ssc": (gradreg_fast.mind_ssc, reference.mind_ssc, 12), "mind": (gradreg_fast.mind, reference.mind, 6)}

SHAPES = [
    (2, 1, 5, 4, 7),  # batch, odd sizes
    (1, 1, 1, 5, 6),  # D = 1
    (1, 1, 4, 1, 5),  # H = 1
    (2, 1, 3, 5, 1),  # W = 1
]


def _fused(kind, **kwargs):
    return lambda v: OPS[kind][0](v, backend="cpu", **kwargs)


def _reference(kind, **kwargs):
    return lambda v: OPS[kind][1](v, **kwargs)


def _tolerances(dtype):
    # exp(-x / v) of box means: float32 keeps ~6 significant digits.
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_cpu_matches_reference(kind, shape, dtype, noncontiguous, gen):
    vol = make_volume(shape, dtype, noncontiguous, gen)
    channels = OPS[kind][2]
    grad_out = make_volume((shape[0], channels, *shape[2:]), dtype, False, gen)
    out, (grad,) = value_and_grads(_fused(kind), [vol], grad_out)
    ref_out, (ref_grad,) = value_and_grads(_reference(kind), [vol], grad_out)
    assert out.shape == (shape[0], channels, *shape[2:]) and out.dtype == dtype
    torch.testing.assert_close(out, ref_out, **_tolerances(dtype))
    # The gradient divides by the local variance, so it is larger than the values: relative tolerance.
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-4 * ref_grad.abs().max().item() if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("grad_layout", ["expanded", "strided"])
def test_backward_with_a_non_contiguous_grad_output(kind, grad_layout, gen):
    vol = make_volume((2, 1, 5, 4, 6), torch.float64, False, gen)
    shape = (2, OPS[kind][2], 5, 4, 6)
    grad_out = non_contiguous_grad_output(shape, grad_layout, gen)
    _, (grad,) = value_and_grads(_fused(kind), [vol], grad_out)
    _, (ref_grad,) = value_and_grads(_reference(kind), [vol], grad_out.contiguous())
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("radius, dilation", [(0, 1), (1, 1), (1, 3), (2, 2), (3, 1)])
def test_radius_and_dilation(kind, radius, dilation, gen):
    vol = make_volume((1, 1, 6, 5, 7), torch.float64, False, gen)
    out = OPS[kind][0](vol, radius=radius, dilation=dilation, backend="cpu")
    torch.testing.assert_close(out, OPS[kind][1](vol, radius=radius, dilation=dilation), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 1), (1, 3)])
def test_ssc_matches_convexadam(dtype, radius, dilation, gen):
    # Batch of two with different scales: the batch-shared m (the original's .item()) matters here.
    vol = torch.cat([make_volume((1, 1, 7, 6, 5), dtype, False, gen),
                     make_volume((1, 1, 7, 6, 5), dtype, False, gen, scale=30.0)])
    expected = reference.mind_ssc_convexadam(vol, radius, dilation)
    for backend in ("cpu", "reference"):
        out = gradreg_fast.mind_ssc(vol, radius, dilation, backend=backend)
        torch.testing.assert_close(out, expected, **_tolerances(dtype))


def test_convexadam_channel_order_is_the_published_one():
    # ConvexAdam's MINDSSC re-indexes its 12 channels with this literal list; every path reuses it.
    from gradreg_fast.ops.mind_tables import SSC_PERMUTATION

    assert tuple(SSC_PERMUTATION) == (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


def test_ssc_channels_of_a_volume_varying_along_one_axis():
    # Independent of the pair table's code: ConvexAdam's six-neighbourhood (3x3x3 kernel indices),
    # its pairs (i > j, squared distance 2, row-major), and its output permutation, rebuilt here by
    # hand. For a volume that varies only along W, exactly the channels whose two offsets agree in x
    # see no difference: after subtracting the channel minimum (0) they are exp(0) = 1.
    six = [(0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)]
    pairs = [(six[i], six[j]) for i in range(6) for j in range(6)
             if i > j and sum((p - q) ** 2 for p, q in zip(six[i], six[j])) == 2]
    pairs = [pairs[k] for k in (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)]
    flat_in_x = [k for k, (a, b) in enumerate(pairs) if a[2] == b[2]]
    assert len(flat_in_x) == 4
    x = torch.arange(9, dtype=torch.float64)
    vol = (x**2).expand(1, 1, 5, 6, 9).contiguous()
    out = gradreg_fast.mind_ssc(vol, radius=1, dilation=1, backend="cpu")
    for k in range(12):
        if k in flat_in_x:
            assert torch.equal(out[:, k], torch.ones_like(out[:, k])), k
        else:
            assert (out[:, k] < 1).any(), k


def test_mind_channel_order():
    # Documented order: offsets -z, -x, -y, +x, +z, +y. With I = x**2 only the x channels see a
    # difference, and (I(x+1) - I(x))**2 > (I(x) - I(x-1))**2 inside, so +x is the smaller value.
    x = torch.arange(9, dtype=torch.float64)
    vol = (x**2).expand(1, 1, 4, 5, 9).contiguous()
    out = gradreg_fast.mind(vol, radius=0, dilation=1, backend="cpu")
    for k in (0, 2, 4, 5):
        assert torch.equal(out[:, k], torch.ones_like(out[:, k])), k
    minus_x, plus_x = out[:, 1, ..., 1:-1], out[:, 3, ..., 1:-1]  # at x = 0 and 8 one side replicates
    assert (plus_x < minus_x).all()


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 4, 6), (2, 1, 3, 1, 4)])
@pytest.mark.parametrize("per_item", [False, True])
def test_gradcheck(kind, shape, per_item, gen):
    # m (the mean variance) is held constant by the backward, as in the .item() original. On random
    # data no voxel's variance reaches the clamp, so m does not affect the output and gradcheck holds.
    vol = make_volume(shape, torch.float64, True, gen).requires_grad_()
    assert torch.autograd.gradcheck(_fused(kind, per_item=per_item, radius=1, dilation=1), (vol,))


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_gradcheck_default_neighbourhood(kind, gen):
    vol = make_volume((1, 1, 5, 4, 6), torch.float64, False, gen).requires_grad_()
    assert torch.autograd.gradcheck(_fused(kind), (vol,))


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_clamped_variance_gradient_matches_reference(kind, gen):
    # Item 0 is 100x smaller than item 1, so with the batch-shared m most of its variances are below
    # the clamp 0.001 m: the backward must stop the gradient through the variance there.
    vol = torch.cat([make_volume((1, 1, 5, 4, 6), torch.float64, False, gen),
                     make_volume((1, 1, 5, 4, 6), torch.float64, False, gen, scale=100.0)])
    grad_out = make_volume((2, OPS[kind][2], 5, 4, 6), torch.float64, False, gen)
    out, (grad,) = value_and_grads(_fused(kind), [vol], grad_out)
    ref_out, (ref_grad,) = value_and_grads(_reference(kind), [vol], grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_constant_volume(kind, dtype, backend):
    # The original divides 0 by 0 here; the documented result is all ones, with a zero gradient. The
    # reference is also the fallback backend, so it must keep that promise too.
    vol = torch.full((2, 1, 4, 5, 3), 3.5, dtype=dtype, requires_grad=True)
    out = OPS[kind][0](vol, backend=backend)
    assert torch.equal(out, torch.ones_like(out))
    if kind == "ssc":
        assert torch.isnan(reference.mind_ssc_convexadam(vol.detach())).all()
    out.backward(torch.ones_like(out))
    assert torch.equal(vol.grad, torch.zeros_like(vol))


def _near_constant_volumes(dtype, gen):
    shape = (2, 1, 5, 4, 6)
    bump = torch.zeros(shape, dtype=dtype)
    bump[0, 0, 2, 1, 3] = 1.0  # flat everywhere but one voxel: most variances sit at the lower clamp
    one_flat_item = make_volume(shape, dtype, False, gen)
    one_flat_item[1] = -2.0
    return {
        "offset_plus_small_noise": 3.0 + make_volume(shape, dtype, False, gen, scale=1e-3),
        "tiny_noise": make_volume(shape, dtype, False, gen, scale=1e-20),  # squares are denormal in float32
        "single_voxel_bump": bump,
        "one_flat_item": one_flat_item,
    }


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_item", [False, True])
@pytest.mark.parametrize("case", ["offset_plus_small_noise", "tiny_noise", "single_voxel_bump", "one_flat_item"])
def test_near_constant_volumes_are_finite(kind, dtype, per_item, case, gen):
    vol = _near_constant_volumes(dtype, gen)[case]
    grad_out = make_volume((2, OPS[kind][2], 5, 4, 6), dtype, False, gen)
    out, (grad,) = value_and_grads(_fused(kind, per_item=per_item), [vol], grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    ref_out = _reference(kind, per_item=per_item)(vol)
    # Differences of nearly equal values: float32 loses digits before either implementation sees them.
    tolerance = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out, ref_out, **tolerance)
    if dtype == torch.float64:
        # In float32 the squared differences of tiny noise are denormal, and the fused backward treats
        # such a volume as constant where autograd does not: there only finiteness is promised.
        ref_grad = value_and_grads(_reference(kind, per_item=per_item), [vol], grad_out)[1][0]
        for item in range(vol.shape[0]):
            if per_item and (vol[item] == vol[item].flatten()[0]).all():
                # A constant item with its own m: the descriptor is constant, and so is the loss.
                assert torch.equal(grad[item], torch.zeros_like(grad[item]))
            else:
                torch.testing.assert_close(grad[item], ref_grad[item], rtol=1e-7,
                                           atol=1e-9 * ref_grad[item].abs().max().item())


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 6, 5), (2, 1, 2, 5, 6), (1, 1, 6, 2, 1)])
def test_volume_smaller_than_the_neighbourhood(kind, shape, gen):
    # radius 2 and dilation 2 reach 4 voxels away; offsets and boxes leaving the volume read its edge.
    vol = make_volume(shape, torch.float64, False, gen).requires_grad_()
    fused = _fused(kind, radius=2, dilation=2)
    out = fused(vol)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(kind, radius=2, dilation=2)(vol), rtol=1e-10, atol=1e-12)
    if kind == "ssc":
        torch.testing.assert_close(out, reference.mind_ssc_convexadam(vol, 2, 2), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (vol,))


def _two_scales(gen, dtype=torch.float64):
    item = make_volume((1, 1, 5, 6, 4), dtype, False, gen)
    return torch.cat([item, 1000.0 * item])


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_batch_shared_m_by_default(kind, gen):
    # Descriptors are scale-invariant per item only when m is per item: with the default batch-shared
    # m, the small item's variances are clamped up to 0.001 m and its descriptor changes.
    vol = _two_scales(gen)
    shared = OPS[kind][0](vol, backend="cpu")
    torch.testing.assert_close(shared, OPS[kind][1](vol), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shared, OPS[kind][1](vol, per_item=False), rtol=1e-10, atol=1e-12)
    assert (shared[0] - shared[1]).abs().amax() > 1e-3
    alone = OPS[kind][0](vol[1:], backend="cpu")  # the large item dominates m: it barely changes
    torch.testing.assert_close(shared[1:], alone, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_per_item(kind, gen):
    vol = _two_scales(gen)
    per_item = OPS[kind][0](vol, per_item=True, backend="cpu")
    torch.testing.assert_close(per_item, OPS[kind][1](vol, per_item=True), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_item[0], per_item[1], rtol=1e-10, atol=1e-12)  # scale invariance
    assert (per_item - OPS[kind][0](vol, per_item=False, backend="cpu")).abs().amax() > 1e-3


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_per_item_changes_nothing_when_items_share_the_scale(kind, gen):
    item = make_volume((1, 1, 5, 6, 4), torch.float64, False, gen)
    for vol in (item, torch.cat([item, item.flip(-1)])):
        assert torch.equal(OPS[kind][0](vol, per_item=True, backend="cpu"),
                           OPS[kind][0](vol, per_item=False, backend="cpu"))


@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_does_not_modify_input(kind, gen):
    vol = make_volume((1, 1, 4, 5, 3), torch.float32, True, gen)
    before = vol.clone()
    OPS[kind][0](vol, backend="cpu")
    assert torch.equal(vol, before)


@pytest.mark.parametrize("kind", ["ssc", "mind"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(kind, dtype, gen):
    vol = make_volume((1, 1, 5, 4, 6), dtype, False, gen).requires_grad_()
    out = OPS[kind][0](vol, backend="cpu")
    assert out.dtype == dtype
    vol32 = vol.detach().float().requires_grad_()
    out32 = OPS[kind][0](vol32, backend="cpu")
    assert torch.equal(out, out32.to(dtype))
    grad_out = make_volume(out.shape, dtype, False, gen)
    out.backward(grad_out)
    out32.backward(grad_out.float())
    assert vol.grad.dtype == dtype
    torch.testing.assert_close(vol.grad, vol32.grad.to(dtype))


@pytest.mark.parametrize("op", [gradreg_fast.mind_ssc, gradreg_fast.mind])
class TestBadInput:
    def test_wrong_rank(self, op):
        with pytest.raises(ValueError, match="`vol` must have 5 dimensions"):
            op(torch.ones(1, 4, 5, 6))

    def test_integer_dtype(self, op):
        with pytest.raises(TypeError, match="`vol` must be a floating-point tensor"):
            op(torch.ones(1, 1, 4, 5, 6, dtype=torch.int64))

    def test_empty(self, op):
        with pytest.raises(ValueError, match="`vol` must not be empty"):
            op(torch.ones(1, 1, 4, 0, 6))

    @pytest.mark.parametrize("channels", [2, 3])
    def test_more_than_one_channel(self, op, channels):
        with pytest.raises(ValueError, match="`vol` must have 1 channel"):
            op(torch.ones(1, channels, 4, 5, 6))

    @pytest.mark.parametrize("radius", [-1, 1.5, "2"])
    def test_bad_radius(self, op, radius):
        with pytest.raises(ValueError, match="`radius` must be an int >= 0"):
            op(torch.ones(1, 1, 4, 5, 6), radius=radius)

    @pytest.mark.parametrize("dilation", [0, -2, 2.0])
    def test_bad_dilation(self, op, dilation):
        with pytest.raises(ValueError, match="`dilation` must be an int >= 1"):
            op(torch.ones(1, 1, 4, 5, 6), dilation=dilation)

    def test_bad_backend(self, op):
        with pytest.raises(ValueError, match="`backend` must be one of"):
            op(torch.ones(1, 1, 4, 5, 6), backend="fast")


# ------------------------------------------------------------------ ties for the per-voxel minimum
# The originals (ConvexAdam, TransMorph, VoxelMorph++) form the 12 SSC channels in their convolution's
# order, take torch.min over them (the first of equal values carries the gradient), and only then permute
# the channels. Rebuilt here from that description alone (not from the package's tables), with autograd.


def _originals_channel_order():
    six = [(-1, 0, 0), (0, 0, -1), (0, -1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 0)]
    return [(six[i], six[j]) for i in range(6) for j in range(6)
            if i > j and sum((p - q) ** 2 for p, q in zip(six[i], six[j])) == 2]


def _replicate_shift(vol, offset, dilation):
    d, h, w = vol.shape[2:]
    padded = torch.nn.functional.pad(vol, (dilation,) * 6, mode="replicate")
    z, y, x = (dilation * (1 + o) for o in offset)
    return padded[:, :, z:z + d, y:y + h, x:x + w]


def _ssc_in_the_originals_order(vol, radius=2, dilation=2, tie_order=None):
    """MIND-SSC with the minimum taken over the originals' channel order (or over ``tie_order``)."""
    channels = []
    for a, b in _originals_channel_order():
        squared = (_replicate_shift(vol, a, dilation) - _replicate_shift(vol, b, dilation)) ** 2
        padded = torch.nn.functional.pad(squared, (radius,) * 6, mode="replicate")
        channels.append(torch.nn.functional.avg_pool3d(padded, 2 * radius + 1, stride=1))
    ssd = torch.cat(channels, dim=1)
    order = list(range(12)) if tie_order is None else list(tie_order)
    lowest = ssd[:, order].min(dim=1, keepdim=True).values
    centred = ssd - lowest
    variance = centred.mean(dim=1, keepdim=True)
    m = variance.mean().item()  # a constant to autograd, as in the originals
    variance = variance.clamp(m * 0.001, m * 1000)
    return torch.exp(-centred / variance)[:, [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]]


def _tied_volumes(gen, shape=(1, 1, 14, 13, 12)):
    warped = torch.randint(0, 4, shape, generator=gen).double()  # integer values: many exact ties
    fixed = torch.rand(shape, generator=gen, dtype=torch.float64)
    return warped, fixed


def test_tied_volumes_are_sensitive_to_the_tie_order(gen):
    # Guards the tests below: on these volumes another tie order gives another gradient.
    warped, fixed = _tied_volumes(gen)
    grads = []
    for tie_order in (None, list(range(11, -1, -1))):
        leaf = warped.clone().requires_grad_()
        loss = ((_ssc_in_the_originals_order(leaf, tie_order=tie_order) - _ssc_in_the_originals_order(fixed)) ** 2)
        loss.mean().backward()
        grads.append(leaf.grad)
    assert (grads[0] - grads[1]).abs().max() > 0.01 * grads[0].abs().max()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_loss_gradient_with_ties_equals_the_originals(backend, penalty, gen):
    warped, fixed = _tied_volumes(gen)
    leaf = warped.clone().requires_grad_()
    diff = _ssc_in_the_originals_order(leaf) - _ssc_in_the_originals_order(fixed)
    (diff**2 if penalty == "l2" else diff.abs()).mean().backward()
    ours = warped.clone().requires_grad_()
    gradreg_fast.mind_loss(ours, fixed, penalty=penalty, backend=backend).backward()
    scale = leaf.grad.abs().max().item()
    assert (ours.grad - leaf.grad).abs().max().item() <= 1e-12 * scale


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("radius, dilation", [(2, 2), (1, 1), (1, 3)])
def test_descriptor_gradient_with_ties_equals_the_originals(backend, radius, dilation, gen):
    warped, _ = _tied_volumes(gen, (2, 1, 9, 8, 11))
    grad_out = torch.randn((2, 12, 9, 8, 11), generator=gen, dtype=torch.float64)
    out, (grad,) = value_and_grads(lambda v: gradreg_fast.mind_ssc(v, radius, dilation, backend=backend), [warped],
                                   grad_out)
    expected, (expected_grad,) = value_and_grads(lambda v: _ssc_in_the_originals_order(v, radius, dilation),
                                                 [warped], grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert (grad - expected_grad).abs().max().item() <= 1e-12 * expected_grad.abs().max().item()


def test_reference_tables_agree_with_the_kernels_tables():
    # The reference builds its tables by names of unit steps; the kernels' come from 3x3x3 kernel indices
    # (gradreg_fast/ops/mind_tables.py). Neither module imports the other's.
    import importlib
    import inspect

    from gradreg_fast.ops import mind_tables

    reference_mind = importlib.import_module("gradreg_fast.reference.mind")  # the package exports a function `mind`

    assert "mind_tables" not in inspect.getsource(reference_mind).split('"""', 2)[2]
    assert reference_mind.SSC_PAIRS == mind_tables.SSC_PAIRS
    assert reference_mind.MIND_PAIRS == mind_tables.MIND_PAIRS
    assert tuple(reference_mind.SSC_TIE_RANKS) == tuple(mind_tables.SSC_TIE_RANKS)
    # Geometry both must have: 12 distinct pairs of unit steps along different axes.
    assert len(set(reference_mind.SSC_PAIRS)) == 12
    for a, b in reference_mind.SSC_PAIRS:
        assert sum(map(abs, a)) == sum(map(abs, b)) == 1 and sum((p - q) ** 2 for p, q in zip(a, b)) == 2
