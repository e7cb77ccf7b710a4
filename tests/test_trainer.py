"""The trainer: configuration, checkpoints (atomic, self-describing, exact resume), logs, learning."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradreg_fast
from gradreg_fast.data import SyntheticPairs
from gradreg_fast.train import TrainConfig, Trainer, cli_main, load_checkpoint, train
from gradreg_fast.train import checkpoint as checkpoint_module
from gradreg_fast.train.config import config_from_args

REPO = Path(gradreg_fast.__file__).resolve().parents[1]

# Mechanics tests: a net and volumes as small as they can be; nothing here needs to learn much.
QUICK = dict(model="gated", enc=(4, 4, 4, 4), dec=4, refine=(), shape=(16, 16, 16), train_pairs=4, val_pairs=2,
             descriptor="mind", lr=1e-3, log_every=1, val_every=2, checkpoint_every=2, num_workers=0,
             progress=False)


def _config(tmp_path, name="run", **overrides) -> TrainConfig:
    return TrainConfig(**{**QUICK, "out_dir": str(tmp_path / name), **overrides})


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- configuration ------------------------------------------------------------------------------------


def test_defaults_follow_the_paper():
    config = TrainConfig()
    assert config.lr == 1e-5 and config.model == "gated" and config.preset == "abdomen"
    assert config.enc == (16, 32, 32, 32) and config.dec == 32


@pytest.mark.parametrize("overrides, message", [
    ({"model": "unet"}, "`model` must be one of"),
    ({"enc": (4, 4, 4)}, "`enc` must have 4 entries"),
    ({"dec": -8}, "`dec` must be a positive int"),
    ({"lr": 0.0}, "`lr` must be > 0"),
    ({"lr": "fast"}, "`lr` must be a finite number"),
    ({"steps": 0}, "`steps` must be >= 1"),
    ({"batch_size": 1.5}, "`batch_size` must be an integer"),
    ({"alpha": -1.0}, "`alpha` must be a finite number >= 0"),
    ({"preset": "brain"}, "`preset` must be None or one of"),
    ({"descriptor": "ncc"}, "`descriptor` must be 'ssc' or 'mind'"),
    ({"data": "dicom"}, "`data` must be one of"),
    ({"data": "nifti"}, "needs both `train_dir` and `val_dir`"),
    ({"shape": (32, 32)}, "`shape` must be 3 positive ints"),
    ({"displacement": 0.9}, "`displacement` must be a fraction"),
    ({"device": "tpu"}, "`device` must be auto, cpu, cuda or cuda:N"),
    ({"backend": "opencl"}, "`backend` must be one of"),
    ({"amp": "maybe"}, "`amp` must be true or false"),
    ({"num_workers": -1}, "`num_workers` must be >= 0"),
    ({"seed": 2 ** 70}, "`seed` must be >= 0 and below 2\\*\\*63"),
    ({"device": "cuda:abc"}, "`device` must be auto, cpu, cuda or cuda:N"),
    ({"lr": 10 ** 400}, "`lr` must be a finite number"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_unknown_keys_get_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'lrr' in configuration; did you mean 'lr'\?"):
        TrainConfig.from_dict({"lrr": 1e-3})
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate' in configuration$"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    path = tmp_path / "bad.yaml"
    path.write_text("stpes: 10\n")
    with pytest.raises(ValueError, match=r"unknown key 'stpes' in .*bad.yaml; did you mean 'steps'\?"):
        TrainConfig.from_file(path)


def test_yaml_toml_and_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 (no dot) as a string: it must still become a float.
    yaml_file.write_text("model: vm\nlr: 1e-4\nenc: [4, 8, 8, 8]\nshape: [32, 24, 16]\nalpha: null\namp: false\n")
    config = TrainConfig.from_file(yaml_file)
    assert (config.model, config.lr, config.enc, config.shape) == ("vm", 1e-4, (4, 8, 8, 8), (32, 24, 16))
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('model = "average"\nsteps = 7\ndec = [8, 8, 4, 4]\n')
    config = TrainConfig.from_file(toml_file)
    assert (config.model, config.steps, config.dec) == ("average", 7, (8, 8, 4, 4))
    # Flags override the file.
    config = config_from_args(["--config", str(yaml_file), "--lr", "3e-3", "--enc", "2,2,2,2", "--no-progress",
                               "--preset", "none"])
    assert (config.model, config.lr, config.enc, config.progress, config.preset) == ("vm", 3e-3, (2, 2, 2, 2), False,
                                                                                     None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match="must end in .yaml, .yml or .toml"):
        TrainConfig.from_file(tmp_path / "c.json")


def test_shipped_config_file_loads():
    config = TrainConfig.from_file(REPO / "configs" / "train_synthetic.yaml")
    assert config.data == "synthetic" and config.model == "gated"


def test_cli_reports_bad_values(capsys):
    assert cli_main(["--lr", "-1"]) == 2
    assert "`lr` must be > 0" in capsys.readouterr().err
    assert cli_main(["--no-such-flag"]) == 2
    assert cli_main(["--help"]) == 0
    assert "--checkpoint-every" in capsys.readouterr().out


def test_amp_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error; this machine has CUDA")
    with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
        Trainer(_config(tmp_path, amp=True))


def test_training_set_too_small_for_the_batch(tmp_path):
    with pytest.raises(ValueError, match="too few for batch_size 8"):
        Trainer(_config(tmp_path, batch_size=8))


# -- checkpoints, logs, resume -------------------------------------------------------------------------


def test_run_writes_checkpoints_and_logs(tmp_path):
    config = _config(tmp_path, steps=5)
    trainer = Trainer(config)
    best = trainer.fit()
    out = Path(config.out_dir)
    assert best == out / "best.pt" and best.is_file() and (out / "last.pt").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    raw = torch.load(out / "last.pt", weights_only=True)  # plain data only
    assert raw["step"] == 5 and raw["world_size"] == 1
    assert raw["model_config"] == trainer.model.config
    assert raw["train_config"] == config.to_dict()
    assert set(raw["rng"]) >= {"torch", "numpy", "python"}
    assert raw["best"]["metric"] == "dice" and raw["best"]["step"] in (2, 4, 5)
    assert set(raw["metrics"]) == {"loss", "dice", "dice_before", "folding_pct"}

    model, info = load_checkpoint(out / "last.pt")
    assert info["step"] == 5 and "optimizer" not in info and not model.training
    pair = SyntheticPairs(1, (16, 16, 16), seed=99)[0]
    moving, fixed = pair["moving"][None], pair["fixed"][None]
    trainer.model.eval()
    torch.testing.assert_close(model(moving, fixed).flow, trainer.model(moving, fixed).flow, rtol=0, atol=0)

    train_rows = _rows(out / "train_log.csv")
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5]
    assert set(train_rows[0]) == {"step", "loss", "isim", "gsim", "igreg", "greg", "lr", "seconds_per_step"}
    for r in train_rows:  # the logged loss is eq. 2 of its logged terms (abdomen preset)
        terms = {k: float(r[k]) for k in ("isim", "gsim", "igreg", "greg")}
        expected = terms["isim"] + 0.5 * terms["gsim"] + 1.0 * terms["igreg"] + 0.5 * terms["greg"]
        assert float(r["loss"]) == pytest.approx(expected, rel=1e-5)
    val_rows = _rows(out / "val_log.csv")
    assert [int(r["step"]) for r in val_rows] == [2, 4, 5]
    assert all(0 <= float(r["dice"]) <= 1 and float(r["folding_pct"]) >= 0 for r in val_rows)
    best_value = max(float(r["dice"]) for r in val_rows)
    assert torch.load(best, weights_only=True)["best"]["value"] == pytest.approx(best_value)


def test_refuses_to_overwrite_a_run_and_resume_auto(tmp_path):
    train(_config(tmp_path, steps=2))
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(_config(tmp_path, steps=4))
    # resume="auto" continues from last.pt, and starts fresh where there is none.
    assert Trainer(_config(tmp_path, steps=4, resume="auto")).step == 2
    assert Trainer(_config(tmp_path, name="fresh", steps=4, resume="auto")).step == 0


def _digests(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_folder_is_never_given_two_runs(tmp_path, capsys):
    train(_config(tmp_path, name="one", steps=2, seed=3))
    train(_config(tmp_path, name="two", steps=2, seed=4))
    before = _digests(tmp_path / "one")
    # another run's checkpoint resumed into a folder that holds a run: refused, nothing written
    with pytest.raises(FileExistsError, match="holds another run"):
        Trainer(_config(tmp_path, name="one", steps=4, resume=str(tmp_path / "two" / "last.pt")))
    # a run's files without last.pt still make a run: a fresh run there is refused
    (tmp_path / "one" / "last.pt").unlink()
    with pytest.raises(FileExistsError, match="no last.pt to continue from"):
        Trainer(_config(tmp_path, name="one", steps=2))
    assert _digests(tmp_path / "one") == {k: v for k, v in before.items() if k != "last.pt"}
    # through the CLI: one line, exit status 1
    args = ["--out-dir", str(tmp_path / "one"), "--steps", "2", "--no-progress"]
    flags = [f"--{key.replace('_', '-')}={','.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"
             for key, value in QUICK.items() if not isinstance(value, bool)]
    assert cli_main(flags + args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradreg train: error:") and "already holds a run" in err


def test_resuming_a_finished_checkpoint_elsewhere_has_nothing_to_do(tmp_path):
    train(_config(tmp_path, name="done", steps=2))
    with pytest.raises(ValueError, match="nothing to do"):
        Trainer(_config(tmp_path, name="elsewhere", steps=2, resume=str(tmp_path / "done" / "last.pt")))
    assert not (tmp_path / "elsewhere").exists()
    # in its own folder it is a finished run, found again
    assert Trainer(_config(tmp_path, name="done", steps=2, resume="auto")).step == 2


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("optimizer"), "no optimizer"), (lambda c: c.pop("rng"), "no rng"),
    (lambda c: c.update(step="abc"), "step must be an integer"), (lambda c: c.update(step=-5), "step must be"),
    (lambda c: c.update(best={"metric": "dice"}), "its best must be"),
    (lambda c: c.update(optimizer={"foo": 1}), "cannot be restored"),
    (lambda c: c.update(rng={"torch": "state"}), "cannot be restored"),
    (lambda c: c.update(log_window={"count": 3, "sums": None, "seconds": 1.0}), "log_window"),
])
def test_a_checkpoint_that_cannot_be_resumed_is_named(change, message, tmp_path):
    train(_config(tmp_path, name="source", steps=2))
    checkpoint = checkpoint_module.read_checkpoint(tmp_path / "source" / "last.pt")
    checkpoint.pop("format")
    change(checkpoint)
    bad = tmp_path / "bad.pt"
    checkpoint_module.save_checkpoint(checkpoint, bad)
    with pytest.raises(ValueError, match=message):
        Trainer(_config(tmp_path, name="target", steps=4, resume=str(bad)))


def test_checkpoint_files_that_are_not_checkpoints_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        checkpoint_module.read_checkpoint(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable checkpoint") as refused:
        checkpoint_module.read_checkpoint(junk)
    assert "weights_only` set to `False" not in str(refused.value) and "Re-running" not in str(refused.value)
    train(_config(tmp_path, name="source", steps=1))
    checkpoint = checkpoint_module.read_checkpoint(tmp_path / "source" / "last.pt")
    checkpoint["model"] = {1: torch.ones(1)}
    with pytest.raises(ValueError, match="must map parameter names to tensors"):
        checkpoint_module.check_checkpoint(checkpoint)


def test_resume_continues_exactly(tmp_path):
    """3 steps, stop, resume to 7 == 7 uninterrupted steps, bit for bit. Step 3 falls inside an epoch of
    4 pairs, so the resumed run must also skip the samples already seen."""
    whole = Trainer(_config(tmp_path, name="whole", steps=7, checkpoint_every=3, val_every=3))
    whole.fit()
    first = Trainer(_config(tmp_path, name="split", steps=3, checkpoint_every=3, val_every=3))
    first.fit()
    second = Trainer(_config(tmp_path, name="split", steps=7, checkpoint_every=3, val_every=3, resume="auto"))
    assert second.step == 3
    second.fit()
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    state_a, state_b = whole.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field])
    whole_rows = _rows(tmp_path / "whole" / "train_log.csv")
    split_rows = _rows(tmp_path / "split" / "train_log.csv")
    assert [r["loss"] for r in whole_rows] == [r["loss"] for r in split_rows]
    assert _rows(tmp_path / "whole" / "val_log.csv") == _rows(tmp_path / "split" / "val_log.csv")


def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    """A run that logged steps past its last checkpoint and died: resuming rewrites those rows once."""
    out = tmp_path / "run"
    train(_config(tmp_path, steps=2, checkpoint_every=2, val_every=2))
    step2 = (out / "last.pt").read_bytes()
    train(_config(tmp_path, steps=3, checkpoint_every=2, val_every=2, resume="auto"))
    assert [int(r["step"]) for r in _rows(out / "train_log.csv")] == [1, 2, 3]
    (out / "last.pt").write_bytes(step2)  # as if it had died before checkpointing step 3
    train(_config(tmp_path, steps=3, checkpoint_every=2, val_every=2, resume="auto"))
    assert [int(r["step"]) for r in _rows(out / "train_log.csv")] == [1, 2, 3]
    assert [int(r["step"]) for r in _rows(out / "val_log.csv")] == [2, 3]


def test_resume_rejects_another_model(tmp_path):
    train(_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="the checkpoint holds model"):
        Trainer(_config(tmp_path, name="other", model="average", steps=4, resume=str(tmp_path / "run" / "last.pt")))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a gradreg_fast training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint_module.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.save_checkpoint({"step": 2, "model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    kept = checkpoint_module.read_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_killed_run_leaves_the_last_checkpoint_intact(tmp_path):
    """SIGKILL a training process while it checkpoints every step; last.pt must load, and resume."""
    out = tmp_path / "run"
    args = ["--model", "vm", "--enc", "4,4,4,4", "--dec", "4", "--refine", "", "--shape", "16,16,16",
            "--train-pairs", "4", "--val-pairs", "1", "--descriptor", "mind", "--lr", "1e-3", "--steps", "100000",
            "--checkpoint-every", "1", "--val-every", "100000", "--log-every", "1", "--num-workers", "0",
            "--no-progress", "--out-dir", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "gradreg_fast.train", *args], env=_subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_log.csv").is_file() or len(_rows(out / "train_log.csv")) < 4:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    kept = torch.load(out / "last.pt", weights_only=True)
    assert kept["step"] >= 3
    resumed = Trainer(TrainConfig(**{**config_from_args(args).to_dict(), "steps": kept["step"] + 1,
                                     "resume": "auto"}))
    assert resumed.step == kept["step"]
    resumed.fit()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == kept["step"] + 1


# -- learning ------------------------------------------------------------------------------------------


def test_short_training_lowers_the_loss_and_raises_dice_on_held_out_pairs(tmp_path):
    """The gated dual-branch net, trained briefly on synthetic 32^3 pairs, registers pairs it has never
    seen: the validation loss drops and the mean Dice beats the identity's by a clear margin.

    Settings for a short CPU run: a tiny net, a learning rate well above the paper's 1e-5, weaker
    regularisation, and MIND (radius 1) rather than MIND-SSC, whose radius-2, dilation-2 patches are
    too coarse for 32^3 volumes.
    """
    config = TrainConfig(model="gated", enc=(4, 8, 8, 8), dec=8, refine=(), shape=(32, 32, 32), displacement=0.12,
                         train_pairs=64, val_pairs=8, descriptor="mind", beta=0.1, gamma=0.1, lr=3e-3,
                         batch_size=2, steps=150, log_every=10, val_every=150, checkpoint_every=150, num_workers=1,
                         progress=False, out_dir=str(tmp_path / "run"), seed=0)
    trainer = Trainer(config)
    untrained = trainer.validate()
    trainer.fit()
    trained = trainer.metrics
    assert trained["dice_before"] == untrained["dice_before"]  # the same held-out pairs
    assert abs(untrained["dice"] - untrained["dice_before"]) < 0.005  # a fresh net is near the identity
    assert trained["dice"] - trained["dice_before"] >= 0.03, trained
    assert trained["loss"] < untrained["loss"] - 0.005, (untrained, trained)
    assert trained["folding_pct"] < 1.0
    losses = [float(r["loss"]) for r in _rows(tmp_path / "run" / "train_log.csv")]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.01, losses


def test_resume_between_log_rows_writes_the_same_rows(tmp_path, monkeypatch):
    """log_every (2) does not divide checkpoint_every (3): a run killed after step 5 and resumed from its
    step-3 checkpoint must rewrite rows 4, 6, 7 as the uninterrupted run wrote them (row 4 averages steps
    3 and 4, so the interval in progress at the checkpoint has to travel in it)."""
    from gradreg_fast.train import trainer as trainer_module

    kept = {}
    real_save = trainer_module.save_checkpoint

    def save_and_keep(payload, path):
        real_save(payload, path)
        if Path(path).name == "last.pt":
            kept[payload["step"]] = Path(path).read_bytes()

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_and_keep)
    settings = dict(log_every=2, checkpoint_every=3, val_every=100, steps=7)
    Trainer(_config(tmp_path, **settings)).fit()
    out = tmp_path / "run"
    columns = ("step", "loss", "isim", "gsim", "igreg", "greg", "lr")
    whole = [{k: r[k] for k in columns} for r in _rows(out / "train_log.csv")]
    assert [int(r["step"]) for r in whole] == [2, 4, 6, 7]
    (out / "last.pt").write_bytes(kept[3])  # as if killed after step 5: the last checkpoint is step 3's
    Trainer(_config(tmp_path, resume="auto", **settings)).fit()
    assert [{k: r[k] for k in columns} for r in _rows(out / "train_log.csv")] == whole


def test_checkpoint_model_config_is_checked_before_building(tmp_path, monkeypatch):
    """A checkpoint's model_config is bounded, and its weights must fit it, before any network is built
    from it (a hostile config of huge widths must not allocate first)."""
    from gradreg_fast.train.checkpoint import MAX_WIDTH, check_model_config, save_checkpoint

    train(_config(tmp_path, steps=1))
    good = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    built = []
    real_build = checkpoint_module.build_model
    monkeypatch.setattr(checkpoint_module, "build_model",
                        lambda **cfg: built.append(str(torch.empty(0).device)) or real_build(**cfg))
    cases = {
        "huge": ({**good["model_config"], "dec": MAX_WIDTH + 1}, f"1..{MAX_WIDTH}"),
        "many": ({**good["model_config"], "refine": [4] * 100}, "at most"),
        "unknown key": ({**good["model_config"], "depth": 3}, "keys"),
        "name": ({**good["model_config"], "name": "resnet"}, "model name"),
        "not a dict": ([1, 2], "mapping"),
        "other widths": ({**good["model_config"], "enc": [8, 8, 8, 8]}, "do not fit"),
    }
    for label, (config, message) in cases.items():
        path = tmp_path / f"{label}.pt"
        save_checkpoint({key: value for key, value in good.items() if key != "format"} | {"model_config": config},
                        path)
        built.clear()
        with pytest.raises(ValueError, match=message):
            load_checkpoint(path)
        assert set(built) <= {"meta"}, label  # refused before a network was built (meta: no memory)
    without = {key: value for key, value in good.items() if key not in ("format", "model")}
    save_checkpoint(without, tmp_path / "no_weights.pt")
    with pytest.raises(ValueError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "no_weights.pt")
    model, info = load_checkpoint(tmp_path / "run" / "last.pt")  # a real one still loads
    assert info["step"] == 1 and check_model_config(model.config) == model.config
    with pytest.raises(ValueError, match=f"1..{MAX_WIDTH}"):
        TrainConfig(enc=(4, 4, 4, 4), dec=4, refine=(MAX_WIDTH * 4,))  # the configuration has the same bounds


def test_a_resumed_run_removes_temporaries_a_killed_one_left(tmp_path):
    train(_config(tmp_path, steps=1))
    out = tmp_path / "run"
    debris = [out / ".last.pt.a1b2_c3d.tmp", out / ".best.pt.zz99yy88.tmp", out / ".train_log.csv.q1w2e3r4.tmp"]
    keep = [out / ".last.pt.notes", out / "my.last.pt.a1b2c3d4.tmp"]  # not the trainer's pattern
    for path in debris + keep:
        path.write_bytes(b"half")
    train(_config(tmp_path, steps=2, resume="auto"))
    assert [p.exists() for p in debris] == [False] * 3 and all(p.exists() for p in keep)


def test_nifti_data_is_checked_before_the_first_step(tmp_path):
    import nibabel as nib
    import numpy as np
    from test_cli import write_case

    for name in ("a", "b"):
        write_case(tmp_path / "train" / name)
    bad = write_case(tmp_path / "val" / "v")
    labels = nib.load(str(bad["fixed_labels"]))
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj)[:-2], labels.affine), str(bad["fixed_labels"]))
    config = _config(tmp_path, data="nifti", train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
                     steps=4, val_every=4)
    with pytest.raises(ValueError, match="case 'v': fixed_labels do not lie on the fixed image's grid"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


def test_validation_folding_counts_folded_voxels_per_item():
    from gradreg_fast.train.evaluation import folding_percentage

    shape = (3, 5, 7, 6)
    smooth = 0.05 * torch.randn(*shape)
    mirror = torch.zeros(shape)  # u_0 = -2 x_0: x_0 -> -x_0, det J = -1 at every voxel
    mirror[0] = -2 * torch.arange(5.0).view(5, 1, 1)
    broken = smooth.clone()
    broken[1, 2, 3, 4] = float("nan")
    flows = torch.stack([smooth, mirror, broken]).transpose(3, 4).contiguous().transpose(3, 4)  # non-contiguous
    assert not flows.is_contiguous()
    folded = folding_percentage(flows)
    assert folded.shape == (3,) and folded[0] == 0 and folded[1] == 100 and torch.isnan(folded[2])
    with pytest.raises(ValueError, match="flow"):
        folding_percentage(flows[0])
