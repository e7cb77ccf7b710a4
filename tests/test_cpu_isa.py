"""The CPU core's two kernel copies (baseline x86-64 and AVX2+FMA, chosen at import): both equal the
references, on sizes that cross the kernels' internal block boundaries, and the AVX2 copy cannot leak
into baseline callers through a shared linker symbol."""

import importlib
import platform
import re
import shutil
import subprocess

import pytest
import torch
from conftest import make_volume, value_and_grads

import gradreg_fast
from gradreg_fast import reference

core = importlib.import_module("gradreg_fast._C")
ISAS = core.available_isas()

# DHW = 1287 (2 blocks of 512 voxels + a remainder in the descriptor backward); W = 600 > 512 (rows
# summed in chunks of 512); one axis of size 1.
SHAPES = [(1, 1, 9, 11, 13), (2, 1, 3, 2, 600), (1, 1, 1, 40, 37)]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = core.cpu_isa()
    core.set_cpu_isa(request.param)
    yield request.param
    core.set_cpu_isa(previous)


def test_the_isa_in_use_is_one_this_cpu_runs():
    assert "baseline" in ISAS
    assert core.cpu_isa() in ISAS


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="`isa` must be one of"):
        core.set_cpu_isa("avx9000")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["ssc", "mind"])
def test_descriptor_forward_and_backward(isa, shape, kind, gen):
    vol = make_volume(shape, torch.float32, generator=gen)
    fused_fn, ref_fn = (gradreg_fast.mind_ssc, reference.mind_ssc) if kind == "ssc" else (gradreg_fast.mind,
                                                                                         reference.mind)
    weights = torch.rand((shape[0], 12 if kind == "ssc" else 6, *shape[2:]), generator=gen)
    out, (grad,) = value_and_grads(lambda v: (fused_fn(v, backend="cpu") * weights).sum(), [vol])
    ref_out, (ref_grad,) = value_and_grads(lambda v: (ref_fn(v) * weights).sum(), [vol.double()])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-4 * ref_grad.abs().max().item())


@pytest.mark.parametrize("radius", [5, 6])
def test_long_box_windows(isa, radius, gen):
    # 2r+1 = 11 or 13 rows per window: the generic row sum, and (r = 6) more rows than one call takes
    # where the backward's edge windows pile up.
    vol = make_volume((1, 1, 9, 11, 15), torch.float64, generator=gen)
    weights = torch.rand((1, 12, 9, 11, 15), generator=gen, dtype=torch.float64)
    out, (grad,) = value_and_grads(lambda v: (gradreg_fast.mind_ssc(v, radius, 1, backend="cpu") * weights).sum(),
                                   [vol])
    ref_out, (ref_grad,) = value_and_grads(lambda v: (reference.mind_ssc(v, radius, 1) * weights).sum(), [vol])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10 * ref_grad.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_fused_loss(isa, shape, penalty, gen):
    warped, fixed = make_volume(shape, torch.float64, generator=gen), make_volume(shape, torch.float64, generator=gen)
    loss, (grad,) = value_and_grads(lambda w: gradreg_fast.mind_loss(w, fixed, penalty=penalty, backend="cpu"),
                                    [warped])
    ref_loss, (ref_grad,) = value_and_grads(lambda w: reference.mind_loss(w, fixed, penalty=penalty), [warped])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9 * ref_grad.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_magnitude_and_warp(isa, shape, gen):
    vol = make_volume(shape, torch.float32, generator=gen)
    flow = make_volume((shape[0], 3, *shape[2:]), torch.float32, generator=gen, scale=2.0)
    out, grads = value_and_grads(lambda v, f: (gradreg_fast.warp(gradreg_fast.gradient_magnitude(v, backend="cpu"),
                                                                 f, backend="cpu") ** 2).sum(), [vol, flow])
    ref_out, ref_grads = value_and_grads(lambda v, f: (reference.warp(reference.gradient_magnitude(v), f) ** 2).sum(),
                                         [vol.double(), flow.double()])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-4 * r.abs().max().item())


def test_label_surface_distances(isa):
    """The box distance transforms of metrics.label_metrics against the whole-volume transform."""
    import numpy as np
    from test_metrics import assert_same_table, random_atlas, whole_volume_table

    from gradreg_fast import metrics

    rng = np.random.default_rng(21)
    a, b = random_atlas((19, 23, 17), [1, 2, 3, 4], rng), random_atlas((19, 23, 17), [1, 2, 3, 4], rng)
    spacing = (1.1, 0.6, 2.3)
    assert_same_table(metrics.label_metrics(a, b, spacing), whole_volume_table(a, b, spacing, [1, 2, 3, 4]))


def test_jacobian_determinant(isa):
    import numpy as np

    from gradreg_fast import metrics

    flow = np.random.default_rng(3).normal(0.0, 0.4, (3, 11, 2, 600))
    assert np.array_equal(metrics.jacobian_determinant(flow), metrics._jacobian_determinant_numpy(flow))


def test_the_two_copies_agree(gen):
    if len(ISAS) < 2:
        pytest.skip(f"this CPU runs only {ISAS}")
    vol = make_volume((1, 1, 17, 19, 23), torch.float32, generator=gen)
    previous, results = core.cpu_isa(), []
    try:
        for name in ISAS:
            core.set_cpu_isa(name)
            results.append(gradreg_fast.mind_ssc(vol, backend="cpu"))
    finally:
        core.set_cpu_isa(previous)
    # Not bitwise: FMA contraction and the vector width change the rounding.
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2 copy exists on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_no_vex_instruction_outside_the_avx2_namespace():
    # A function of the AVX2 copy that kept a shared (weak) symbol could be picked by the linker for
    # the baseline copy too, and crash a CPU without AVX. Every function not in gradreg_avx2 must
    # therefore be free of VEX-encoded instructions (AVX, AVX2, FMA: mnemonics starting with 'v').
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", core.__file__], capture_output=True,
                             text=True, check=True).stdout
    offenders, function = set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        if function and "gradreg_avx2" not in function and re.match(r"^\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):
            offenders.add(function)
    # pybind11 and libstdc++ code is compiled for the baseline too, so the set must be empty.
    assert not offenders, f"VEX instructions outside gradreg_avx2 in: {sorted(offenders)[:10]}"
