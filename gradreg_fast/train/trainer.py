"""The training loop: Adam on eq. 2 of Xu et al. (ICASSP 2021), validation, checkpoints, logs, DDP.

One process, or one per GPU under ``torchrun --nproc_per_node=N`` (DistributedDataParallel, a
DistributedSampler, NCCL on GPUs and gloo on CPU). Rank 0 alone writes, into ``out_dir``:

    last.pt        the latest checkpoint (every ``checkpoint_every`` steps and at the end)
    best.pt        the checkpoint of the best validation (highest mean Dice; lowest validation loss
                   when the validation pairs have no labels)
    train_log.csv  step, the loss and its terms averaged over the last ``log_every`` steps (and over
                   processes), lr, seconds per step
    val_log.csv    step, validation loss, mean Dice after and before registration, folding percentage
    tensorboard/   the same scalars, where the ``tensorboard`` package is installed

Resuming (``resume=<checkpoint>`` or ``resume="auto"`` for ``<out_dir>/last.pt`` when it exists)
restores weights, Adam, the AMP scaler, the step, the best score and the RNG states, and skips the
samples already seen in the current epoch: the data order depends only on (seed, epoch) and each
pair only on its index, so the resumed run takes exactly the steps of an uninterrupted one. Log
rows written after the checkpoint by the interrupted run are dropped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .. import _backend
from ..data import NiftiPairs, SyntheticPairs
from ..losses import RegistrationLoss
from ..models import DualBranchNet, build_model
from .._atomic import atomic_write, is_temp_of, sigterm_as_interrupt
from .checkpoint import check_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .evaluation import folding_percentage, mean_dice, warp_labels

TERMS = ("isim", "gsim", "igreg", "greg")
VAL_COLUMNS = ("step", "loss", "dice", "dice_before", "folding_pct")


RUN_FILES = ("last.pt", "best.pt", "train_log.csv", "val_log.csv")  # what a run writes into its out_dir


class CsvLog:
    """Append-only CSV file with a header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns, resume_step: int | None):
        self.path, self.columns = path, list(columns)
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(path, lambda f: f.write(text.getvalue().encode()))

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(str(log_dir))


