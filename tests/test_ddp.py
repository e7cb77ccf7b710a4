"""Multi-process training: 2 CPU processes under torchrun with gloo, DistributedDataParallel."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import gradreg_fast

REPO = Path(gradreg_fast.__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import os, sys, time
    import torch
    from gradreg_fast.train import TrainConfig, Trainer

    out = sys.argv[1]
    if os.environ["RANK"] == "1":  # a slow process: rank 0 must not start writing the run while rank 1 checks it
        datasets = Trainer._datasets
        Trainer._datasets = lambda self: (time.sleep(1.0), datasets(self))[1]
    config = TrainConfig(model="gated", enc=(4, 4, 4, 4), dec=4, refine=(), shape=(16, 16, 16), train_pairs=2,
                         val_pairs=2, descriptor="mind", lr=1e-2, steps=24, log_every=1, val_every=12,
                         checkpoint_every=12, num_workers=0, progress=False, device="cpu", out_dir=out + "/run")
    trainer = Trainer(config)
    assert trainer.world_size == 2 and trainer.network is not trainer.model  # wrapped in DDP
    first_epoch = (trainer.sampler.set_epoch(0), list(trainer.sampler))[1]
    trainer.fit()
    rank = int(os.environ["RANK"])
    torch.save({"params": trainer.model.state_dict(), "indices": first_epoch}, f"{out}/rank{rank}.pt")
""")


def test_two_cpu_processes_train_one_model(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    # The failing rank's traceback comes first in stderr, torchrun's summary of it last.
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:4000] + "\n...\n" + result.stderr[-1500:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for (name, a), b in zip(rank0["params"].items(), rank1["params"].values()):
        assert torch.equal(a, b), f"{name} differs between the ranks"
    # The DistributedSampler gave each process its own pair.
    assert len(rank0["indices"]) == len(rank1["indices"]) == 1
    assert sorted(rank0["indices"] + rank1["indices"]) == [0, 1]

    out = tmp_path / "run"
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and checkpoint["step"] == 24
    for name, value in checkpoint["model"].items():  # rank 0 wrote the same weights
        assert torch.equal(value, rank0["params"][name]), name
    # Rank 0 alone wrote the logs (one row per step, each averaged over both processes).
    with open(out / "train_log.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 24
    # Every step sees both pairs (one per process), so the logged losses are comparable step to step.
    assert sum(losses[-3:]) < 0.96 * sum(losses[:3]), losses
