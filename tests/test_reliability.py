"""Reliability of the registration pipeline and the command line (issue 13): consistent output sets,
right and bounded metrics, early one-line refusals, clean interruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gradreg_fast import cli
from gradreg_fast.register.pipeline import quick_settings, register

from test_cli import FAST, strict_json, write_case


def quick():
    settings = quick_settings()
    settings.affine_iterations = (3, 3)
    settings.field.iterations = (3, 3, 1)
    return settings


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def test_background_is_never_scored_without_a_label_list(case):
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    for stage, report in result.metrics["stages"].items():
        assert sorted(report["labels"]) == ["1", "2"], stage
        dice = [v["dice"] for v in report["labels"].values()]
        assert report["mean_dice"] == pytest.approx(np.mean(dice)), stage


def covering_scores(case, spacing_mm, labels):
    """The "before" stage the slow way: both label maps sampled on a grid of the fixed scan's orientation
    and ``spacing_mm`` that covers both scans, then scored over that whole volume."""
    from scipy import ndimage

    from gradreg_fast import metrics

    fixed, moving = nib.load(str(case["fixed_labels"])), nib.load(str(case["moving_labels"]))
    direction = fixed.affine[:3, :3] / np.linalg.norm(fixed.affine[:3, :3], axis=0)
    lattice = np.eye(4)
    lattice[:3, :3] = direction * spacing_mm
    lattice[:3, 3] = fixed.affine[:3, 3]
    corners = []
    for image in (fixed, moving):
        n = np.asarray(image.shape) - 1
        box = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
        corners.append(nib.affines.apply_affine(np.linalg.inv(lattice) @ image.affine, box))
    corners = np.concatenate(corners)
    low, high = np.floor(corners.min(0)) - 2, np.ceil(corners.max(0)) + 2
    shift = np.eye(4)
    shift[:3, 3] = low
    cover = lattice @ shift
    shape = tuple((high - low + 1).astype(int))
    maps = []
    for image in (fixed, moving):
        to_voxels = np.linalg.inv(image.affine) @ cover
        maps.append(ndimage.affine_transform(np.asarray(image.dataobj).astype(np.int64), to_voxels[:3, :3],
                                             to_voxels[:3, 3], output_shape=shape, order=0, mode="grid-constant"))
    return metrics.label_metrics(maps[0], maps[1], [spacing_mm] * 3, labels)


@pytest.mark.parametrize("shift_mm", [(6.0, -4.0, 3.0), (1000.0, 0.0, 0.0)])
def test_before_stage_equals_the_covering_grid_computation(tmp_path, shift_mm):
    case = write_case(tmp_path / "case", shift_mm=shift_mm)
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    expected = covering_scores(case, 3.0, [1, 2])
    got = result.metrics["stages"]["before"]["labels"]
    for label in (1, 2):
        for key in ("dice", "asd", "hd95"):
            assert got[str(label)][key] == pytest.approx(expected[label][key], rel=1e-9), (label, key)
    if shift_mm[0] > 500:
        assert got["1"]["dice"] == 0 and got["1"]["asd"] > 900
    # The other stages are scored on the output grid: the same numbers as the whole-volume metrics.
    from gradreg_fast import metrics

    for stage in ("initial", "affine", "after"):
        whole = metrics.label_metrics(result.fixed_labels, result.label_maps[stage], 3.0, [1, 2])
        for label in (1, 2):
            for key in ("dice", "asd", "hd95"):
                assert result.metrics["stages"][stage]["labels"][str(label)][key] == pytest.approx(
                    whole[label][key], rel=1e-9, nan_ok=True)


def test_before_stage_memory_does_not_grow_with_the_world_offset(tmp_path):
    """A moving scan 1 m or 1000 km away: the same numpy memory as a near one, a right answer, no error."""
    import tracemalloc

    peaks, before = {}, {}
    for shift in [(6.0, -4.0, 3.0), (1000.0, 0.0, 0.0), (0.0, 1e6, -1e6)]:
        case = write_case(tmp_path / str(len(peaks)), shift_mm=shift)
        tracemalloc.start()
        try:
            result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                              device="cpu", progress=False)
            peaks[shift] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        before[shift] = result.metrics["stages"]["before"]
        assert result.metrics["stages"]["initial"]["mean_dice"] > 0.5  # centres of mass bring it back
    near = peaks[(6.0, -4.0, 3.0)]
    assert max(peaks.values()) < 1.3 * near, peaks
    assert before[(1000.0, 0.0, 0.0)]["mean_dice"] == 0.0
    assert 980 < before[(1000.0, 0.0, 0.0)]["mean_asd"] < 1010
    assert before[(0.0, 1e6, -1e6)]["mean_asd"] == pytest.approx(np.sqrt(2) * 1e6, rel=1e-3)


# ----------------------------------------------------------------------------------------------- output sets

MARKER = "gradreg_incomplete.json"
PACKAGE_FILES = {"warped.nii.gz", "warped_labels.nii.gz", "flow.nii.gz", "metrics.json", "overview.png"}


def folder_state(out):
    """"incomplete" when the folder is marked mid-change; else the run's set of (name, sha256), after
    checking that metrics.json names exactly the package's files present, with their checksums."""
    import hashlib

    out = Path(out)
    names = {p.name for p in out.iterdir()}
    if MARKER in names:
        return "incomplete"
    manifest = strict_json(out / "metrics.json")["files"]
    assert names & PACKAGE_FILES == set(manifest) | {"metrics.json"}, (names, manifest)
    for name, entry in manifest.items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], name
    return frozenset((name, entry["sha256"]) for name, entry in manifest.items())


