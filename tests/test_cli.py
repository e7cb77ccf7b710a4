"""The gradreg command line: the demo end to end (few iterations), register/evaluate outputs, clear errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from gradreg_fast import cli

FAST = ["--iterations", "3", "--affine-iterations", "3", "--quiet"]


def strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def write_case(folder, shift_mm=(6.0, -4.0, 3.0)):
    """A small MR-like fixed (LPS) and CT-like moving (RAS) phantom with two labels; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-3.0, -3.0, 3.0, 1.0])
    lps[:3, 3] = (45.0, 45.0, -20.0)
    ras = np.diag([3.0, 3.0, 3.0, 1.0])
    ras[:3, 3] = (-45.0 + shift_mm[0], -45.0 + shift_mm[1], -20.0 + shift_mm[2])
    shape = (31, 31, 14)
    paths = {}
    for role, affine, ct in (("fixed", lps, False), ("moving", ras, True)):
        world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape).astype(float)) + affine[:3, 3].reshape(
            3, 1, 1, 1)
        centre = np.array([0.0, 0.0, 0.0]) + (np.array(shift_mm) if ct else 0)
        body = sum(((world[i] - centre[i]) / r) ** 2 for i, r in enumerate((38, 30, 40))) <= 1
        organ = np.sqrt(sum((world[i] - centre[i] - o) ** 2 for i, o in enumerate((-12, 4, 0)))) <= 11
        labels = np.where(organ & body, 1, 0) + np.where(
            (np.sqrt(sum((world[i] - centre[i] - o) ** 2 for i, o in enumerate((14, -2, 0)))) <= 9) & body, 2, 0)
        if ct:
            image = np.where(body, 40, -1000) + 80 * (labels == 1) - 90 * (labels == 2)
        else:
            image = np.where(body, 300, 4) - 150 * (labels == 1) + 200 * (labels == 2)
        paths[role] = folder / f"{role}.nii.gz"
        paths[f"{role}_labels"] = folder / f"{role}_labels.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(paths[role]))
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(paths[f"{role}_labels"]))
    return paths


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def register_args(case, out, *extra):
    return ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--fixed-labels",
            str(case["fixed_labels"]), "--moving-labels", str(case["moving_labels"]), "--out", str(out), *FAST,
            *extra]


def test_demo_runs_end_to_end_with_few_iterations(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--device", "cpu", *FAST]) == 0
    printed = capsys.readouterr().out
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "flow.nii.gz", "metrics.json", "overview.png"):
        assert (out / name).is_file(), name
    for organ in ("spleen", "right kidney", "left kidney", "liver"):
        assert organ in printed
    assert "figure:" in printed and "runtime:" in printed and "mean organ Dice" in printed
    report = strict_json(out / "metrics.json")
    stages = report["stages"]
    assert stages["before"]["mean_dice"] == 0.0  # the two scans do not overlap in world space
    assert stages["before"]["mean_asd"] > 50  # mm apart before any alignment
    assert stages["after"]["mean_dice"] > 0.4  # aligned organs even after a handful of steps
    assert {v["name"] for v in stages["after"]["labels"].values()} == set(cli.DEMO_LABELS.values())
    mr = nib.load(str(cli.demo_data_dir() / "mr.nii.gz"))
    warped = nib.load(str(out / "warped.nii.gz"))
    assert warped.shape == mr.shape and np.allclose(warped.affine, mr.affine)
    assert (cli.demo_data_dir() / "PROVENANCE.md").read_text().count("Wasserthal") >= 1


def test_demo_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.fresh_demo_dir() == Path(cli.DEMO_OUT)
    Path(cli.DEMO_OUT).mkdir()
    assert cli.fresh_demo_dir() == Path(f"{cli.DEMO_OUT}-2")
    Path(f"{cli.DEMO_OUT}-2").mkdir()
    assert cli.fresh_demo_dir() == Path(f"{cli.DEMO_OUT}-3")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.json").write_text("keep me")
    assert cli.main(["demo", "--out", str(taken), *FAST]) == cli.EXIT_ERROR
    assert "already exists" in capsys.readouterr().err
    assert (taken / "metrics.json").read_text() == "keep me"


