"""Settings sweep on the validation set: one table row per FieldSettings override.

Each row registers every case of benchmarks/validation.py (six same-subject cases with a known deformation,
twelve inter-subject cases, the bundled pair) with ``register()`` (overrides on top of the defaults, as
validation.settings_with reads them) and, as a capture-range check, the two-organ phantom pair of
tests/test_register.py (its organs differ by more than the validation cases' residuals after the affine stage).

Columns: same-subject means (Dice, endpoint error mm, SDlogJ), the inter-subject cases' mean Dice, the figure of
the cases that choose the defaults (validation.CHOOSING: every case but the bundled pair; validation.choosing_mean
weighs the same-subject and inter-subject means 2:1), the bundled pair's Dice (reported, never used to choose),
the phantom's Dice, the largest folding % of any case, and, against
ConvexAdam on the fixed image's own grid in a reference run of bench_peers.py (``--reference``; a case it lacks
is left out, with a note), the largest ratios of core time and of SDlogJ. Rows of benchmarks/results/engine_sweeps.md come from
here.

Usage::

    python benchmarks/sweep.py '{}' '{"alpha": 0}' ... [--threads 2] [--no-phantom] [--reference FILE]
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

# ConvexAdam on the fixed image's own grid, from a run of benchmarks/run_engine.sh that holds every case (sweep 10
# read the 19:22 run's, which holds only the six same-subject cases and the pair; sweeps 11-12 the 20:47 run's,
# which lacks the nine inter-subject cases sweep 12 added).
REFERENCE = HERE / "results" / "engine_peers_native_2026-11-30_2350.json"


def phantom_files(folder: Path) -> dict:
    """The two-organ phantom pair of tests/test_register.py, written to ``folder``."""
    from test_register import phantom_pair

    return phantom_pair(folder)


def row(overrides: dict, cases: dict, phantom: dict | None, reference: dict) -> dict:
    from gradreg_fast.register import register

    settings = validation.settings_with(overrides)
    rows = {name: validation.run_gradreg(files, settings) for name, files in cases.items()}
    same = [rows[n] for n in rows if n in validation.SAME_NAMES]
    out = {key: float(np.mean([r[key] for r in same])) for key in ("dice", "epe_body_mm", "sd_log_jacobian")} \
        if same else {}
    inter = [rows[n]["dice"] for n in rows if n in validation.INTER_NAMES]
    if inter:
        out["inter_dice"] = float(np.mean(inter))
    choosing = {n: rows[n]["dice"] for n in rows if n in validation.CHOOSING}
    if choosing:
        out["choosing_dice"] = validation.choosing_mean(choosing)
    if "bundled" in rows:
        out["bundled_dice"] = rows["bundled"]["dice"]
    out["max_folding_percent"] = float(max(r["folding_percent"] for r in rows.values()))
    compared = [n for n in rows if "ConvexAdam" in reference.get(n, {})]
    if len(compared) < len(rows):
        print(f"note: no ConvexAdam reference for {sorted(set(rows) - set(compared))}: the time and SDlogJ ratios leave "
              "them out", file=sys.stderr)
    if compared:
        out["max_core_ratio"] = float(max(rows[n]["core_s"] / reference[n]["ConvexAdam"]["core_s"] for n in compared))
        out["max_sdlogj_ratio"] = float(max(rows[n]["sd_log_jacobian"] / reference[n]["ConvexAdam"]["sd_log_jacobian"]
                                            for n in compared))
    if phantom is not None:
        result = register(phantom["fixed"], phantom["moving"], phantom["fixed_labels"], phantom["moving_labels"],
                          settings, label_names={1: "a", 2: "b"}, device="cpu", progress=False)
        out["phantom_dice"] = result.metrics["stages"]["after"]["mean_dice"]
    out["cases"] = rows
    return out


COLUMNS = ("dice", "epe_body_mm", "sd_log_jacobian", "inter_dice", "choosing_dice", "bundled_dice", "phantom_dice",
           "max_folding_percent", "max_core_ratio", "max_sdlogj_ratio")
HEADERS = ("same Dice", "same EPE", "same SDlogJ", "inter Dice", "choosing (2:1)", "bundled Dice (reported)",
           "phantom Dice", "max fold %", "max core / ConvexAdam", "max SDlogJ / ConvexAdam")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="JSON objects of overrides, one per row")
    parser.add_argument("--cases", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-phantom", action="store_true")
    parser.add_argument("--json", default=None, help="append each row as one JSON line here")
    parser.add_argument("--reference", default=str(REFERENCE),
                        help="bench_peers.py JSON with ConvexAdam's rows (core time and SDlogJ ratios)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cases = validation.all_cases(args.cases.split(",") if args.cases else None)
    reference = json.loads(Path(args.reference).read_text())
    print("| overrides | " + " | ".join(HEADERS) + " |")
    print("|---" * (len(HEADERS) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        phantom = None if args.no_phantom else phantom_files(Path(tmp))
        for text in args.overrides:
            result = row(json.loads(text), cases, phantom, reference)
            cells = [f"{result[k]:.4f}" if k in result else "-" for k in COLUMNS]
            print(f"| `{text}` | " + " | ".join(cells) + " |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"overrides": json.loads(text), **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