def hidden_temporaries(out):
    return sorted(p.name for p in Path(out).iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def results(case):
    with_labels = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                           device="cpu", progress=False)
    plain = register(case["fixed"], case["moving"], settings=quick(), device="cpu", progress=False)
    return with_labels, plain


def test_force_replaces_the_set_and_keeps_other_files(case, results, tmp_path):
    from gradreg_fast.register.pipeline import save_result

    out = tmp_path / "out"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    own_input = out / "fixed.nii.gz"  # an input that lives in the output folder
    own_input.write_bytes(Path(case["fixed"]).read_bytes())
    inputs = [own_input, case["moving"], case["fixed_labels"], case["moving_labels"]]
    first = save_result(results[0], out, inputs=inputs)
    assert set(first) == PACKAGE_FILES
    old = folder_state(out)
    with pytest.raises(FileExistsError, match="already exists"):
        save_result(results[1], out, inputs=inputs, figure=False)
    assert folder_state(out) == old
    second = save_result(results[1], out, inputs=inputs, force=True, figure=False)
    assert set(second) == {"warped.nii.gz", "flow.nii.gz", "metrics.json"}
    new = folder_state(out)
    assert new != old and not (out / "warped_labels.nii.gz").exists() and not (out / "overview.png").exists()
    assert (out / "my_notes.txt").read_text() == "mine" and own_input.read_bytes() == Path(case["fixed"]).read_bytes()
    assert hidden_temporaries(out) == []
    # The same through the command line: labels and figure, then --force without them.
    cli_out = tmp_path / "cli"
    args = ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--out", str(cli_out), *FAST]
    labels = ["--fixed-labels", str(case["fixed_labels"]), "--moving-labels", str(case["moving_labels"])]
    assert cli.main(args + labels) == 0
    assert (cli_out / "warped_labels.nii.gz").exists() and (cli_out / "overview.png").exists()
    assert cli.main(args + ["--force", "--no-figure"]) == 0
    assert {p.name for p in cli_out.iterdir()} == {"warped.nii.gz", "flow.nii.gz", "metrics.json"}
    folder_state(cli_out)


