"""coupled_argmin: the fused search step of the coupled convex optimisation, against the reference (all
coupled costs materialised, then argmin) on fresh random inputs: odd sizes, axes of size 1, batch > 1,
non-contiguous inputs, radii 0 to 2, plain and mirrored; the mirrored search against a cost volume computed
the other way round; ties, NaN, bad input, both CPU kernel copies, torch.compile and opcheck."""

import importlib

import pytest
import torch
from conftest import make_volume

import gradreg_fast
from gradreg_fast import reference

# (shape of the cost volume's points (N, D, H, W), radius)
CASES = [((2, 5, 6, 7), 1), ((1, 1, 8, 5), 2), ((1, 4, 1, 9), 1), ((3, 3, 4, 1), 0), ((1, 7, 5, 11), 2),
         ((2, 1, 1, 1), 1)]
COUPLINGS = [0.0, 0.05, 0.7, 30.0]


def _inputs(points, radius, dtype, gen, noncontiguous=False, field_scale=None):
    n, d, h, w = points
    k = (2 * radius + 1) ** 3
    cost = make_volume((n, k, d, h, w), dtype, noncontiguous, gen).abs()
    field = make_volume((n, 3, d, h, w), dtype, noncontiguous, gen, scale=field_scale or max(radius, 1))
    return cost, field


@pytest.mark.parametrize("points, radius", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(points, radius, dtype, mirrored, noncontiguous, gen):
    cost, field = _inputs(points, radius, dtype, gen, noncontiguous)
    for coupling in COUPLINGS:
        index = gradreg_fast.coupled_argmin(cost, field, coupling, mirrored, backend="cpu")
        expected = reference.coupled_argmin(cost, field, coupling, mirrored)
        assert index.dtype == torch.int64 and index.shape == points
        assert torch.equal(index, expected), (coupling, (index != expected).sum().item())


def test_reference_backend_through_the_op(gen):
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)
    assert torch.equal(gradreg_fast.coupled_argmin(cost, field, 0.3, True, backend="reference"),
                       reference.coupled_argmin(cost, field, 0.3, True))


def test_the_coupling_pulls_towards_the_field(gen):
    cost, field = _inputs((1, 4, 5, 6), 2, torch.float64, gen)
    table = gradreg_fast.mind_cost_volume_displacements(2, dtype=torch.float64)
    target = torch.randint(0, 125, (1, 4, 5, 6), generator=gen)
    field = table[target].permute(0, 4, 1, 2, 3).contiguous()  # every point's field is one displacement
    free = gradreg_fast.coupled_argmin(cost, field, 0.0)
    assert torch.equal(free, cost.argmin(1)) and not torch.equal(free, target)
    assert torch.equal(gradreg_fast.coupled_argmin(cost, field, 1e6), target)


def test_mirrored_is_the_opposite_search(gen):
    # A cost volume of moving -> fixed matching equals the fixed -> moving one read mirrored, wherever the
    # landing point p + d_k lies inside the grid for every k (bit for bit: (a - b)^2 == (b - a)^2).
    radius = 2
    fixed = make_volume((1, 4, 9, 10, 11), torch.float64, False, gen)
    moving = make_volume((1, 4, 9, 10, 11), torch.float64, False, gen)
    forward = gradreg_fast.mind_cost_volume(fixed, moving, radius)
    backward = gradreg_fast.mind_cost_volume(moving, fixed, radius)
    field = make_volume((1, 3, 9, 10, 11), torch.float64, False, gen, scale=2.0)
    inner = (slice(None), slice(radius, -radius), slice(radius, -radius), slice(radius, -radius))
    for coupling in (0.0, 0.2, 5.0):
        mirrored = gradreg_fast.coupled_argmin(forward, field, coupling, mirrored=True)
        direct = gradreg_fast.coupled_argmin(backward, field, coupling)
        assert torch.equal(mirrored[inner], direct[inner])