def test_register_writes_outputs_and_force_replaces_them(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(register_args(case, out, "--labels", "1=organ a,2=organ b", "--device", "cpu")) == 0
    printed = capsys.readouterr().out
    assert "organ a" in printed and "organ b" in printed
    report = strict_json(out / "metrics.json")
    assert report["stages"]["after"]["labels"]["1"]["name"] == "organ a"
    assert report["stages"]["after"]["mean_dice"] > report["stages"]["before"]["mean_dice"]
    before = (out / "metrics.json").stat().st_mtime_ns
    assert cli.main(register_args(case, out)) == cli.EXIT_ERROR
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.json").stat().st_mtime_ns == before
    assert cli.main(register_args(case, out, "--force", "--no-figure")) == 0
    assert (out / "metrics.json").stat().st_mtime_ns != before


def test_register_without_labels(case, tmp_path):
    out = tmp_path / "plain"
    args = ["register", "--fixed", str(case["fixed"]), "--moving", str(case["moving"]), "--out", str(out), *FAST]
    assert cli.main(args) == 0
    assert not (out / "warped_labels.nii.gz").exists()
    report = strict_json(out / "metrics.json")
    assert report["stages"] == {} and report["folding_percent"] is not None


@pytest.mark.parametrize("problem", ["missing", "corrupt", "4d", "one_label", "labels_flag", "iterations",
                                     "input_as_output", "bad_checkpoint", "rigidity", "rigidity_nan"])
def test_register_clear_errors(case, tmp_path, capsys, problem):
    args = register_args(case, tmp_path / "out")
    expect = {
        "missing": "file not found", "corrupt": "not a readable NIfTI", "4d": "4D", "one_label": "both",
        "labels_flag": "id=name", "iterations": "integers", "input_as_output": "one of the inputs",
        "bad_checkpoint": "file not found", "rigidity": "--affine-rigidity must be a finite number >= 0",
        "rigidity_nan": "--affine-rigidity must be a finite number >= 0",
    }[problem]
    if problem == "missing":
        args[args.index("--fixed") + 1] = str(tmp_path / "nope.nii.gz")
    elif problem == "corrupt":
        junk = tmp_path / "junk.nii.gz"
        junk.write_bytes(b"\x1f\x8b not really gzip")
        args[args.index("--moving") + 1] = str(junk)
    elif problem == "4d":
        series = tmp_path / "series.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), str(series))
        args[args.index("--fixed") + 1] = str(series)
    elif problem == "one_label":
        i = args.index("--moving-labels")
        del args[i:i + 2]
    elif problem == "labels_flag":
        args += ["--labels", "1=spleen,liver"]
    elif problem == "iterations":
        args[args.index("--iterations") + 1] = "a,b"
    elif problem == "input_as_output":
        out = tmp_path / "inside"
        out.mkdir()
        moving = out / "warped.nii.gz"  # the moving image sits where an output would go
        moving.write_bytes(Path(case["moving"]).read_bytes())
        args[args.index("--moving") + 1] = str(moving)
        args[args.index("--out") + 1] = str(out)
        args.append("--force")
    elif problem == "bad_checkpoint":
        args += ["--checkpoint", str(tmp_path / "missing.pt")]
    elif problem == "rigidity":
        args += ["--affine-rigidity", "-1"]
    elif problem == "rigidity_nan":
        args += ["--affine-rigidity", "nan"]
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("gradreg register: error:") and expect in err, err
    if problem == "input_as_output":
        assert (tmp_path / "inside" / "warped.nii.gz").read_bytes() == Path(case["moving"]).read_bytes()


def test_evaluate_folder_of_pairs(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    write_case(pairs / "case_a")
    write_case(pairs / "case_b", shift_mm=(-3.0, 5.0, 0.0))
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--pairs", str(pairs), "--out", str(out), "--labels", "1=a,2=b", *FAST]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["case_a", "case_a", "case_b", "case_b"]
    assert list(rows[0]) == list(cli.CSV_FIELDS)
    assert all(0 <= float(r["dice_after"]) <= 1 for r in rows)
    summary = strict_json(out / "summary.json")
    assert summary["cases"] == 2 and set(summary["per_label"]) == {"1 a", "2 b"}
    assert "2 case(s)" in capsys.readouterr().out
    assert cli.main(["evaluate", "--pairs", str(pairs), "--out", str(out), *FAST]) == cli.EXIT_ERROR
    assert "already exists" in capsys.readouterr().err
    (pairs / "case_c").mkdir()
    assert cli.main(["evaluate", "--pairs", str(pairs), "--out", str(tmp_path / "e2"), *FAST]) == cli.EXIT_ERROR
    assert "case_c" in capsys.readouterr().err


def test_train_forwards_its_arguments(monkeypatch):
    import gradreg_fast.train as train

    seen = []
    monkeypatch.setattr(train, "cli_main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "--config", "c.yaml", "--steps", "3"]) == 0
    assert seen == [["--config", "c.yaml", "--steps", "3"]]


def test_every_subcommand_has_device_and_backend():
    parser = cli.build_parser()
    common = ["--device", "cpu", "--backend", "reference"]
    assert parser.parse_args(["demo", *common]).backend == "reference"
    assert parser.parse_args(["register", "--fixed", "f", "--moving", "m", "--out", "o", *common]).device == "cpu"
    assert parser.parse_args(["evaluate", "--pairs", "p", "--out", "o", *common]).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_requested_without_cuda(case, tmp_path, capsys):
    assert cli.main(register_args(case, tmp_path / "o", "--device", "cuda")) == cli.EXIT_ERROR
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("--device", "foo"), "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
    (("--device", "mps"), "device 'mps': the package's ops run on 'cpu' and 'cuda' devices only"),
    (("--device", "cpu", "--backend", "cuda"), "backend 'cuda' cannot run on device 'cpu'"),
    (("--device", "cpu", "--backend", "triton"), "backend 'triton' cannot run on device 'cpu'"),
])
@pytest.mark.parametrize("command", ["register", "evaluate"])
def test_a_bad_device_or_backend_is_one_line_before_any_work(command, flags, message, case, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would let Triton run on the CPU
    out = tmp_path / "o"
    args = register_args(case, out, *flags) if command == "register" else \
        ["evaluate", "--pairs", str(tmp_path), "--out", str(out), *flags]
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"gradreg {command}: error: ")
    assert message in err
    assert not out.exists()


def test_the_default_backend_is_checked_against_the_device_too(monkeypatch):
    from gradreg_fast.register.pipeline import resolve_device

    monkeypatch.setenv("GRADREG_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on device 'cpu'"):
        resolve_device("cpu")
    assert resolve_device("cpu", "reference") == torch.device("cpu")
    assert resolve_device("cpu", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_device("cpu", "fast")


def test_affine_rigidity_flag_reaches_the_settings():
    parser = cli.build_parser()
    base = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o"]
    from gradreg_fast.register import Settings

    assert cli.settings_from_args(parser.parse_args(base)).affine_rigidity == Settings().affine_rigidity
    assert cli.settings_from_args(parser.parse_args(base + ["--affine-rigidity", "0"])).affine_rigidity == 0.0
    assert cli.settings_from_args(parser.parse_args(base + ["--affine-rigidity", "2.5", "--thorough"])).affine_rigidity == 2.5
    with pytest.raises(cli.UsageError, match="affine-rigidity"):
        cli.settings_from_args(parser.parse_args(base + ["--affine-rigidity", "inf"]))


def test_intensity_window_flags_reach_the_settings():
    parser = cli.build_parser()
    base = ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o"]
    from gradreg_fast.register import Settings

    default = cli.settings_from_args(parser.parse_args(base))
    assert (default.ct_window, default.mr_percentiles) == (Settings().ct_window, Settings().mr_percentiles)
    chosen = cli.settings_from_args(parser.parse_args(base + ["--ct-window=-150,250", "--mr-percentiles", "1,99",
                                                              "--quick"]))
    assert (chosen.ct_window, chosen.mr_percentiles) == ((-150.0, 250.0), (1.0, 99.0))
    for flag, value in (("--ct-window", "300,-200"), ("--ct-window", "0,inf"), ("--ct-window", "100"),
                        ("--mr-percentiles", "1,101"), ("--mr-percentiles", "a,b")):
        with pytest.raises(cli.UsageError, match=flag):
            cli.settings_from_args(parser.parse_args(base + [f"{flag}={value}"]))


def test_parse_labels():
    assert cli.parse_labels("1=spleen, 2=right kidney,5=liver") == {1: "spleen", 2: "right kidney", 5: "liver"}
    assert cli.parse_labels(None) == {}
    for bad in ("spleen", "0=background", "1=a,1=b", "x=y"):
        with pytest.raises(cli.UsageError):
            cli.parse_labels(bad)


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "gradreg_fast", "--help"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0
    for command in ("register", "train", "evaluate", "demo"):
        assert command in result.stdout


def test_register_with_a_checkpoint_fine_tunes_the_network(case, tmp_path):
    from gradreg_fast.models import build_model
    from gradreg_fast.train.checkpoint import save_checkpoint

    model = build_model("gated")
    checkpoint = tmp_path / "model.pt"
    save_checkpoint({"model_config": model.config, "model": model.state_dict()}, checkpoint)
    out = tmp_path / "net"
    assert cli.main(register_args(case, out, "--checkpoint", str(checkpoint), "--iterations", "2")) == 0
    report = strict_json(out / "metrics.json")
    assert report["settings"]["method"] == "network"
    assert report["settings"]["checkpoint"] == str(checkpoint)
    assert report["settings"]["network_iterations"] == [2, 2]
    assert report["folding_percent"] is not None