KILL_SCRIPT = r"""
import os, pickle, shutil, signal, sys
from pathlib import Path
from gradreg_fast.register.pipeline import save_result

result_file, old, work = sys.argv[1:4]
inputs = sys.argv[4:]
with open(result_file, "rb") as f:
    result = pickle.load(f)
step = 0
while True:
    step += 1
    target = Path(work) / f"kill{step:02d}"
    shutil.copytree(old, target)
    pid = os.fork()
    if pid == 0:  # the child dies by SIGKILL just before its step-th file-system change
        count = [0]
        real = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "rmdir")}
        def hooked(name):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*args, **kwargs)
            return call
        for name in real:
            setattr(os, name, hooked(name))
        save_result(result, target, inputs=inputs, force=True, figure=False)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, status
        print(step, flush=True)
        break
    assert os.WTERMSIG(status) == signal.SIGKILL, status
    if step > 60:
        raise SystemExit("too many steps")
"""


def test_a_kill_at_any_step_of_a_force_rewrite_leaves_one_complete_set_or_the_marker(case, results, tmp_path):
    """SIGKILL before each file-system change of a --force rewrite (labels and figure -> neither): the
    folder holds the old set, the new set, or the marker; never an unmarked mix."""
    import pickle

    from gradreg_fast.register.pipeline import check_outputs, save_result

    old = tmp_path / "old"
    inputs = [str(case[k]) for k in ("fixed", "moving", "fixed_labels", "moving_labels")]
    save_result(results[0], old, inputs=inputs)
    (old / "my_notes.txt").write_text("mine")
    old_state = folder_state(old)
    (tmp_path / "result.pkl").write_bytes(pickle.dumps(results[1]))
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "result.pkl"), str(old), str(work), *inputs],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    states = {}
    for folder in sorted(work.iterdir()):
        state = folder_state(folder)
        states[folder.name] = "old" if state == old_state else state if state == "incomplete" else "new"
        assert (folder / "my_notes.txt").read_text() == "mine"
        if state == "incomplete":  # marked: a plain run refuses the folder, --force repairs it
            with pytest.raises(FileExistsError, match="interrupted"):
                check_outputs(folder, inputs, False, force=False)
            save_result(results[1], folder, inputs=inputs, force=True, figure=False)
            assert folder_state(folder) != "incomplete" and hidden_temporaries(folder) == []
            assert {p.name for p in folder.iterdir()} == {"warped.nii.gz", "flow.nii.gz", "metrics.json",
                                                          "my_notes.txt"}
    sequence = list(states.values())
    assert sequence[0] == "old" and sequence[-1] == "new" and "incomplete" in sequence, states
    first_new = sequence.index("new")
    assert set(sequence[first_new:]) == {"new"}, states


# ----------------------------------------------------------------------------------------------- SIGTERM

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    return env


# Runs `gradreg register` in-process with a hook: "start" prints a line once the registration has
# begun (the test then sends SIGTERM); "save" sends SIGTERM to itself right after a staged file is written.
TERM_SCRIPT = r"""
import os, signal, sys, time
from gradreg_fast import cli
from gradreg_fast.register import pipeline

mode = sys.argv[1]
if mode == "start":
    real_start = pipeline._start_ops
    def started(*args, **kwargs):
        print("started", flush=True)
        time.sleep(120)  # the signal lands here, mid-run, however fast the machine (SIGTERM ends the sleep)
        return real_start(*args, **kwargs)
    pipeline._start_ops = started
else:
    real_write = pipeline.write_displacement
    def write_then_die(*args, **kwargs):
        path = real_write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return path
    pipeline.write_displacement = write_then_die
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode", ["start", "save"])
def test_sigterm_ends_register_cleanly(case, tmp_path, mode):
    out = tmp_path / "out"
    script = tmp_path / "term.py"
    script.write_text(TERM_SCRIPT)
    iterations = FAST[:4]
    args = ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--fixed-labels",
            str(case["fixed_labels"]), "--moving-labels", str(case["moving_labels"]), "--out", str(out),
            *iterations, "--quiet", "--device", "cpu"]
    process = subprocess.Popen([sys.executable, str(script), mode, *args], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        if mode == "start":
            assert process.stdout.readline().strip() == "started"
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert err.strip() == "gradreg register: terminated (SIGTERM)"
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written, no hidden temporaries


TRAIN_TERM_SCRIPT = r"""
import os, signal, sys
import torch
from gradreg_fast import cli

