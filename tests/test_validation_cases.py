"""The validation set of benchmarks/validation.py: its known answer must be right, or every figure built on it
(endpoint errors, the choice of the engine defaults) would be wrong."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def validation():
    spec = importlib.util.spec_from_file_location("gradreg_validation", ROOT / "benchmarks" / "validation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base", ["mr", "ct"])
def test_the_truth_carries_the_moving_labels_onto_the_fixed_ones(validation, base, tmp_path):
    from gradreg_fast.io import read_nifti

    spec = validation.CaseSpec(f"t-{base}", base, seed=5, amplitude_mm=12.0, smoothness_mm=18.0)
    files = validation.make_case(spec, tmp_path)
    fixed_labels = read_nifti(files["fixed_labels"], "fixed labels")
    moving_labels = read_nifti(files["moving_labels"], "moving labels")
    truth = np.load(files["truth"])["displacement_mm"]
    shape = fixed_labels.data.shape
    points = np.einsum("ij,j...->i...", fixed_labels.affine[:3, :3], np.indices(shape, dtype=float)) \
        + fixed_labels.affine[:3, 3].reshape(3, 1, 1, 1)
    to_voxels = np.linalg.inv(moving_labels.affine)
    target = points + np.moveaxis(truth, -1, 0)
    voxels = np.einsum("ij,j...->i...", to_voxels[:3, :3], target) + to_voxels[:3, 3].reshape(3, 1, 1, 1)
    carried = ndimage.map_coordinates(np.asarray(moving_labels.data), voxels, order=0)
    identity = ndimage.map_coordinates(np.asarray(moving_labels.data), np.einsum(
        "ij,j...->i...", to_voxels[:3, :3], points) + to_voxels[:3, 3].reshape(3, 1, 1, 1), order=0)
    for organ in validation.ORGANS:
        a = fixed_labels.data == organ
        dice = lambda b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
        assert dice(carried == organ) > 0.9, organ  # nearest neighbour twice: not exactly 1
        assert dice(identity == organ) < dice(carried == organ) - 0.02, organ  # the deformation is not trivial
    # the amplitude is the spec's (plus the rigid offset's motion), and the map does not fold
    assert 0.7 * spec.amplitude_mm <= float(np.load(files["truth"])["max_mm"]) <= spec.amplitude_mm + 1e-6


def test_the_second_contrast_is_not_a_monotonic_remap(validation, tmp_path):
    from gradreg_fast.io import read_nifti

    files = validation.make_case(validation.CaseSpec("t-mono", "mr", 7, 10.0, 18.0), tmp_path)
    base = read_nifti(validation.data_dir() / "mr.nii.gz", "base").data.astype(float)
    moving = read_nifti(files["moving"], "moving").data.astype(float)  # the remapped MR, undeformed
    tissue = base > np.percentile(base, 30)
    order = np.argsort(base[tissue])
    smoothed = ndimage.uniform_filter1d(moving[tissue][order], 501)
    steps = np.diff(smoothed[::500])
    assert (steps > 5).any() and (steps < -5).any()  # rises and falls along the base intensity


def test_the_third_subjects_ct_and_labels_share_one_grid_and_hold_spleen_and_liver(validation):
    """benchmarks/data/ts_dicom_ct: the converted DICOM CT must sit where its labels are (the conversion flips
    an axis; a wrong flip would leave organs outside the body) and hold the two organs the cases score."""
    from gradreg_fast.io import read_nifti

    scan_path, labels_path = validation.subject_scan("ct-c")
    scan, labels = read_nifti(scan_path, "third CT"), read_nifti(labels_path, "third CT labels")
    assert scan.data.shape == labels.data.shape == (170, 170, 20)
    np.testing.assert_allclose(scan.affine, labels.affine)
    hu, ids = np.asarray(scan.data, dtype=float), np.asarray(labels.data)
    for organ in (1, 5):  # spleen, liver: soft tissue (contrast-enhanced), inside the body
        assert (ids == organ).sum() > 1000, organ
        assert 20 < np.median(hu[ids == organ]) < 200, organ
    assert (hu[ids > 0] > -300).mean() > 0.95
    assert (hu[ids == 0] > -300).mean() < 0.5  # the air around the body is unlabelled


def _is_remapped(base: np.ndarray, remapped: np.ndarray, low: float, high: float, step: float) -> bool:
    """The median remapped value per bin of the base scan's values (``low``..``high``) rises somewhere and falls
    elsewhere by more than ``step``: no monotonic map relates the two contrasts."""
    edges = np.linspace(low, high, 38)
    which = np.digitize(base, edges)
    medians = [np.median(remapped[which == b]) for b in range(1, len(edges)) if (which == b).sum() >= 50]
    steps = np.diff(medians)
    return bool((steps > step).any() and (steps < -step).any())


def test_inter_subject_cases_pair_different_people_and_score_shared_organs(validation, tmp_path):
    from gradreg_fast.io import read_nifti

    names = [spec.name for spec in validation.INTER_SUBJECT]
    assert len(set(names)) == len(names) >= 12
    assert "bundled" not in validation.CHOOSING
    assert set(names) <= set(validation.CHOOSING)
    assert len({spec.seed for spec in validation.INTER_SUBJECT}) == len(names)
    for spec in validation.INTER_SUBJECT:
        assert spec.moving_subject != spec.fixed_subject
        assert {spec.moving_subject, spec.fixed_subject} != {"ct-a", "mr-b"}  # never the reported bundled pair
        files = validation.make_inter_case(spec, tmp_path)
        assert files["organs"] == {1: "spleen", 5: "liver"}  # the third subject's slab holds only these two
        moving = read_nifti(files["moving"], "moving")
        moving_labels = read_nifti(files["moving_labels"], "moving labels")
        fixed = read_nifti(files["fixed"], "fixed")
        fixed_labels = read_nifti(files["fixed_labels"], "fixed labels")
        assert fixed.data.shape == fixed_labels.data.shape and moving.data.shape == moving_labels.data.shape
        np.testing.assert_allclose(fixed.affine, fixed_labels.affine)
        np.testing.assert_allclose(moving.affine, moving_labels.affine)
        assert np.asarray(moving.data).min() < -500  # the moving scan is a CT in HU, or CT-like
        base_moving, base_moving_labels = validation.subject_scan(spec.moving_subject)
        base_affine = read_nifti(base_moving, "base").affine
        np.testing.assert_array_equal(moving_labels.data, read_nifti(base_moving_labels, "base labels").data)
        if spec.offset:  # a rigid offset in the header: a rotation of at most 4 degrees per axis about the scan's
            # centre, which then moves by at most 8 mm per axis
            relative = moving.affine @ np.linalg.inv(base_affine)
            rotation = relative[:3, :3]
            np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)
            assert 0 < np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))) < 4 * np.sqrt(3)
            centre = base_affine[:3, :3] @ ((np.asarray(moving.data.shape) - 1) / 2) + base_affine[:3, 3]
            assert 0 < np.linalg.norm(rotation @ centre + relative[:3, 3] - centre) <= 8 * np.sqrt(3)
        else:
            np.testing.assert_allclose(moving.affine, base_affine)
        if spec.moving_subject.startswith("mr"):  # CT-like: air at -1000, a non-monotonic remap of the tissue
            base = np.asarray(read_nifti(base_moving, "base").data, dtype=float)
            remapped = np.asarray(moving.data, dtype=float)
            assert np.median(remapped[base <= np.percentile(base, 5)]) < -900
            assert _is_remapped(base, remapped, np.percentile(base, 30), np.percentile(base, 99), 10)
        else:
            np.testing.assert_array_equal(moving.data, read_nifti(base_moving, "base").data)
        if spec.fixed_subject.startswith("ct"):
            # MR-like: air at 0, non-negative, and no monotonic map from the CT's values
            base = np.asarray(read_nifti(validation.subject_scan(spec.fixed_subject)[0], "base").data, dtype=float)
            remapped = np.asarray(fixed.data, dtype=float)
            assert remapped.min() >= 0 and np.median(remapped[base <= -500]) < 20
            assert _is_remapped(base, remapped, -480, 1000, 10)
        else:
            assert files["fixed"] == validation.subject_scan(spec.fixed_subject)[0]  # an MR is used as it is
        # written once: a second call returns the same files without rewriting them, and no partial file is left
        keys = ("fixed", "moving", "moving_labels")
        written = [Path(files[k]) for k in keys if Path(files[k]).is_relative_to(tmp_path)]
        stamps = [p.stat().st_mtime_ns for p in written]
        again = validation.make_inter_case(spec, tmp_path)
        assert [again[k] for k in keys] == [files[k] for k in keys]
        assert [p.stat().st_mtime_ns for p in written] == stamps
        if written:
            assert sorted(p.name for p in written[0].parent.iterdir()) == sorted([p.name for p in written]
                                                                                 + ["spec.json"])


@pytest.mark.parametrize("kind", ["inter", "same"])
def test_case_files_are_written_again_when_the_recipe_or_a_file_changes(validation, tmp_path, monkeypatch, kind):
    """benchmarks/.cases outlives the code: files made by another recipe or spec, or a case with a file missing,
    are written again, never reused."""
    import dataclasses

    import nibabel as nib

    if kind == "inter":
        spec = next(s for s in validation.INTER_SUBJECT if s.name == "inter-bc-2")
        make, key = validation.make_inter_case, "moving"
    else:
        spec = validation.CaseSpec("t-stamp", "mr", 3, 10.0, 18.0)
        make, key = validation.make_case, "fixed"
    files = make(spec, tmp_path)
    first = Path(files[key]).stat().st_mtime_ns
    assert Path(make(spec, tmp_path)[key]).stat().st_mtime_ns == first  # reused
    monkeypatch.setattr(validation, "RECIPE", validation.RECIPE + 1)
    second = Path(make(spec, tmp_path)[key]).stat().st_mtime_ns
    assert second != first  # another recipe: written again
    Path(files[key]).unlink()
    assert Path(make(spec, tmp_path)[key]).exists()  # a missing file: written again
    before = np.asarray(nib.load(str(files[key])).dataobj)
    make(dataclasses.replace(spec, seed=spec.seed + 1), tmp_path)
    assert not np.array_equal(np.asarray(nib.load(str(files[key])).dataobj), before)  # another spec: written again


def test_choosing_mean_weighs_the_groups_two_to_one(validation):
    same = {name: 0.9 for name in validation.SAME_NAMES}
    inter = {name: 0.6 for name in validation.INTER_NAMES}
    assert validation.choosing_mean({**same, **inter}) == pytest.approx((2 * 0.9 + 0.6) / 3)
    # sweep 10's nine cases: the plain mean
    nine = {**{n: 0.9 + 0.01 * i for i, n in enumerate(sorted(validation.SAME_NAMES))},
            "inter-cb": 0.4, "inter-ca": 0.6, "inter-ac": 0.8}
    assert validation.choosing_mean(nine) == pytest.approx(np.mean(list(nine.values())))
    assert validation.choosing_mean({"inter-cb": 0.4, "inter-ca": 0.6}) == pytest.approx(0.5)
    for bad in ({}, {"bundled": 0.6}, {"inter-cb": 0.4, "mr-x0": 0.9}):  # the pair and extra cases choose nothing
        with pytest.raises(ValueError, match="choosing cases"):
            validation.choosing_mean(bad)


def test_the_pairs_other_starts_are_the_bundled_pair_offset_and_never_choose(validation, tmp_path):
    from gradreg_fast.io import read_nifti

    names = [spec.name for spec in validation.PAIR_STARTS]
    assert len(set(names)) == len(names) >= 10
    assert not set(names) & set(validation.CHOOSING) and not set(names) & validation.INTER_NAMES
    seeds = {spec.seed for spec in validation.PAIR_STARTS}
    assert len(seeds) == len(names) and not seeds & {spec.seed for spec in validation.INTER_SUBJECT}
    bundled = validation.bundled_files()
    for spec in validation.PAIR_STARTS[:2]:
        assert (spec.moving_subject, spec.fixed_subject, spec.offset) == ("ct-a", "mr-b", True)
        files = validation.make_inter_case(spec, tmp_path)
        assert files["fixed"] == bundled["fixed"] and files["fixed_labels"] == bundled["fixed_labels"]
        assert files["organs"] == bundled["organs"]  # the pair shares all four organs
        moving, base = read_nifti(files["moving"], "moving"), read_nifti(bundled["moving"], "bundled CT")
        np.testing.assert_array_equal(moving.data, base.data)  # the same voxels, another header
        assert not np.allclose(moving.affine, base.affine)
    with pytest.raises(ValueError, match="unknown case"):
        validation.all_cases(["bundled-s0"])


def test_the_pairs_other_starts_come_only_when_named(validation, monkeypatch):
    made = lambda spec, out_dir=None: spec.name  # noqa: E731  (no files: only which cases are chosen)
    monkeypatch.setattr(validation, "make_case", made)
    monkeypatch.setattr(validation, "make_inter_case", made)
    default = validation.all_cases()
    assert set(default) == set(validation.CHOOSING) | {"bundled"}
    assert list(validation.all_cases(["bundled-s3", "inter-cb"])) == ["bundled-s3", "inter-cb"]


def test_pair_starts_summary_pairs_each_start(validation):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradreg_pair_starts", ROOT / "benchmarks" / "pair_starts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(5)
    row = lambda dice: {"dice": dice, "folding_percent": 0.0, "sd_log_jacobian": 0.3, "core_s": 1.0}  # noqa: E731
    ours, theirs = rng.uniform(0.55, 0.7, 4), rng.uniform(0.55, 0.7, 4)
    rows = {"bundled": {"gradreg": row(0.6), "ConvexAdam (native grid)": row(0.7)}}
    rows.update({f"bundled-s{i}": {"gradreg": row(ours[i]), "ConvexAdam (native grid)": row(theirs[i])}
                 for i in range(4)})
    text = module.summary(rows)
    diff = ours - theirs
    assert f"Dice {ours.mean():.4f} (standard error {ours.std(ddof=1) / 2:.4f})" in text  # the starts only
    assert f"mean difference {diff.mean():+.4f} (standard error {diff.std(ddof=1) / 2:.4f}, 4 cases; " \
           f"{(diff > 0).sum()} up, {(diff < 0).sum()} down)" in text
    assert text.count("| bundled") == 2 * 5


def test_held_out_cases_share_no_seed_or_name_with_any_other_case_and_come_only_when_named(validation, monkeypatch):
    held = validation.HELD_OUT_SAME + validation.HELD_OUT_INTER
    others = validation.SAME_SUBJECT + validation.INTER_SUBJECT + validation.PAIR_STARTS + validation.extra_cases(12)
    assert len({spec.name for spec in held}) == len(held) == len(validation.HELD_OUT)
    assert not {spec.name for spec in held} & {spec.name for spec in others}
    assert not {spec.seed for spec in held} & {spec.seed for spec in others}
    assert not set(validation.HELD_OUT) & set(validation.CHOOSING)
    with pytest.raises(ValueError, match="choosing cases only"):
        validation.choosing_mean({"mr-h1": 0.9})
    made = lambda spec, out_dir=None: spec  # noqa: E731  (no files: only which cases are chosen)
    monkeypatch.setattr(validation, "make_case", made)
    monkeypatch.setattr(validation, "make_inter_case", made)
    assert not set(validation.all_cases()) & set(validation.HELD_OUT)
    chosen = validation.all_cases(validation.HELD_OUT)
    assert [spec.name for spec in chosen.values()] == list(validation.HELD_OUT)
    # each of the four inter-subject pairs twice, from another start
    pairs = [(spec.moving_subject, spec.fixed_subject) for spec in validation.HELD_OUT_INTER]
    assert all(pairs.count(pair) == 2 for pair in pairs) and all(s.offset for s in validation.HELD_OUT_INTER)


def _bench_peers():
    spec = importlib.util.spec_from_file_location("gradreg_bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_table_leaves_the_sdlogj_of_an_orientation_reversing_map_out(validation):
    module = _bench_peers()
    row = lambda dice, folding, sd: {"dice": dice, "folding_percent": folding, "sd_log_jacobian": sd,  # noqa: E731
                                     "core_s": 1.0, "wall_s": 2.0}
    inter = sorted(validation.INTER_NAMES)[:3]
    rows = {inter[0]: {"ANTs SyN": row(0.5, 99.99, 0.0), "gradreg": row(0.6, 0.0, 0.4)},
            inter[1]: {"ANTs SyN": row(0.7, 0.01, 0.3), "gradreg": row(0.6, 0.0, 0.5)},
            inter[2]: {"ANTs SyN": row(0.4, 0.2, 0.5), "gradreg": row(0.6, 0.0, 0.6)}}
    text = module.table(rows)
    line = next(l for l in text.splitlines() if l.startswith(f"| {inter[0]} | ANTs SyN"))
    assert "| reversed |" in line and "| 99.990 |" in line
    ants_mean = next(l for l in text.splitlines() if l.startswith("| mean of 3 inter-subject | ANTs SyN"))
    assert "| 0.400 (2) |" in ants_mean  # (0.3 + 0.5) / 2, not (0 + 0.3 + 0.5) / 3
    assert f"{np.mean([0.5, 0.7, 0.4]):.3f}" in ants_mean  # Dice keeps every case
    gradreg_mean = next(l for l in text.splitlines() if l.startswith("| mean of 3 inter-subject | gradreg"))
    assert "| 0.500 |" in gradreg_mean
    assert f"({inter[0]} (ANTs SyN))" in text


def test_an_inter_subject_case_without_a_shared_organ_is_refused(validation, tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "ORGANS", {2: "right kidney"})  # not in the third subject's slab
    spec = next(s for s in validation.INTER_SUBJECT if s.name == "inter-cb")
    with pytest.raises(ValueError, match="no organ"):
        validation.make_inter_case(spec, tmp_path)


def test_a_long_affine_run_between_two_people_keeps_its_volume_with_the_default_rigidity(validation, tmp_path):
    """inter-ca (a 40 mm CT slab to a 90 mm MR-like scan of another person): a free affine run for 40 + 40
    steps stretches the slab to fill the other field of view (det of about 0.3); the default rigidity holds it."""
    from gradreg_fast.register import Settings, register

    spec = next(s for s in validation.INTER_SUBJECT if s.name == "inter-ca")
    files = validation.make_inter_case(spec, tmp_path)
    dets = {}
    for rigidity in (0.0, Settings().affine_rigidity):
        settings = Settings(affine_iterations=(40, 40), affine_rigidity=rigidity)
        settings.field.iterations = (0,)
        result = register(files["fixed"], files["moving"], settings=settings, device="cpu", progress=False)
        dets[rigidity] = float(np.linalg.det(result.affine[:3, :3]))
    assert abs(dets[0.0] - 1) > 0.3, dets
    assert abs(dets[Settings().affine_rigidity] - 1) < 0.05, dets


@pytest.mark.parametrize("name", ["mr-b", "inter-cb"])
def test_the_engine_lowers_its_objective_and_raises_dice_on_validation_cases(validation, tmp_path, name):
    """Issue 11's convergence requirement on the project's own cases (a same-subject and an inter-subject one),
    with the defaults: every Adam level ends below where it started, and the deformable stage adds Dice."""
    from gradreg_fast.register import Settings, register

    specs = {spec.name: spec for spec in validation.SAME_SUBJECT + validation.INTER_SUBJECT}
    spec = specs[name]
    files = (validation.make_inter_case(spec, tmp_path) if isinstance(spec, validation.InterSpec)
             else validation.make_case(spec, tmp_path))
    result = register(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"], Settings(),
                      label_names=files.get("organs", validation.ORGANS), device="cpu", progress=False)
    objectives = result.metrics["deformable_objectives"]
    assert objectives and all(end < start for start, end in objectives), objectives
    stages = result.metrics["stages"]
    assert stages["after"]["mean_dice"] > stages["affine"]["mean_dice"] + 0.02, stages
    assert result.metrics["folding_percent"] < 0.1


def test_many_label_benchmark_times_and_scores_its_case(tmp_path, capsys):
    """benchmarks/bench_many_labels.py end to end at 12 labels: the case (Voronoi cells, the moving one shifted by
    whole voxels), one JSON line of timings and, with --accuracy, the stages' Dice and the peer's."""
    import json

    pytest.importorskip("convexAdam")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        script = ROOT / "benchmarks" / "bench_many_labels.py"
        spec = importlib.util.spec_from_file_location("gradreg_many_labels", script)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(["--labels", "12", "--out", str(tmp_path), "--accuracy"]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import nibabel as nib

    fixed = np.asarray(nib.load(str(tmp_path / "case" / "fixed_labels.nii.gz")).dataobj)
    moving = np.asarray(nib.load(str(tmp_path / "case" / "moving_labels.nii.gz")).dataobj)
    assert set(np.unique(fixed).tolist()) == set(range(13))
    np.testing.assert_array_equal(moving[2:, :-3, 1:], fixed[:-2, 3:, :-1])  # shifted by (2, -3, 1)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    timing, scores = lines
    assert timing["labels"] == 12 and 0 < timing["core_s"] < timing["total_s"]
    total, core, half = timing["total_s"], timing["core_s"], 5e-4  # each printed to 0.001
    assert (total - half) / (core + half) - half <= timing["total_over_core"] <= (total + half) / (core - half) + half
    assert set(scores["gradreg"]) >= {"before", "initial", "affine", "after"}
    for row in (scores["gradreg"], scores["gradreg_convex_only"], scores["convexadam_own_grid"]):
        assert 0 < row.get("after", row.get("dice")) <= 1 and row["folding_percent"] >= 0


PEER_PYTHONS = {"ANTs": os.environ.get("GRADREG_ANTS_PYTHON", "/tmp/ants-env/bin/python"),
                "elastix": os.environ.get("GRADREG_ELASTIX_PYTHON", "/tmp/elastix-env/bin/python")}


@pytest.mark.parametrize("peer", sorted(PEER_PYTHONS))
def test_a_peers_field_comes_back_in_gradregs_voxel_convention(peer, tmp_path, monkeypatch):
    """bench_peers reads each peer's map back as a (3, D, H, W) voxel displacement from the fixed grid into the moving
    image, channel k along array axis k. A blob pair on an anisotropic, non-cubic grid moved by (3, -2, 1) voxels
    must come back as that shift: a swapped axis, a sign or a millimetre left unconverted would show. Nothing is
    left in the working directory (transformix writes a deformationField.nii there unless told otherwise)."""
    python = PEER_PYTHONS[peer]
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {peer} venv at {python} (optional peer of benchmarks/bench_peers.py; "
                    f"GRADREG_{peer.upper()}_PYTHON names another)")
    module = _bench_peers()
    shape, shift = (40, 48, 36), np.array([3.0, -2.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))

    def blobs(offset):
        at = grid - offset[:, None, None, None]
        main = np.exp(-((at[0] - 20) ** 2 / 64 + (at[1] - 24) ** 2 / 100 + (at[2] - 18) ** 2 / 36))
        return (main + 0.5 * np.exp(-((at[0] - 10) ** 2 + (at[1] - 30) ** 2) / 20)).astype(np.float32)

    prep = {"fixed": blobs(np.zeros(3)), "moving": blobs(shift),
            "grid_fit": types.SimpleNamespace(grid=types.SimpleNamespace(spacing=np.array([1.5, 1.0, 2.0])))}
    run = module.run_ants if peer == "ANTs" else lambda p, py: module.run_elastix(p, py, 2)
    monkeypatch.chdir(tmp_path)
    flow, core = run(prep, python)
    assert not list(tmp_path.iterdir())
    assert flow.shape == (3, *shape) and core > 0
    centre = flow[:, 15:25, 19:29, 13:23].reshape(3, -1)
    np.testing.assert_allclose(np.median(centre, axis=1), shift, atol=0.5)
