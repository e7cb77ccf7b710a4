"""gradreg's core time against ConvexAdam's (both grids), interleaved and repeated on every case.

bench_peers.py times each method once per case, and its own-grid peers in a later pass. On a shared 2-core machine
whose speed drifts (the 2026-12-02 14:xx run saw the same registration take 1.7 to 3.9 times as long as in an earlier
run, from case to case), one timing per method can put gradreg in a slow moment and a peer in a fast one. Here every
case is registered ``--repeats`` times by each method, in rounds whose order rotates (gradreg, ConvexAdam on the
working grid, on its own grid; then starting from the next), so that each method meets every phase of the drift; the
figures are the minimum (the least disturbed run) and the median per method, and the ratios of both.

Core times are bench_peers.py's: gradreg's registration stage of ``register()`` (images in memory); ConvexAdam's
``convex_adam_pt`` plus the centre-of-mass alignment it starts from. Dice is not recomputed here.

Usage::

    python benchmarks/core_ratio.py [--cases ...] [--held-out] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_peers  # noqa: E402
import validation  # noqa: E402

METHODS = ("gradreg", "ConvexAdam, working grid", "ConvexAdam, its own grid")


def core_seconds(method: str, files: dict, preps: dict) -> float:
    if method == "gradreg":
        return bench_peers.run_gradreg(files)["core_s"]
    prep = preps["working" if method.endswith("working grid") else "native"]
    return bench_peers.run_convexadam(prep)[1] + prep["init_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma-separated (default: every case of validation.py)")
    parser.add_argument("--held-out", action="store_true", help="the held-out cases instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    names = validation.HELD_OUT if args.held_out else args.cases.split(",") if args.cases else None
    cases = validation.all_cases(names)
    first = next(iter(cases.values()))  # warm-up, untimed, as in bench_peers.py
    bench_peers.run_gradreg(first)
    bench_peers.run_convexadam(bench_peers.prepare(first, "working"))
    rows, turn = {}, 0
    print("| case | " + " | ".join(f"{m} min / median (s)" for m in METHODS)
          + " | gradreg / ConvexAdam working (min, median) | gradreg / ConvexAdam own (min, median) |")
    print("|---" * (len(METHODS) + 3) + "|")
    for name, files in cases.items():
        preps = {grid: bench_peers.prepare(files, grid) for grid in ("working", "native")}
        times = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for k in range(len(METHODS)):
                method = METHODS[(turn + k) % len(METHODS)]
                times[method].append(core_seconds(method, files, preps))
            turn += 1
        row = {m: {"min": min(t), "median": statistics.median(t), "all": t} for m, t in times.items()}
        for peer, key in ((METHODS[1], "ratio_working"), (METHODS[2], "ratio_own")):
            row[key] = {"min": row["gradreg"]["min"] / row[peer]["min"],
                        "median": row["gradreg"]["median"] / row[peer]["median"]}
        rows[name] = row
        cells = [f"{row[m]['min']:.2f} / {row[m]['median']:.2f}" for m in METHODS]
        cells += [f"{row[k]['min']:.3f}, {row[k]['median']:.3f}" for k in ("ratio_working", "ratio_own")]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    for key in ("ratio_working", "ratio_own"):
        for stat in ("min", "median"):
            values = [row[key][stat] for row in rows.values()]
            print(f"{key} of the {stat}s: {min(values):.3f}-{max(values):.3f} over {len(values)} cases")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