real_save = torch.save
calls = [0]
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint: one complete last.pt exists
        os.kill(os.getpid(), signal.SIGTERM)
torch.save = save_then_die
if sys.argv[1] == "module":  # python -m gradreg_fast.train, torchrun's entry point
    from gradreg_fast.train import cli_main
    sys.exit(cli_main(sys.argv[3:]))
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("entry", ["gradreg", "module"])
def test_sigterm_during_a_checkpoint_write_leaves_no_temporary(tmp_path, entry):
    out = tmp_path / "run"
    script = tmp_path / "term.py"
    script.write_text(TRAIN_TERM_SCRIPT)
    args = ["train", "--model", "vm", "--enc", "4,4,4,4", "--dec", "4", "--refine", "", "--shape", "16,16,16",
            "--train-pairs", "4", "--val-pairs", "1", "--descriptor", "mind", "--lr", "1e-3", "--steps", "20",
            "--checkpoint-every", "1", "--val-every", "1000", "--log-every", "1", "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--out-dir", str(out)]
    run = subprocess.run([sys.executable, str(script), entry, *args], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "gradreg train: terminated (SIGTERM)"
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    import torch

    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1


# ----------------------------------------------------------------------------------------------- evaluate

def test_evaluate_output_inside_the_pairs_folder_is_not_a_case_on_the_next_run(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    write_case(pairs / "a")
    out = pairs / "results"
    for force in ([], ["--force"]):
        assert cli.main(["evaluate", "--pairs", str(pairs), "--out", str(out), "--no-figure", *FAST, *force]) == 0
        assert strict_json(out / "summary.json")["cases"] == 1
    capsys.readouterr()


def test_evaluate_continues_past_failing_cases(tmp_path, capsys):
    import csv

    pairs = tmp_path / "pairs"
    write_case(pairs / "a_good")
    broken = write_case(pairs / "b_corrupt")
    broken["moving"].write_bytes(b"\x1f\x8b not really gzip")
    write_case(pairs / "c_no_moving")["moving"].unlink()
    write_case(pairs / "d_good", shift_mm=(-3.0, 5.0, 0.0))
    write_case(pairs / "e_half_labelled")["moving_labels"].unlink()  # register refuses it: not silently unscored
    out = tmp_path / "eval"
    code = cli.main(["evaluate", "--pairs", str(pairs), "--out", str(out), "--save-outputs", "--no-figure", *FAST])
    assert code == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 of 5 case(s) failed" in err and "b_corrupt" in err and "c_no_moving" in err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    assert list(by_case) == ["a_good", "b_corrupt", "c_no_moving", "d_good", "e_half_labelled"]
    assert "not a readable NIfTI" in by_case["b_corrupt"][0]["error"]
    assert "moving.nii" in by_case["c_no_moving"][0]["error"]
    assert "fixed_labels but no moving_labels" in by_case["e_half_labelled"][0]["error"]
    for good in ("a_good", "d_good"):
        assert [r["label"] for r in by_case[good]] == ["1", "2"] and all(r["error"] == "" for r in by_case[good])
        assert 0 <= float(by_case[good][0]["dice_after"]) <= 1
        folder_state(out / good)
    summary = strict_json(out / "summary.json")
    assert summary["cases"] == 2 and set(summary["failed"]) == {"b_corrupt", "c_no_moving", "e_half_labelled"}
    import hashlib  # the two files are one set: summary.json names metrics.csv with its checksum

    csv_entry = summary["files"]["metrics.csv"]
    assert csv_entry["sha256"] == hashlib.sha256((out / "metrics.csv").read_bytes()).hexdigest()
    assert hidden_temporaries(out) == []
    assert not (out / "b_corrupt").exists() or hidden_temporaries(out / "b_corrupt") == []


# ----------------------------------------------------------------------------------------------- early refusals

@pytest.fixture
def no_registration(monkeypatch):
    """Any refusal under test must come before the registration: reaching the affine stage fails."""
    from gradreg_fast.register import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the registration started")

    monkeypatch.setattr(pipeline, "optimize_affine", refuse)
    monkeypatch.setattr(pipeline, "_start_ops", refuse)


def one_line_error(capsys, command="register"):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gradreg {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def register_cli(case, out, *extra, labels=True):
    args = ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--out", str(out), *FAST]
    if labels:
        args += ["--fixed-labels", str(case["fixed_labels"]), "--moving-labels", str(case["moving_labels"])]
    return cli.main(args + list(extra))


@pytest.mark.parametrize("spacing", ["inf", "nan", "0", "-2", "-inf"])
def test_bad_spacing_is_refused(case, tmp_path, capsys, no_registration, spacing):
    assert register_cli(case, tmp_path / "out", f"--spacing={spacing}") == cli.EXIT_ERROR
    assert "--spacing" in one_line_error(capsys)


@pytest.mark.parametrize("flag, message", [("--spacing=1e-30", "coarser spacing"),
                                           ("--spacing=1000", "at least 2 voxels along each axis"),
                                           ("--size=2,2,1", "at least 2 voxels along each axis")])
def test_a_grid_too_fine_to_count_or_too_coarse_to_differentiate_is_refused(case, tmp_path, capsys,
                                                                            no_registration, flag, message):
    assert register_cli(case, tmp_path / "out", flag) == cli.EXIT_ERROR
    assert message in one_line_error(capsys)


def test_a_working_grid_beyond_memory_is_refused_at_once(case, tmp_path, capsys, no_registration):
    start = time.perf_counter()
    assert register_cli(case, tmp_path / "out", "--spacing", "0.01") == cli.EXIT_ERROR
    line = one_line_error(capsys)
    assert "GiB" in line and "--spacing" in line and time.perf_counter() - start < 10
    assert register_cli(case, tmp_path / "out", "--size", "4000,4000,4000") == cli.EXIT_ERROR
    assert "GiB" in one_line_error(capsys)
    from gradreg_fast.io import Grid, Scan
    from gradreg_fast.register.pipeline import check_memory

    fit = Grid.of_scan(Scan(np.zeros((10, 10, 10)), np.eye(4))).fit(16)
    check_memory(fit, available=16**3 * 1024)  # fits exactly
    with pytest.raises(MemoryError, match="GiB"):
        check_memory(fit, available=16**3 * 1024 - 1)


def test_a_non_integer_label_map_is_refused_naming_the_file(case, tmp_path, capsys, no_registration):
    image = nib.load(str(case["moving_labels"]))
    values = np.asarray(image.dataobj).astype(np.float32)
    values[values == 2] = 2.5
    bad = tmp_path / "fractional_labels.nii.gz"
    nib.save(nib.Nifti1Image(values, image.affine), str(bad))
    args = ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--fixed-labels",
            str(case["fixed_labels"]), "--moving-labels", str(bad), "--out", str(tmp_path / "out"), *FAST]
    assert cli.main(args) == cli.EXIT_ERROR
    line = one_line_error(capsys)
    assert str(bad) in line and "whole numbers" in line and "2.5" in line


def test_an_unwritable_output_folder_is_refused_at_once(case, tmp_path, capsys, no_registration):
    if os.geteuid() == 0:  # permission bits do not stop root: use a read-only file system instead
        if not Path("/sys").is_dir():
            pytest.skip("no read-only location to write to")
        out = Path("/sys/gradreg_reliability_test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "out"
    assert register_cli(case, out) == cli.EXIT_ERROR
    assert "cannot be written" in one_line_error(capsys)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert register_cli(case, blocker / "out") == cli.EXIT_ERROR
    assert "not a directory" in one_line_error(capsys)


def test_a_malformed_checkpoint_is_refused_at_once(tmp_path, case, capsys, no_registration):
    import torch

    from gradreg_fast.train.checkpoint import save_checkpoint

    bad = {
        "garbage": None,
        "no_config": {"model": {}},
        "bad_config": {"model_config": {"name": "gated", "enc": "wide"}, "model": {}},
        "huge": {"model_config": {"name": "vm", "enc": [4096] * 4, "dec": 4096, "refine": []}, "model": {}},
        "wrong_weights": {"model_config": {"name": "vm", "enc": [4] * 4, "dec": 4, "refine": []},
                          "model": {"w": torch.zeros(3)}},
    }
    for name, payload in bad.items():
        path = tmp_path / f"{name}.pt"
        if payload is None:
            path.write_bytes(b"PK\x03\x04 not a checkpoint")
        else:
            save_checkpoint(payload, path)
        assert register_cli(case, tmp_path / "out", "--checkpoint", str(path)) == cli.EXIT_ERROR, name
        line = one_line_error(capsys)
        assert str(path) in line, line


def test_before_stage_beyond_the_size_limit_is_marked_not_scored():
    from gradreg_fast import metrics
    from gradreg_fast.io import Grid
    from gradreg_fast.register.pipeline import _score_before

    grid = Grid((8, 8, 8), np.diag([2.0, 2.0, 2.0, 1.0]))
    fixed = np.zeros(grid.shape, np.uint8)
    fixed[2:5, 2:5, 2:5] = 1
    moving = np.zeros((20, 20, 20), np.uint8)
    moving[1:19, 1:19, 1:19] = 1  # spans ~20^3 voxels of the fixed lattice
    surfaces = metrics.LabelSurfaces(fixed, [1])
    scored = _score_before(surfaces, moving, np.diag([2.0, 2.0, 2.0, 1.0]), grid, 30**3, {}, None)
    assert scored["labels"]["1"]["dice"] == pytest.approx(2 * 27 / (27 + 18**3)) and "skipped" not in scored
    skipped = _score_before(surfaces, moving, np.diag([2.0, 2.0, 2.0, 1.0]), grid, 8**3, {}, None)
    assert np.isnan(skipped["mean_dice"]) and "not scored" in skipped["skipped"]


def test_each_stage_is_scored_once(case, monkeypatch):
    from gradreg_fast import metrics

    calls = []
    real = metrics.label_metrics

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "label_metrics", counting)
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    assert len(calls) == len(result.metrics["stages"]) == 4


def test_an_output_folder_that_is_a_dangling_link_is_refused_before_the_work(case, tmp_path, capsys, no_registration,
                                                                             monkeypatch):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" / "x")
    assert register_cli(case, link) == cli.EXIT_ERROR
    assert "symbolic link to a path that does not exist" in one_line_error(capsys)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    # the demo's default folder steps past such a link, as past any existing path
    monkeypatch.chdir(tmp_path)
    (tmp_path / cli.DEMO_OUT).symlink_to(tmp_path / "nowhere" / "y")
    assert cli.fresh_demo_dir() == Path(f"{cli.DEMO_OUT}-2")


@pytest.mark.parametrize("size, message", [("-5", "counts >= 0"), ("0", "positive voxel counts"),
                                           ("20,20", "1 or 3 numbers (one per axis)"), ("a,b,c", "integers")])
def test_bad_size_is_refused_naming_it(case, tmp_path, capsys, no_registration, size, message):
    assert register_cli(case, tmp_path / "out", f"--size={size}") == cli.EXIT_ERROR
    line = one_line_error(capsys)
    assert "--size" in line and message in line


def test_settings_size_takes_one_count_for_a_cube_or_three(case):
    from gradreg_fast.register import Settings, register
    from gradreg_fast.register.pipeline import check_settings

    for size in ((20,), (20, 18, 16)):
        settings = Settings(size=size, affine_model="none")
        settings.field.iterations = (0,)
        result = register(case["fixed"], case["moving"], settings=settings, device="cpu", progress=False)
        assert result.metrics["grid"]["shape"] == list(np.broadcast_to(size, 3))
    for size in ((20, 20), (0,), (20.5,)):
        with pytest.raises(ValueError, match="size"):
            check_settings(Settings(size=size))
