"""coupled_argmin: the fused search step of the coupled convex optimisation, against the reference (all
coupled costs materialised, then argmin) on fresh random inputs: odd sizes, axes of size 1, batch > 1,
non-contiguous inputs, radii 0 to 2, plain and mirrored; the mirrored search against a cost volume computed
the other way round; ties, NaN, bad input, both CPU kernel copies, torch.compile and opcheck.

* CUDA source compiled for the CPU against csrc/cuda/emulation.cuh (grids capped at 3 blocks, so the
  grid-stride loop strides), at the core level with poisoned outputs, and its argument errors.
* Triton kernel under TRITON_INTERPRET=1 in a subprocess (the interpreter must be chosen before triton is
  imported).
* On a GPU (skipped without one): the real CUDA core, and the CUDA and compiled Triton backends.
"""

if __name__ == "__main__":  # the Triton check subprocess: the interpreter must be on before triton is imported
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (GPU_BACKENDS, cuda_core_fixture, make_volume, requires_cuda,  # noqa: E402
                      run_under_triton_interpreter)

import gradreg_fast  # noqa: E402
from gradreg_fast import reference  # noqa: E402

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


def test_ties_go_to_the_displacement_nearest_the_field(gen):
    cost = torch.full((1, 27, 3, 4, 5), 0.75, dtype=torch.float64)
    zero = torch.zeros((1, 3, 3, 4, 5), dtype=torch.float64)
    for mirrored in (False, True):
        for coupling in (0.0, 0.5):  # flat costs: the zero displacement (k = 13), with or without coupling
            assert (gradreg_fast.coupled_argmin(cost, zero, coupling, mirrored) == 13).all()
    # Two equal minima: the one nearer the field wins; equally near, the lower k.
    cost[:, 20], cost[:, 7] = 0.25, 0.25  # d_20 = (1, 0, -1), d_7 = (-1, 1, 0)
    assert (gradreg_fast.coupled_argmin(cost, zero, 0.0) == 7).all()
    toward_20 = zero.clone()
    toward_20[:, 0] = 0.5
    assert (gradreg_fast.coupled_argmin(cost, toward_20, 0.0) == 20).all()
    # Uniform costs follow any field to its nearest displacement, as the reference does.
    flat = torch.full((2, 27, 3, 4, 5), 0.5, dtype=torch.float64)
    field = (torch.rand((2, 3, 3, 4, 5), generator=gen, dtype=torch.float64) - 0.5) * 3
    expected = ((field.round().clamp(-1, 1) + 1) * torch.tensor([9.0, 3.0, 1.0]).view(1, 3, 1, 1, 1)).sum(1).long()
    for mirrored in (False, True):
        index = gradreg_fast.coupled_argmin(flat, field, 0.0, mirrored)
        assert torch.equal(index, expected)
        assert torch.equal(index, reference.coupled_argmin(flat, field, 0.0, mirrored))