def test_ties_go_to_the_lowest_displacement(gen):
    cost = torch.full((1, 27, 3, 4, 5), 0.75, dtype=torch.float64)
    zero = torch.zeros((1, 3, 3, 4, 5), dtype=torch.float64)
    for mirrored in (False, True):
        assert (gradreg_fast.coupled_argmin(cost, zero, 0.0, mirrored) == 0).all()
        # With coupling, the zero displacement (k = 13) is the only minimum; two equal costs below it tie.
        assert (gradreg_fast.coupled_argmin(cost, zero, 0.5, mirrored) == 13).all()
    cost[:, 20], cost[:, 7] = 0.25, 0.25
    assert (gradreg_fast.coupled_argmin(cost, zero, 0.0) == 7).all()


def test_nan_never_wins(gen):
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)
    cost[:, ::2] = float("nan")  # half the displacements everywhere
    cost[0, :, 1, 2, 3] = float("nan")  # one point with nothing but NaN: index 0
    for mirrored in (False, True):
        index = gradreg_fast.coupled_argmin(cost, field, 0.3, mirrored)
        assert torch.equal(index, reference.coupled_argmin(cost, field, 0.3, mirrored))
    index = gradreg_fast.coupled_argmin(cost, field, 0.3)
    assert index[0, 1, 2, 3] == 0
    others = torch.ones_like(index, dtype=torch.bool)
    others[0, 1, 2, 3] = False
    assert (index[others] % 2 == 1).all()  # only the displacements with a value


def test_low_precision_is_computed_in_float32(gen):
    cost, field = _inputs((1, 3, 4, 5), 1, torch.float32, gen)
    half_cost, half_field = cost.to(torch.bfloat16), field.to(torch.bfloat16)
    index = gradreg_fast.coupled_argmin(half_cost, half_field, 0.2)
    assert torch.equal(index, reference.coupled_argmin(half_cost.float(), half_field.float(), 0.2))


def test_same_result_for_every_thread_count(gen):
    cost, field = _inputs((1, 16, 40, 40), 1, torch.float32, gen)  # above the size where threads start
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([gradreg_fast.coupled_argmin(cost, field, 0.1, m) for m in (False, True)])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_bad_arguments(gen):
    cost, field = _inputs((1, 3, 4, 5), 1, torch.float32, gen)
    cases = [
        ((cost[0], field, 0.1), ValueError, "5 dimensions"),
        ((cost[:, :26], field, 0.1), ValueError, r"\(2r \+ 1\)\^3"),
        ((torch.rand(1, 8, 3, 4, 5), field, 0.1), ValueError, r"\(2r \+ 1\)\^3"),
        ((cost, field[:, :2], 0.1), ValueError, "3 channel"),
        ((cost, field[..., :4], 0.1), ValueError, "spatial shapes"),
        ((cost, field.double(), 0.1), TypeError, "one dtype"),
        ((cost.long(), field, 0.1), TypeError, "floating-point"),
        ((cost, field, -1.0), ValueError, "coupling"),
        ((cost, field, float("nan")), ValueError, "coupling"),
        ((cost, field, True), ValueError, "coupling"),
        ((cost, field, 0.1, 1), TypeError, "mirrored"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            gradreg_fast.coupled_argmin(*args)
    with pytest.raises(ValueError, match="backend"):
        gradreg_fast.coupled_argmin(cost, field, 0.1, backend="gpu")


@pytest.fixture(params=importlib.import_module("gradreg_fast._C").available_isas())
def isa(request):
    core = importlib.import_module("gradreg_fast._C")
    previous = core.cpu_isa()
    core.set_cpu_isa(request.param)
    yield request.param
    core.set_cpu_isa(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_isa_copies(isa, dtype, gen):
    test_matches_reference((2, 5, 6, 37), 2, dtype, True, False, gen)
    test_matches_reference((1, 3, 7, 9), 1, dtype, False, True, gen)


def test_compile_fullgraph(gen):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)

    def fn(c, f):
        return gradreg_fast.coupled_argmin(c, f, 0.3, True, backend="cpu")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    assert torch.equal(compiled(cost, field), fn(cost, field))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_opcheck(gen):
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)
    for mirrored in (False, True):
        results = torch.library.opcheck(torch.ops.gradreg.coupled_argmin.default, (cost, field, 0.3, mirrored, "cpu"))
        assert all(result == "SUCCESS" for result in results.values()), results
