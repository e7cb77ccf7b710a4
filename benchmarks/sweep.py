"""Settings sweep on the validation set: one table row per FieldSettings override.

Each row registers the six same-subject cases and the bundled pair of benchmarks/validation.py with
``register()`` (overrides on top of the defaults, as validation.settings_with reads them) and, as a
capture-range check, the two-organ phantom pair of tests/test_register.py (its organs differ by more than
the validation cases' residuals after the affine stage). Columns: same-subject means (Dice, endpoint error
mm, folding %, SDlogJ, core s), the bundled pair (Dice, core s), the mean Dice of the seven cases, the
phantom's Dice. Rows of benchmarks/results/engine_sweeps.md come from here.

Usage::

    python benchmarks/sweep.py '{}' '{"alpha": 0}' ... [--threads 2] [--no-phantom]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import validation  # noqa: E402


def phantom_files(folder: Path) -> dict:
    """The two-organ phantom pair of tests/test_register.py, written to ``folder``."""
    from test_register import phantom_pair

    return phantom_pair(folder)


def row(overrides: dict, cases: dict, phantom: dict | None) -> dict:
    from gradreg_fast.register import register

    settings = validation.settings_with(overrides)
    rows = {name: validation.run_gradreg(files, settings) for name, files in cases.items()}
    same = [rows[n] for n in rows if n != "bundled"]
    out = {key: float(np.mean([r[key] for r in same])) for key in
           ("dice", "epe_body_mm", "folding_percent", "sd_log_jacobian", "core_s")}
    out["max_core_s"] = float(max(r["core_s"] for r in rows.values()))
    if "bundled" in rows:
        out["bundled_dice"], out["bundled_core_s"] = rows["bundled"]["dice"], rows["bundled"]["core_s"]
    out["mean7"] = float(np.mean([r["dice"] for r in rows.values()]))
    if phantom is not None:
        result = register(phantom["fixed"], phantom["moving"], phantom["fixed_labels"], phantom["moving_labels"],
                          settings, label_names={1: "a", 2: "b"}, device="cpu", progress=False)
        out["phantom_dice"] = result.metrics["stages"]["after"]["mean_dice"]
    out["cases"] = rows
    return out


COLUMNS = ("dice", "epe_body_mm", "folding_percent", "sd_log_jacobian", "core_s", "bundled_dice", "bundled_core_s",
           "max_core_s", "mean7", "phantom_dice")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="JSON objects of overrides, one per row")
    parser.add_argument("--cases", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-phantom", action="store_true")
    parser.add_argument("--json", default=None, help="append each row as one JSON line here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cases = validation.all_cases(args.cases.split(",") if args.cases else None)
    print("| overrides | same Dice | same EPE | same fold % | same SDlogJ | same core s | bundled Dice "
          "| bundled core s | max core s | mean of 7 | phantom Dice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        phantom = None if args.no_phantom else phantom_files(Path(tmp))
        for text in args.overrides:
            result = row(json.loads(text), cases, phantom)
            cells = [f"{result[k]:.4f}" if k in result else "-" for k in COLUMNS]
            print(f"| `{text}` | " + " | ".join(cells) + " |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"overrides": json.loads(text), **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