def test_nan_never_wins(gen):
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)
    cost[:, ::2] = float("nan")  # half the displacements everywhere
    cost[0, :, 1, 2, 3] = float("nan")  # one point with nothing but NaN: all +inf, the nearest the field
    for mirrored in (False, True):
        index = gradreg_fast.coupled_argmin(cost, field, 0.3, mirrored)
        assert torch.equal(index, reference.coupled_argmin(cost, field, 0.3, mirrored))
    index = gradreg_fast.coupled_argmin(cost, field, 0.3)
    nearest = ((field[0, :, 1, 2, 3].round().clamp(-1, 1) + 1) * torch.tensor([9.0, 3.0, 1.0])).sum().long()
    assert index[0, 1, 2, 3] == nearest
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_isa_copies(isa, dtype, gen):
    test_matches_reference((2, 5, 6, 37), 2, dtype, True, False, gen)
    test_matches_reference((1, 3, 7, 9), 1, dtype, False, True, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_isa_copies_break_exact_ties_as_the_reference(isa, dtype, gen):
    # Ties built on purpose, which random costs almost never give: a fused multiply-add (the AVX2+FMA copy's
    # compiler may contract a * b + c) rounds once and breaks them another way than the reference.
    t = torch.rand(4000, generator=gen, dtype=torch.float64).to(dtype)
    field = torch.stack([t, t, t / 2]).view(1, 3, 1, 1, 4000)  # d_16 = (0, 1, 0), d_22 = (1, 0, 0): equally near
    cost = torch.full((1, 27, 1, 1, 4000), 100.0, dtype=dtype)
    cost[:, 16], cost[:, 22] = 0.0, 0.0
    assert torch.equal(gradreg_fast.coupled_argmin(cost, field, 0.0), reference.coupled_argmin(cost, field, 0.0))
    # Two coupled costs equal in the reference's rounding: 0.70025 + 0.1 * 3 and 1.0002501 + 0.1 * 0 in float32.
    cost = torch.full((1, 27, 1, 1, 1), 100.0, dtype=dtype)
    cost[0, 26], cost[0, 13] = 0.70025, 1.0002501
    zero = torch.zeros((1, 3, 1, 1, 1), dtype=dtype)
    assert torch.equal(gradreg_fast.coupled_argmin(cost, zero, 0.1), reference.coupled_argmin(cost, zero, 0.1))


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


# ---------------------------------------------------------------- the CUDA core (emulated on the CPU, or real)

# (points (N, D, H, W), radius): odd sizes, size-1 axes, batch > 1; 2 x 7 x 9 x 13 points are more than the
# emulator's 3 blocks of 256 threads, so threads stride.
CORE_CASES = CASES + [((2, 7, 9, 13), 2), ((1, 3, 5, 2), 4)]


def _with_special_values(cost, field, gen):
    """cost with NaN at random places, a point whose costs are all NaN, a point whose costs are all +inf and
    one displacement at -inf somewhere, and field with a NaN and an inf component at two points: the cases
    where the order of the comparisons matters."""
    field = field.clone()
    for position, value in zip(torch.randperm(field.numel(), generator=gen)[:2].tolist(), (float("nan"), float("inf"))):
        field.view(-1)[position] = value
    cost = cost.clone()
    cost[torch.rand(cost.shape, generator=gen) < 0.2] = float("nan")
    points = cost[:, 0].numel()
    first, second, third = torch.randperm(points, generator=gen)[:3].tolist()
    flat = cost.movedim(1, -1).reshape(points, -1)  # a copy: written back below
    flat[first] = float("nan")
    flat[second] = float("inf")
    flat[third, flat.shape[1] // 2] = -float("inf")
    return flat.reshape(*cost.shape[:1], *cost.shape[2:], cost.shape[1]).movedim(-1, 1).contiguous(), field


def _check_core(module, device, points, radius, dtype, gen, special=False):
    """The core's entry point against the reference (computed on the CPU), index poisoned (-1) before
    each call."""
    n, d, h, w = points
    cost, field = _inputs(points, radius, dtype, gen)
    if special:
        cost, field = _with_special_values(cost, field, gen)
    stream = torch.cuda.current_stream(device).cuda_stream if torch.device(device).type == "cuda" else 0
    cost_d, field_d = cost.to(device), field.to(device)
    for mirrored in (False, True):
        for coupling in COUPLINGS:
            index = torch.full(points, -1, dtype=torch.int64, device=device)
            err = module.coupled_argmin_forward(dtype == torch.float64, cost_d.data_ptr(), field_d.data_ptr(),
                                                coupling, index.data_ptr(), n, d, h, w, radius, mirrored, stream)
            assert err == "", err
            expected = reference.coupled_argmin(cost, field, coupling, mirrored)
            got = index.cpu()
            assert torch.equal(got, expected), (points, radius, mirrored, coupling, (got != expected).sum().item())


def _check_core_bad_arguments(module, device):
    cost = torch.rand(1, 27, 3, 4, 5, device=device)
    field = torch.rand(1, 3, 3, 4, 5, device=device)
    index = torch.full((1, 3, 4, 5), -1, dtype=torch.int64, device=device)
    c, f, i = cost.data_ptr(), field.data_ptr(), index.data_ptr()

    def call(cost=c, field=f, coupling=0.5, index=i, n=1, d=3, h=4, w=5, radius=1):
        return module.coupled_argmin_forward(False, cost, field, coupling, index, n, d, h, w, radius, False, 0)

    assert call() == ""
    assert "`radius` must be in [0, 32], got 33" in call(radius=33)
    assert "`radius` must be in [0, 32], got -1" in call(radius=-1)
    assert "sizes must be >= 1" in call(d=0)
    assert "sizes must be >= 1" in call(n=-2)
    assert "sizes must be >= 1" in call(n=2**40, d=2**20)  # the cost volume's size overflows int64
    assert "sizes must be >= 1" in call(n=2**62, d=1, h=1, w=1, radius=0)  # only the field's size overflows
    assert "`coupling` must be finite and >= 0" in call(coupling=-0.5)
    assert "`coupling` must be finite and >= 0" in call(coupling=float("nan"))
    assert "`coupling` must be finite and >= 0" in call(coupling=float("inf"))
    for pointers in ({"cost": 0}, {"field": 0}, {"index": 0}):
        assert "must be device pointers" in call(**pointers)
    assert (index >= 0).all() and (index < 27).all()  # the valid call wrote every point


GPU_CORE_CASES = [((2, 17, 20, 23), 2)]  # many blocks

cuda_core = cuda_core_fixture("coupled_argmin.cu", ("coupled_argmin_forward",), "_coupled_argmin_emulated")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_core_matches_reference(cuda_core, dtype, gen):
    module, device = cuda_core
    for points, radius in CORE_CASES + (GPU_CORE_CASES if device == "cuda" else []):
        _check_core(module, device, points, radius, dtype, gen)
    _check_core(module, device, (2, 5, 6, 7), 1, dtype, gen, special=True)


def test_cuda_core_largest_radius(cuda_core, gen):
    # r = 32: the displacement loops' bounds at their limit (K = 274625); not mirrored, where the reference
    # would loop over every displacement in Python.
    module, device = cuda_core
    cost, field = _inputs((1, 1, 2, 3), 32, torch.float32, gen, field_scale=20.0)
    cost_d, field_d = cost.to(device), field.to(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device == "cuda" else 0
    index = torch.full((1, 1, 2, 3), -1, dtype=torch.int64, device=device)
    for coupling in (0.0, 0.01):
        assert module.coupled_argmin_forward(False, cost_d.data_ptr(), field_d.data_ptr(), coupling, index.data_ptr(),
                                             1, 1, 2, 3, 32, False, stream) == ""
        assert torch.equal(index.cpu(), reference.coupled_argmin(cost, field, coupling))


def test_cuda_core_ties_go_to_the_displacement_nearest_the_field(cuda_core):
    module, device = cuda_core
    cost = torch.full((1, 27, 3, 4, 5), 0.75, dtype=torch.float64, device=device)
    zero = torch.zeros((1, 3, 3, 4, 5), dtype=torch.float64, device=device)
    index = torch.full((1, 3, 4, 5), -1, dtype=torch.int64, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device == "cuda" else 0
    for mirrored in (False, True):
        for coupling, expected in ((0.0, 13), (0.5, 13)):
            assert module.coupled_argmin_forward(True, cost.data_ptr(), zero.data_ptr(), coupling, index.data_ptr(),
                                                 1, 3, 4, 5, 1, mirrored, stream) == ""
            assert (index == expected).all()


def test_cuda_core_bad_arguments(cuda_core):
    _check_core_bad_arguments(*cuda_core)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("points, radius", CASES)
def test_gpu_matches_reference(backend, points, radius, dtype, gen):
    _check_op("cuda", backend, points, radius, dtype, dtype == torch.float64, gen)


@pytest.mark.gpu
@requires_cuda
def test_triton_compiled_on_cuda():
    pytest.importorskip("triton")
    triton_checks("cuda")


# ---------------------------------------------------------------- through the op (Triton interpreter, or a GPU)


def _check_op(device, backend, points, radius, dtype, noncontiguous, gen, couplings=COUPLINGS):
    """The op on `device` with `backend` against the reference computed on the CPU (whose rounding the
    CPU tests pin down), for both searches and every coupling."""
    cost, field = _inputs(points, radius, dtype, gen, noncontiguous)
    for mirrored in (False, True):
        for coupling in couplings:
            index = gradreg_fast.coupled_argmin(cost.to(device), field.to(device), coupling, mirrored,
                                                backend=backend)
            expected = reference.coupled_argmin(cost, field, coupling, mirrored)
            assert index.dtype == torch.int64 and index.shape == points and index.device.type == device
            got = index.cpu()
            assert torch.equal(got, expected), (backend, points, radius, mirrored, coupling,
                                                (got != expected).sum().item())


# (points, radius, dtype): the interpreter is slow, so tiny volumes and one dtype per case (float64 cases
# non-contiguous).
TRITON_CASES = [((2, 3, 4, 5), 1, torch.float64), ((1, 1, 3, 1), 2, torch.float32), ((3, 2, 1, 4), 0, torch.float32),
                ((1, 3, 2, 5), 2, torch.float64), ((2, 1, 1, 1), 1, torch.float32)]


def triton_checks(device):
    """Run in a subprocess on the CPU (see the module docstring), or in the pytest process on a GPU; raises
    on the first mismatch."""
    gen = torch.Generator().manual_seed(20261130)
    for points, radius, dtype in TRITON_CASES:
        _check_op(device, "triton", points, radius, dtype, dtype == torch.float64, gen)
    cost, field = _inputs((2, 3, 4, 5), 1, torch.float64, gen)
    cost, field = _with_special_values(cost, field, gen)
    for mirrored in (False, True):
        index = gradreg_fast.coupled_argmin(cost.to(device), field.to(device), 0.3, mirrored, backend="triton")
        assert torch.equal(index.cpu(), reference.coupled_argmin(cost, field, 0.3, mirrored))
    flat = torch.full((1, 27, 3, 4, 5), 0.75, dtype=torch.float64, device=device)
    zero = torch.zeros((1, 3, 3, 4, 5), dtype=torch.float64, device=device)
    for mirrored in (False, True):
        assert (gradreg_fast.coupled_argmin(flat, zero, 0.0, mirrored, backend="triton") == 13).all()
        assert (gradreg_fast.coupled_argmin(flat, zero, 0.5, mirrored, backend="triton") == 13).all()
    half_cost, half_field = (t.to(torch.float16) for t in _inputs((1, 2, 3, 4), 1, torch.float32, gen))
    index = gradreg_fast.coupled_argmin(half_cost.to(device), half_field.to(device), 0.2, backend="triton")
    assert torch.equal(index.cpu(), reference.coupled_argmin(half_cost.float(), half_field.float(), 0.2))
    # A float64 coupling reaches the kernel unrounded: with c = 1 + 2^-40, displacement 13 (d = 0, cost c)
    # ties with displacement 14 (|d - u|^2 = 1, cost 0) and wins as the nearer one; a coupling rounded to
    # float32 (1.0) would make 14 cheaper.
    coupling = 1.0 + 2.0 ** -40
    cost = torch.full((1, 27, 1, 1, 1), 100.0, dtype=torch.float64)
    cost[0, 13], cost[0, 14] = coupling, 0.0
    field = torch.zeros((1, 3, 1, 1, 1), dtype=torch.float64)
    index = gradreg_fast.coupled_argmin(cost.to(device), field.to(device), coupling, backend="triton")
    assert index.item() == reference.coupled_argmin(cost, field, coupling).item() == 13


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_on_cpu():
    run_under_triton_interpreter(__file__, "cpu")


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: no OpenMP team per small torch op
    triton_checks(sys.argv[1])
