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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a gradreg_fast training checkpoint (format {FORMAT!r})")
    return checkpoint


def load_checkpoint(path, map_location="cpu"):
    """``(model, info)``: the network rebuilt from the checkpoint's own config, with its weights, in eval
    mode; ``info`` holds everything else but the weights and optimiser/RNG states (step, best,
    metrics, model_config, train_config, world_size)."""
    checkpoint = read_checkpoint(path, map_location)
    model = build_model(**checkpoint["model_config"])
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