class Trainer:
    """``Trainer(config).fit()`` trains and returns the path of the best checkpoint.

    After ``fit``, ``model`` is the trained (unwrapped) network of this process.
    """

    def __init__(self, config: TrainConfig):
        config.validate()  # the dataclass may have been changed after construction
        self.config = config
        self.out_dir = Path(config.out_dir)
        self._init_distributed()

        torch.manual_seed(config.seed)
        self.model = build_model(**config.model_config()).to(self.device)
        self.network = DistributedDataParallel(self.model) if self.world_size > 1 else self.model
        self.loss_fn = RegistrationLoss(**config.loss_config())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp)
        self.train_set, self.val_set = self._datasets()
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(self.train_set)} pairs: too few for batch_size "
                             f"{config.batch_size} on {self.world_size} process(es)")

        self.step, self.best, self.metrics = 0, None, {}
        self.log_window = None  # a resumed run's partly filled log interval (see _loop)
        resume_from = self._resume_path()
        held = [name for name in RUN_FILES if (self.out_dir / name).exists()]
        if resume_from is None and held:
            how = ("pass resume='auto' (--resume auto) to continue it, or choose another out_dir" if "last.pt" in held
                   else "it has no last.pt to continue from: choose another out_dir, or move those files away")
            raise FileExistsError(f"{str(self.out_dir)!r} already holds a run ({', '.join(held)}): {how}")
        if resume_from is not None and held and resume_from.resolve().parent != self.out_dir.resolve():
            # resuming writes last.pt and the logs here: they would mix two runs
            raise FileExistsError(f"{str(self.out_dir)!r} holds another run ({', '.join(held)}) than the checkpoint "
                                  f"{str(resume_from)!r}: resume into the checkpoint's own folder or an empty one")
        if resume_from is not None:
            self._restore(read_checkpoint(resume_from), str(resume_from))
            if self.step >= config.steps and not (self.out_dir / "last.pt").exists():
                raise ValueError(f"the checkpoint {str(resume_from)!r} has trained {self.step} steps, all of the "
                                 f"{config.steps} asked for: nothing to do (raise steps to train on)")
        self.resumed_step = self.step if resume_from is not None else None
        if self.world_size > 1:
            # Rank 0 creates the logs as soon as fit starts: a rank still checking out_dir above would find them
            # and refuse the run as someone else's. Every rank checks before any rank writes.
            dist.barrier()

    # -- setup -----------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        config = self.config
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but CUDA is not available")
        if config.amp and self.device.type != "cuda":
            raise ValueError("amp=True needs a CUDA device (automatic mixed precision is for GPUs)")
        self.rank, self.owns_process_group = 0, False
        if self.world_size > 1:
            if self.device.type == "cuda":
                if self.device.index is not None:
                    raise ValueError("under torchrun, set device=cuda (or auto): each process takes cuda:LOCAL_RANK")
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.owns_process_group = True
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0

    def _datasets(self):
        config = self.config
        if config.data == "synthetic":
            # Different seeds: the validation pairs are never trained on.
            options = {"displacement": config.displacement}
            return (SyntheticPairs(config.train_pairs, config.shape, seed=config.seed, **options),
                    SyntheticPairs(config.val_pairs, config.shape, seed=config.seed + 1, **options))
        train_set, val_set = NiftiPairs(config.train_dir), NiftiPairs(config.val_dir)
        train_set.check(config.batch_size)  # headers only: a bad case fails here, not when it is drawn
        val_set.check(1)
        return train_set, val_set

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume is None:
            return None
        if resume == "auto":
            last = self.out_dir / "last.pt"
            return last if last.exists() else None
        return Path(resume)

    def _restore(self, checkpoint: dict, source: str = "checkpoint") -> None:
        check_checkpoint(checkpoint, source)
        if checkpoint["model_config"] != self.model.config:
            raise ValueError(f"the checkpoint holds model {checkpoint['model_config']}, but the configuration asks "
                             f"for {self.model.config}")
        missing = [key for key in ("optimizer", "scaler", "step", "best", "metrics", "rng") if key not in checkpoint]
        if missing:
            raise ValueError(f"{source}: not a training checkpoint to resume from: no {', '.join(missing)}")
        step, best, window = checkpoint["step"], checkpoint["best"], checkpoint.get("log_window")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{source}: its step must be an integer >= 0, got {step!r}")
        if best is not None and not (isinstance(best, dict) and best.get("metric") in ("dice", "loss")
                                     and isinstance(best.get("value"), (int, float))):
            raise ValueError(f"{source}: its best must be None or {{'metric': 'dice' or 'loss', 'value': a number, "
                             f"...}}, got {best!r}")
        count = window.get("count") if isinstance(window, dict) else None
        if window is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 0
                                       and isinstance(window.get("seconds"), (int, float))
                                       and (count == 0 or isinstance(window.get("sums"), torch.Tensor))):
            raise ValueError(f"{source}: its log_window must be None or an interval's count, seconds and sums, got "
                             f"{window!r}")
        self.model.load_state_dict(checkpoint["model"])
        try:  # the optimiser's, scaler's and random states are torch's own formats: their errors, named
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint["scaler"] is not None and self.config.amp:
                self.scaler.load_state_dict(checkpoint["scaler"])
            set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise ValueError(f"{source}: its optimiser, scaler or random state cannot be restored "
                             f"({type(exc).__name__}: {exc})") from None
        for group in self.optimizer.param_groups:  # the configured lr wins, e.g. to fine-tune
            group["lr"] = self.config.lr
        self.step, self.best, self.metrics = step, best, checkpoint["metrics"]
        self.log_window = window  # absent from checkpoints of earlier versions

    # -- training ------------------------------------------------------------------------------------
    def _batches(self, epoch: int, skip: int):
        """The epoch's batches of this process, without the first ``skip`` (already trained on)."""
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)[skip * self.config.batch_size:]
        return DataLoader(self.train_set, batch_size=self.config.batch_size, sampler=indices, drop_last=True,
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")

    def _forward(self, network, moving, fixed):
        with torch.autocast(self.device.type, enabled=self.config.amp):
            output = network(moving, fixed)
        return output, *self.loss_fn(output, moving, fixed)

    def _train_step(self, batch) -> dict[str, torch.Tensor]:
        moving = batch["moving"].to(self.device, non_blocking=True)
        fixed = batch["fixed"].to(self.device, non_blocking=True)
        _, loss, terms = self._forward(self.network, moving, fixed)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.detach(), **terms}

    def _mean_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation loss, Dice (after and before registration) and folding percentage over the
        validation pairs, which the processes share out."""
        self.model.eval()
        # loss, folding, pairs, Dice sum, Dice before sum, pairs with labels
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        for index in range(self.rank, len(self.val_set), self.world_size):
            item = self.val_set[index]
            moving, fixed = item["moving"][None].to(self.device), item["fixed"][None].to(self.device)
            output, loss, _ = self._forward(self.model, moving, fixed)
            sums[0] += loss.double()
            sums[1] += float(folding_percentage(output.flow).sum())
            sums[2] += 1
            if "moving_labels" in item and "fixed_labels" in item:
                moving_labels = item["moving_labels"][None].to(self.device)
                fixed_labels = item["fixed_labels"][None].to(self.device)
                after = mean_dice(warp_labels(moving_labels, output.flow), fixed_labels)
                before = mean_dice(moving_labels, fixed_labels)
                if not (after.isnan().any() or before.isnan().any()):
                    sums[3:] += torch.stack([after.sum(), before.sum(), after.new_tensor(1.0)])
        self.model.train()
        if self.world_size > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        metrics = {"loss": sums[0] / sums[2], "folding_pct": sums[1] / sums[2]}
        if sums[5] > 0:
            metrics.update(dice=sums[3] / sums[5], dice_before=sums[4] / sums[5])
        return metrics

    def _improved(self, metrics: dict) -> bool:
        metric = "dice" if "dice" in metrics else "loss"
        value = metrics[metric]
        if self.best is not None and self.best["metric"] == metric:
            better = value > self.best["value"] if metric == "dice" else value < self.best["value"]
            if not better:
                return False
        self.best = {"metric": metric, "value": value, "step": self.step}
        return True

    def _log_window(self, sums, count: int, started: float) -> dict:
        """The log interval in progress, averaged over processes (every process must call this), so that
        a run resumed from a checkpoint taken between two log rows writes the same next row."""
        if sums is not None:
            sums = self._mean_over_processes(sums).cpu()
        return {"sums": sums, "count": count, "seconds": time.perf_counter() - started}

    def _checkpoint(self, log_window: dict | None = None) -> dict:
        return {
            "log_window": log_window,
            "model_config": self.model.config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.config.amp else None,
            "step": self.step,
            "best": self.best,
            "metrics": self.metrics,
            "train_config": self.config.to_dict(),
            "rng": rng_state(),
            "world_size": self.world_size,
        }

    def fit(self) -> Path:
        config = self.config
        previous_backend = _backend._default_backend  # restored on exit: the setting is process-wide
        if config.backend is not None:
            _backend.set_backend(config.backend)
        logs = progress = tensorboard = None
        stack = contextlib.ExitStack()
        stack.enter_context(sigterm_as_interrupt())  # SIGTERM (a scheduler's, torchrun's) cleans up like Ctrl-C
        try:
            if self.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._remove_stale_temporaries()
                terms = TERMS if isinstance(self.model, DualBranchNet) else ("isim", "igreg")
                train_columns = ["step", "loss", *terms, "lr", "seconds_per_step"]
                logs = {"train": CsvLog(self.out_dir / "train_log.csv", train_columns, self.resumed_step),
                        "val": CsvLog(self.out_dir / "val_log.csv", VAL_COLUMNS, self.resumed_step)}
                tensorboard = _tensorboard_writer(self.out_dir / "tensorboard")
                progress = tqdm(total=config.steps, initial=self.step, disable=not config.progress, desc="train",
                                dynamic_ncols=True)
            self._loop(logs, progress, tensorboard)
            if self.world_size > 1:
                dist.barrier()  # every rank returns once rank 0 has written its last file
        finally:
            for closable in (progress, tensorboard):
                if closable is not None:
                    closable.close()
            _backend.set_backend(previous_backend)
            if self.owns_process_group:
                dist.destroy_process_group()
            stack.close()
        return self.out_dir / "best.pt"

    def _remove_stale_temporaries(self) -> None:
        """Hidden temporaries of this run's files that a killed process (SIGKILL, power loss) could not
        remove; any other process would have its own out_dir."""
        for entry in self.out_dir.iterdir():
            if any(is_temp_of(name, entry.name) for name in RUN_FILES):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()

    def _loop(self, logs, progress, tensorboard) -> None:
        config = self.config
        sums, count, started = None, 0, time.perf_counter()
        if self.log_window is not None and self.log_window["count"] > 0:
            sums = self.log_window["sums"].to(self.device)
            count = self.log_window["count"]
            started -= self.log_window["seconds"]
        while self.step < config.steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            for batch in self._batches(epoch, skip):
                values = self._train_step(batch)
                self.step += 1
                count += 1
                stacked = torch.stack([v.float() for v in values.values()])
                sums = stacked if sums is None else sums + stacked
                last = self.step == config.steps
                if self.step % config.log_every == 0 or last:
                    means = self._mean_over_processes(sums / count).tolist()
                    row = {"step": self.step, **dict(zip(values, means)), "lr": self.optimizer.param_groups[0]["lr"],
                           "seconds_per_step": (time.perf_counter() - started) / count}
                    if not math.isfinite(row["loss"]):
                        raise FloatingPointError(f"the training loss is {row['loss']} at step {self.step}; "
                                                 f"lower the learning rate (lr={config.lr})")
                    if self.is_main:
                        logs["train"].write(row)
                        progress.set_postfix({k: f"{row[k]:.4g}" for k in values})
                        if tensorboard is not None:
                            for key in values:
                                tensorboard.add_scalar(f"train/{key}", row[key], self.step)
                    sums, count, started = None, 0, time.perf_counter()
                validating = self.step % config.val_every == 0 or last
                checkpointing = self.step % config.checkpoint_every == 0 or last
                window = self._log_window(sums, count, started) if validating or checkpointing else None
                if validating:
                    self.metrics = self.validate()
                    improved = self._improved(self.metrics)
                    if self.is_main:
                        logs["val"].write({"step": self.step, **self.metrics})
                        summary = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
                        progress.write(f"step {self.step}: {summary}")
                        if tensorboard is not None:
                            for key, value in self.metrics.items():
                                tensorboard.add_scalar(f"val/{key}", value, self.step)
                        if improved:
                            save_checkpoint(self._checkpoint(window), self.out_dir / "best.pt")
                if self.is_main and checkpointing:
                    save_checkpoint(self._checkpoint(window), self.out_dir / "last.pt")
                if self.is_main:
                    progress.update(1)
                if last:
                    break


def train(config: TrainConfig) -> Path:
    """Train with ``config``; the path of the best checkpoint (``<out_dir>/best.pt``)."""
    return Trainer(config).fit()
