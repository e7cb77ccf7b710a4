"""The synthetic multimodal pair generator and the two Datasets."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader

from gradreg_fast import warp
from gradreg_fast.data import NiftiPairs, SyntheticPairs, make_pair
from gradreg_fast.data.synthetic import item_seed
from gradreg_fast.losses import flow_smoothness
from gradreg_fast.train.evaluation import mean_dice


def _dice(moving_labels, fixed_labels, flow=None):
    moving_labels = moving_labels[None]
    if flow is not None:
        moving_labels = warp(moving_labels.double(), flow[None].double(), mode="nearest").round().long()
    return mean_dice(moving_labels, fixed_labels[None]).item()


@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 20, 17), (24, 1, 19)])
def test_pair_contents(shape):
    pair = make_pair(7, shape)
    assert set(pair) == {"fixed", "moving", "fixed_labels", "moving_labels", "displacement"}
    for key in ("fixed", "moving"):
        assert pair[key].shape == (1, *shape) and pair[key].dtype == torch.float32
        assert pair[key].min() >= 0 and pair[key].max() <= 1 and pair[key].std() > 0.05
    for key in ("fixed_labels", "moving_labels"):
        assert pair[key].shape == (1, *shape) and pair[key].dtype == torch.int64
        assert pair[key].min() == 0 and pair[key].max() <= 6
    assert pair["displacement"].shape == (3, *shape) and pair["displacement"].dtype == torch.float32
    # Along an axis of size 1 nothing moves.
    for axis, size in enumerate(shape):
        if size == 1:
            assert pair["displacement"][axis].abs().max() == 0


def test_pair_is_deterministic_and_seeded():
    a, b, c = make_pair(3, (20, 24, 16)), make_pair(3, (20, 24, 16)), make_pair(4, (20, 24, 16))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["fixed"], c["fixed"]) and not torch.equal(a["displacement"], c["displacement"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ground_truth_displacement_registers_the_labels(seed):
    pair = make_pair(seed, (48, 40, 36))
    before = _dice(pair["moving_labels"], pair["fixed_labels"])
    after = _dice(pair["moving_labels"], pair["fixed_labels"], pair["displacement"])
    assert after > 0.97, after
    assert after - before > 0.05, (before, after)
    # A real deformation: several voxels somewhere, and every organ label present on both sides.
    assert pair["displacement"].abs().max() > 2
    assert set(pair["fixed_labels"].unique().tolist()) == set(range(7))


def test_displacement_scales_with_the_setting():
    small = make_pair(5, (32, 32, 32), displacement=0.05)["displacement"].abs().max()
    large = make_pair(5, (32, 32, 32), displacement=0.15)["displacement"].abs().max()
    assert 2.5 < large / small < 3.5  # the velocity scales linearly; exp(v) nearly so
    # Fewer control points: a smoother, more global deformation.
    smooth = make_pair(5, (32, 32, 32), control_points=2)["displacement"][None]
    local = make_pair(5, (32, 32, 32), control_points=10)["displacement"][None]
    assert flow_smoothness(smooth) < 0.5 * flow_smoothness(local)
    still = make_pair(5, (32, 32, 32), displacement=0.0)
    assert still["displacement"].abs().max() == 0
    assert torch.equal(still["moving_labels"], still["fixed_labels"])


def _label_means(image, labels):
    return torch.stack([image[labels == k].mean() for k in range(1, int(labels.max()) + 1)])


def test_intensity_mapping_is_not_monotonic_and_alike_across_pairs():
    orders = []
    for seed in range(3):
        pair = make_pair(seed, (32, 32, 32), noise=0.0, blur=0.0, bias=0.0)
        ct = _label_means(pair["moving"], pair["moving_labels"])
        mr = _label_means(pair["fixed"], pair["fixed_labels"])
        order_ct, order_mr = ct.argsort(), mr.argsort()
        assert not torch.equal(order_ct, order_mr) and not torch.equal(order_ct, order_mr.flip(0))
        # Distinct levels: every pair of labels differs by a visible contrast in each modality.
        for levels in (ct, mr):
            assert levels.sort().values.diff().min() > 0.03, levels
        orders.append((order_ct, order_mr))
    # A tissue keeps its place in each modality's order from pair to pair (levels only jitter).
    for order_ct, order_mr in orders[1:]:
        assert torch.equal(order_ct, orders[0][0]) and torch.equal(order_mr, orders[0][1])


def test_noise_bias_and_blur_are_applied_where_documented():
    clean = make_pair(9, (24, 24, 24), noise=0.0, blur=0.0, bias=0.0)
    biased = make_pair(9, (24, 24, 24), noise=0.0, blur=0.0, bias=0.5)
    # The bias field is MR-only: the fixed (MR) side changes, the moving (CT) side does not.
    assert torch.equal(clean["moving"], biased["moving"])
    assert not torch.equal(clean["fixed"], biased["fixed"])
    noisy = make_pair(9, (24, 24, 24), noise=0.05, blur=0.0, bias=0.0)
    background = clean["fixed_labels"] == 0
    assert clean["fixed"][background].abs().max() == 0
    assert noisy["fixed"][background].std() > 0.01 and noisy["moving"][background].std() > 0.01
    blurred = make_pair(9, (24, 24, 24), noise=0.0, blur=1.0, bias=0.0)
    # Partial volume: the steepest step between neighbours (an organ edge) gets spread out.
    assert blurred["moving"].diff(dim=1).abs().max() < 0.7 * clean["moving"].diff(dim=1).abs().max()


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": (32, 32)}, "`shape` must be 3 positive ints"),
    ({"shape": (32, 0, 32)}, "`shape` must be 3 positive ints"),
    ({"num_organs": 1}, "`num_organs` must be an int in"),
    ({"displacement": 0.6}, "`displacement` must be a fraction"),
    ({"control_points": 1}, "`control_points` must be an int >= 2"),
    ({"noise": -1.0}, "`noise` must be a finite number >= 0"),
    ({"blur": float("inf")}, "`blur` must be a finite number >= 0"),
    ({"seed": -1}, "`seed` must be an int >= 0"),
])
def test_bad_generator_arguments(kwargs, message):
    args = {"seed": 0, "shape": (16, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_pair(**args)


def test_synthetic_dataset():
    data = SyntheticPairs(5, (16, 20, 12), seed=11, displacement=0.1)
    assert len(data) == 5
    item = data[2]
    expected = make_pair(item_seed(11, 2), (16, 20, 12), displacement=0.1)
    for key in expected:
        assert torch.equal(item[key], expected[key])
    assert torch.equal(data[-1]["fixed"], data[4]["fixed"])
    with pytest.raises(IndexError):
        data[5]
    # Another seed: other pairs (held-out validation sets are drawn this way).
    other = SyntheticPairs(5, (16, 20, 12), seed=12, displacement=0.1)
    assert all(not torch.equal(data[i]["fixed"], other[j]["fixed"]) for i in range(2) for j in range(2))
    batch = next(iter(DataLoader(data, batch_size=2)))
    assert batch["moving"].shape == (2, 1, 16, 20, 12) and batch["displacement"].shape == (2, 3, 16, 20, 12)


def test_synthetic_dataset_checks_arguments_up_front():
    with pytest.raises(ValueError, match="`length` must be a positive int"):
        SyntheticPairs(0)
    with pytest.raises(ValueError, match="`displacement` must be a fraction"):
        SyntheticPairs(4, displacement=2.0)
    with pytest.raises(TypeError, match="unknown generator argument"):
        SyntheticPairs(4, noize=0.1)


# -- NIfTI folders ------------------------------------------------------------------------------------


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def fake_io(monkeypatch):
    """Stands in for gradreg_fast.io: records the calls, returns tensors as the contract says."""
    calls = []

    def load_pair(fixed_path, moving_path, fixed_labels=None, moving_labels=None):
        calls.append((fixed_path, moving_path, fixed_labels, moving_labels))
        image = torch.full((1, 4, 5, 6), 0.5)
        labels = torch.ones((1, 4, 5, 6), dtype=torch.int64)
        return {"fixed": image, "moving": image.clone(), "fixed_labels": labels if fixed_labels else None,
                "moving_labels": labels.clone() if moving_labels else None}

    monkeypatch.setitem(sys.modules, "gradreg_fast.io", types.SimpleNamespace(load_pair=load_pair))
    return calls


def test_nifti_pairs_finds_cases(tmp_path, fake_io):
    for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
        _touch(tmp_path / "case_b" / f"{role}.nii.gz")
    _touch(tmp_path / "case_a" / "fixed.nii")
    _touch(tmp_path / "case_a" / "moving.nii.gz")
    _touch(tmp_path / ".cache" / "junk.txt")
    data = NiftiPairs(tmp_path)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first["case"] == "case_a" and "fixed_labels" not in first and first["fixed"].shape == (1, 4, 5, 6)
    assert second["case"] == "case_b" and second["moving_labels"].dtype == torch.int64
    assert fake_io[0] == (tmp_path / "case_a" / "fixed.nii", tmp_path / "case_a" / "moving.nii.gz", None, None)
    assert fake_io[1][2:] == (tmp_path / "case_b" / "fixed_labels.nii.gz",
                              tmp_path / "case_b" / "moving_labels.nii.gz")
    with pytest.raises(FileNotFoundError, match="case_a.*fixed_labels.nii"):
        NiftiPairs(tmp_path, require_labels=True)


def test_nifti_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        NiftiPairs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no case folders"):
        NiftiPairs(tmp_path)
    _touch(tmp_path / "case" / "fixed.nii.gz")
    with pytest.raises(FileNotFoundError, match="has no moving.nii"):
        NiftiPairs(tmp_path)


def test_nifti_pairs_with_the_real_loader(tmp_path):
    io = pytest.importorskip("gradreg_fast.io", reason="gradreg_fast/io.py (the NIfTI loader) is not written yet")
    nib = pytest.importorskip("nibabel")
    import numpy as np

    rng = np.random.default_rng(0)
    for role in ("fixed", "moving"):
        image = nib.Nifti1Image(rng.random((10, 12, 8)).astype(np.float32), np.eye(4))
        case = tmp_path / "case"
        case.mkdir(exist_ok=True)
        nib.save(image, case / f"{role}.nii.gz")
    item = NiftiPairs(tmp_path)[0]
    assert callable(io.load_pair)
    assert item["fixed"].dtype == torch.float32 and item["fixed"].shape == item["moving"].shape
    assert item["fixed"].min() >= 0 and item["fixed"].max() <= 1


def test_nifti_pairs_check_finds_bad_cases_before_any_is_drawn(tmp_path):
    nib = pytest.importorskip("nibabel")
    import numpy as np
    from test_cli import write_case

    from gradreg_fast.io import Grid

    write_case(tmp_path / "a")
    write_case(tmp_path / "b", shift_mm=(3.0, 0.0, 0.0))
    data = NiftiPairs(tmp_path)
    data.check(batch_size=2)
    fixed = nib.load(str(tmp_path / "a" / "fixed.nii.gz"))
    assert tuple(data[0]["fixed"].shape[1:]) == Grid(fixed.shape, fixed.affine).fit(16).grid.shape  # load_pair's
    # another size: fine one pair at a time, refused for batches, naming the cases
    small = write_case(tmp_path / "c")
    for role in ("fixed", "fixed_labels"):
        image = nib.load(str(small[role]))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:10], image.affine), str(small[role]))
    NiftiPairs(tmp_path).check(batch_size=1)
    with pytest.raises(ValueError, match="one working-grid size") as refused:
        NiftiPairs(tmp_path).check(batch_size=2)
    assert "a (32, 32, 16)" in str(refused.value) and "c (16, 32, 16)" in str(refused.value)
    # labels off their image's grid
    labels = nib.load(str(small["moving_labels"]))
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj)[:-1], labels.affine), str(small["moving_labels"]))
    with pytest.raises(ValueError, match="case 'c': moving_labels do not lie on the moving image's grid"):
        NiftiPairs(tmp_path).check()
    # a file that is not NIfTI
    small["moving_labels"].write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(ValueError, match="case 'c': .*moving_labels.nii.gz is not a readable NIfTI"):
        NiftiPairs(tmp_path).check()
