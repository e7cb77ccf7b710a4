"""Checkpoints: atomic writes, self-describing contents, loading with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so that
``torch.load(path, weights_only=True)`` reads it:

    format        FORMAT, to recognise the file
    model_config  ``model.config``: ``build_model(**model_config)`` rebuilds the network
    model         the network's state_dict
    optimizer     the Adam state_dict
    scaler        the AMP GradScaler state_dict, or None
    step          optimiser steps taken
    best          {"metric", "value", "step"} of the best validation so far, or None
    metrics       the last validation's measures
    train_config  TrainConfig.to_dict() of the run
    rng           random states of torch (CPU and CUDA), numpy and Python's random
    world_size    number of processes that trained it
    log_window    the log interval in progress (process-mean sums, count, seconds), for an exact resume

``model_config`` is checked against sane bounds, and the weights' shapes against it, before a network
is built from it (:func:`check_checkpoint`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_write
from ..models import build_model

FORMAT = "gradreg_fast.train.checkpoint/1"


def save_checkpoint(payload: dict, path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict, read with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch's own text goes on to suggest weights_only=False: never advice for a file of unknown origin
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        first_line = first_line.split(" Re-running `torch.load`")[0].strip()
        raise ValueError(f"{str(path)!r} is not a readable checkpoint (it was read with weights_only=True, as "
                         f"every checkpoint here is): {first_line}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a gradreg_fast training checkpoint (format {FORMAT!r})")
    return checkpoint


MAX_WIDTH = 1024  # channels of any conv: far beyond any trained registration net, far below a memory bomb
MAX_REFINE = 16  # full-resolution refinement convs
MODEL_KEYS = ("name", "enc", "dec", "refine")


def check_model_config(config, source: str = "model_config") -> dict:
    """``config`` if it describes a network of sane size (known name, the right number of widths, each
    1..MAX_WIDTH, at most MAX_REFINE refinement convs), else a ValueError naming the bad entry. Checked
    before anything is built: a hostile or corrupt checkpoint must not allocate gigabytes first."""
    from ..models import MODELS
    from ..models.unet import LEVELS

    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model configuration must be a mapping, got {type(config).__name__}")
    unknown = set(config) - set(MODEL_KEYS)
    if unknown or "name" not in config:
        raise ValueError(f"{source}: the model configuration must have the keys {MODEL_KEYS} (name required), "
                         f"got {sorted(map(str, config))}")
    if config["name"] not in MODELS:
        raise ValueError(f"{source}: model name must be one of {MODELS}, got {config['name']!r}")

    def widths(key, value, count=None, allow_int=False):
        if allow_int and isinstance(value, int) and not isinstance(value, bool):
            value = [value] * LEVELS
        if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count):
            raise ValueError(f"{source}: `{key}` must be a list of {count or 'up to ' + str(MAX_REFINE)} widths, "
                             f"got {value!r}")
        if len(value) > MAX_REFINE or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WIDTH
                                              for v in value):
            raise ValueError(f"{source}: `{key}` widths must be integers in 1..{MAX_WIDTH} (at most {MAX_REFINE} "
                             f"of them), got {value!r}")

    for key, count, allow_int in (("enc", LEVELS, False), ("dec", LEVELS, True), ("refine", None, False)):
        if key in config:
            widths(key, config[key], count, allow_int)
    return config


def check_checkpoint(checkpoint: dict, source: str = "checkpoint") -> dict:
    """The model configuration of a checkpoint dict, after checking it (:func:`check_model_config`) and
    that the stored weights have exactly the shapes that network has (found on the meta device, where
    building allocates nothing)."""
    for key in ("model_config", "model"):
        if key not in checkpoint:
            raise ValueError(f"{source}: the checkpoint has no {key!r} entry")
    config = check_model_config(checkpoint["model_config"], source)
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{source}: the checkpoint's 'model' entry must map parameter names to tensors")
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(**config).state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in state.items()}
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        wrong = sorted(n for n in set(stored) & set(expected) if stored[n] != expected[n])
        detail = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for what, names in (("missing", missing), ("unexpected", extra),
                                               ("wrong shape", wrong)) if names)
        raise ValueError(f"{source}: the weights do not fit the model configuration {config} ({detail})")
    return config


def load_checkpoint(path, map_location="cpu"):
    """``(model, info)``: the network rebuilt from the checkpoint's own config, with its weights, in eval
    mode; ``info`` holds everything else but the weights and optimiser/RNG states (step, best,
    metrics, model_config, train_config, world_size). The configuration and the weights' shapes are
    checked (:func:`check_checkpoint`) before the network is built."""
    checkpoint = read_checkpoint(path, map_location)
    config = check_checkpoint(checkpoint, str(path))
    model = build_model(**config)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    info = {k: v for k, v in checkpoint.items() if k not in ("format", "model", "optimizer", "scaler", "rng")}
    return model, info


def rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
