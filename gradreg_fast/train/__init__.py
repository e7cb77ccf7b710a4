"""Training: ``train(TrainConfig(...))``, ``python -m gradreg_fast.train`` / ``gradreg train``, and torchrun."""

from __future__ import annotations

import sys

from .checkpoint import load_checkpoint, read_checkpoint
from .config import TrainConfig, build_parser, config_from_args
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train", "load_checkpoint", "read_checkpoint", "cli_main", "build_parser"]


def cli_main(argv: list[str]) -> int:
    """``gradreg train`` / ``python -m gradreg_fast.train``: settings from ``--config`` and flags; 0 on success."""
    try:
        config = config_from_args(argv)
    except SystemExit as exc:  # argparse: --help, or an unknown flag (its message is already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"gradreg train: error: {exc}", file=sys.stderr)
        return 2
    from .._atomic import Terminated, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM (a scheduler's, torchrun's) cleans up like Ctrl-C
            best = train(config)
    except KeyboardInterrupt as exc:  # the trainer has removed its temporaries: one line, no traceback
        terminated = isinstance(exc, Terminated)
        print(f"gradreg train: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130  # 128 + the signal's number, as a shell reports it
    except (OSError, ValueError, MemoryError) as exc:  # a refused folder, checkpoint or data file: its message
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gradreg train: error: {message}", file=sys.stderr)
        return 1
    print(f"best checkpoint: {best}")
    return 0
