"""Training configuration: one flat dataclass, filled from defaults, a YAML/TOML file, then CLI flags.

Every field is also a configuration-file key and a CLI flag (``out_dir`` <-> ``--out-dir``). Values
from a file or the command line go through the same coercion and checks, so that a bad value gives
the same clear error wherever it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._backend import BACKENDS
from ..data.synthetic import SyntheticPairs
from ..losses import PRESETS, RegistrationLoss
from ..models import MODELS, build_model
from ..models.unet import LEVELS
from .checkpoint import check_model_config

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib


def _option(default, kind: str, help: str):
    """A field with its coercion kind and help text (shown by ``--help``)."""
    return field(default=default, metadata={"kind": kind, "help": help})


@dataclass
class TrainConfig:
    # Model.
    model: str = _option("gated", "str", f"network: one of {MODELS}")
    enc: tuple = _option((16, 32, 32, 32), "ints", f"encoder widths ({LEVELS} ints)")
    dec: object = _option(32, "int_or_ints", f"decoder width (an int, or {LEVELS} ints)")
    refine: tuple = _option((16, 16), "ints", "widths of the full-resolution refinement convs")
    # Loss (eq. 2 of the paper).
    preset: str = _option("abdomen", "optional_str", f"loss weights preset: {tuple(PRESETS)} or none")
    alpha: float = _option(None, "optional_float", "weight of L_gsim (overrides the preset)")
    beta: float = _option(None, "optional_float", "weight of L_greg (overrides the preset)")
    gamma: float = _option(None, "optional_float", "weight of L_igreg (overrides the preset)")
    descriptor: str = _option("ssc", "str", "MIND descriptor of the similarity terms: ssc or mind")
    # Data.
    data: str = _option("synthetic", "str", "synthetic or nifti")
    shape: tuple = _option((64, 64, 64), "ints", "synthetic: volume size D,H,W")
    train_pairs: int = _option(1000, "int", "synthetic: number of training pairs")
    val_pairs: int = _option(8, "int", "synthetic: number of held-out validation pairs")
    displacement: float = _option(0.08, "float", "synthetic: largest deformation, fraction of each axis")
    train_dir: str = _option(None, "optional_str", "nifti: folder of training cases <case>/{fixed,moving}.nii.gz")
    val_dir: str = _option(None, "optional_str", "nifti: folder of validation cases (label files give Dice)")
    # Optimisation.
    lr: float = _option(1e-5, "float", "Adam learning rate (the paper's 1e-5 by default)")
    steps: int = _option(20000, "int", "number of optimiser steps in total")
    batch_size: int = _option(1, "int", "pairs per step and process")
    num_workers: int = _option(2, "int", "data loader worker processes (0: load in the main process)")
    # Schedule.
    log_every: int = _option(10, "int", "steps between log rows (averaged over the interval)")
    val_every: int = _option(500, "int", "steps between validations (and always at the last step)")
    checkpoint_every: int = _option(500, "int", "steps between checkpoints (and always at the last step)")
    # Run.
    out_dir: str = _option("runs/train", "str", "folder of checkpoints and logs")
    resume: str = _option(None, "optional_str", "checkpoint to resume from, or 'auto' for <out_dir>/last.pt")
    seed: int = _option(0, "int", "seed of initialisation, data order and synthetic data")
    device: str = _option("auto", "str", "auto, cpu, cuda or cuda:N")
    amp: bool = _option(False, "bool", "automatic mixed precision (CUDA only)")
    backend: str = _option(None, "optional_str", "gradreg_fast op backend (auto, cpu, cuda, triton, reference)")
    progress: bool = _option(True, "bool", "show a progress bar")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.metadata["kind"]))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        _choice("model", self.model, MODELS)
        # The constructors check their own arguments; building them here makes a bad value fail at once
        # (on the meta device: no memory, whatever the widths), then the widths get an upper bound.
        with torch.device("meta"):
            build_model(**self.model_config())
        check_model_config(self.model_config(), "configuration")
        RegistrationLoss(**self.loss_config())
        _choice("data", self.data, ("synthetic", "nifti"))
        if self.data == "synthetic":
            SyntheticPairs(1, self.shape, displacement=self.displacement)
        elif self.train_dir is None or self.val_dir is None:
            raise ValueError("data='nifti' needs both `train_dir` and `val_dir`")
        for name in ("train_pairs", "val_pairs", "steps", "batch_size", "log_every", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {self.num_workers}")
        if not 0 <= self.seed < 2 ** 63:  # torch.manual_seed's range
            raise ValueError(f"`seed` must be >= 0 and below 2**63, got {self.seed}")
        if not self.lr > 0:  # finite already (_coerce)
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if not (self.device in ("auto", "cpu", "cuda")
                or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"`device` must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _choice("backend", self.backend, BACKENDS + (None,))

    def model_config(self) -> dict:
        return {"name": self.model, "enc": list(self.enc), "dec": self.dec, "refine": list(self.refine)}

    def loss_config(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "preset": self.preset,
                "descriptor": self.descriptor}

    def to_dict(self) -> dict:
        """Plain values only (lists, not tuples), loadable by :meth:`from_dict` and weights_only."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "configuration") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in {source}{hint}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        return cls.from_dict(read_config_file(path), source=str(path))


def read_config_file(path) -> dict:
    """The key/value mapping of a .yaml/.yml or .toml file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {str(path)!r} does not exist")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
    elif path.suffix == ".toml":
        values = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"configuration file {str(path)!r} must end in .yaml, .yml or .toml")
    if not isinstance(values, dict):
        raise ValueError(f"configuration file {str(path)!r} must hold a mapping of keys to values")
    return values


def _choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


def _int(name, value) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"`{name}` must be an integer, got {value!r}")


def _coerce(name: str, value, kind: str):
    """``value`` (from Python, YAML, TOML or a CLI string) as the field's type, or a clear error."""
    if kind.startswith("optional_"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        kind = kind[len("optional_"):]
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r}")
        return value
    if kind == "int":
        return _int(name, value)
    if kind == "float":
        # PyYAML reads "1e-5" (no dot) as a string: accept numeric strings.
        try:
            number = float(value) if isinstance(value, str) or (isinstance(value, (int, float))
                                                                  and not isinstance(value, bool)) else None
        except (ValueError, OverflowError):  # OverflowError: an int beyond float, like 10**400
            number = None
        if number is None or not math.isfinite(number):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    if kind in ("ints", "int_or_ints"):
        if kind == "int_or_ints" and (isinstance(value, int) or (isinstance(value, str) and "," not in value)):
            return _int(name, value)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list of integers (or 'a,b,c'), got {value!r}")
        return tuple(_int(name, v) for v in value)
    raise AssertionError(f"unknown kind {kind}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradreg train",
        description="Train a registration network (the gradient-guided dual-branch net of Xu et al., ICASSP "
                    "2021, or a VoxelMorph baseline). Settings: defaults < --config file < flags. Multi-GPU: "
                    "torchrun --nproc_per_node=N -m gradreg_fast.train ...",
    )
    parser.add_argument("--config", help="YAML or TOML file of settings (keys as the flags, with underscores)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.metadata["kind"] == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    """Defaults, updated by ``--config``'s file, updated by the flags given."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    values = read_config_file(path) if path else {}
    values.update(args)
    return TrainConfig.from_dict(values, source=path or "flags")
