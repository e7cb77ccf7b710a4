"""The bundled CT/MR pair from other starting positions: gradreg against ConvexAdam, paired, in one run.

The issue's pair target compares one registration of one case. How much of that figure is the starting position?
Each case of ``validation.PAIR_STARTS`` is the bundled pair with a random rigid offset (up to 4 degrees and 8 mm
per axis) in the CT's header; every method starts from the centre-of-mass alignment as in bench_peers.py and is
scored the same way (its ``score``). Methods: gradreg (defaults), ConvexAdam on the fixed image's own grid
("native", the pair target's reference) and on gradreg's working grid. Printed: a row per case and method, the
means over the starts (with their standard error), and the per-start differences gradreg minus each ConvexAdam.
These cases never choose a default (validation.CHOOSING leaves them out).

Usage::

    python benchmarks/pair_starts.py [--starts 10] [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_peers  # noqa: E402
import validation  # noqa: E402

METHODS = ("gradreg", "ConvexAdam (native grid)", "ConvexAdam (working grid)")
KEYS = ("dice", "folding_percent", "sd_log_jacobian", "core_s")


def run_case(files: dict) -> dict:
    rows = {"gradreg": bench_peers.run_gradreg(files)}
    for grid in ("native", "working"):
        prep = bench_peers.prepare(files, grid)
        flow, core = bench_peers.run_convexadam(prep)
        rows[f"ConvexAdam ({grid} grid)"] = {**bench_peers.score(prep, flow, files), "core_s": core + prep["init_s"]}
    return rows


def summary(rows: dict) -> str:
    """Markdown: a row per case and method, then over the cases other than ``bundled``: each method's means
    (Dice with its standard error) and gradreg's paired Dice differences against the other methods."""
    lines = ["| case | method | Dice | folding % | SDlogJ | core (s) |", "|---|---|---|---|---|---|"]
    for case, methods in rows.items():
        for method, row in methods.items():
            lines.append(f"| {case} | {method} | " + " | ".join(f"{row[k]:.3f}" for k in KEYS) + " |")
    starts = [case for case in rows if case != "bundled"]
    if not starts:
        return "\n".join(lines)
    lines.append("")
    for method in dict.fromkeys(m for case in starts for m in rows[case]):
        values = [rows[case][method] for case in starts if method in rows[case]]
        dice = np.array([v["dice"] for v in values])
        error = dice.std(ddof=1) / math.sqrt(len(dice)) if len(dice) > 1 else math.nan
        means = ", ".join(f"{k} {np.mean([v[k] for v in values]):.3f}" for k in KEYS[1:])
        lines.append(f"- {method}, mean of {len(values)} starts: Dice {dice.mean():.4f} (standard error "
                     f"{error:.4f}), {means}")
    for method in dict.fromkeys(m for case in starts for m in rows[case] if m != "gradreg"):
        theirs = {case: rows[case][method] for case in starts if method in rows[case] and "gradreg" in rows[case]}
        ours = {case: rows[case]["gradreg"] for case in theirs}
        lines.append(f"- gradreg minus {method}, " + validation.paired(theirs, ours, "dice"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=len(validation.PAIR_STARTS),
                        help=f"how many of the pair's other starts (1..{len(validation.PAIR_STARTS)}; default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.starts <= len(validation.PAIR_STARTS):
        parser.error(f"--starts must be 1..{len(validation.PAIR_STARTS)}, got {args.starts}")
    import torch

    torch.set_num_threads(args.threads)
    names = ["bundled"] + [spec.name for spec in validation.PAIR_STARTS[:args.starts]]
    cases = validation.all_cases(names)
    run_case(cases["bundled"])  # warm-up, untimed: first-use imports and thread start (as bench_peers.py does)
    rows = {}
    for name, files in cases.items():
        rows[name] = run_case(files)
        print(name, {m: round(r["dice"], 4) for m, r in rows[name].items()}, flush=True)
    bench_peers.report(rows, summary(rows), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
