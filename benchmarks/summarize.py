"""One summary of the CPU benchmarks: median times, peak memory, and each target of the issues.

    python benchmarks/summarize.py out/bench-cpu/timings.json [out/bench-cpu/peak_memory.json] [--out FILE] [--check]

``timings.json`` is pytest-benchmark's ``--benchmark-json`` of benchmarks/test_bench_*.py;
``peak_memory.json`` is written by benchmarks/peak_memory.py. Speed-ups are a baseline's median
divided by the fused median (higher is better); a memory ratio is the fused peak over the baseline's.
With ``--check`` the exit status is 1 when a target is missed or could not be evaluated (never in
quick mode, whose tiny volumes say nothing about the targets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

IMPL_ORDER = ("fused", "eager", "compiled", "grid_sample")
IMPL_LABEL = {"fused": "fused", "eager": "naive eager", "compiled": "naive compiled", "grid_sample": "grid_sample"}
OP_ORDER = ("gradient_magnitude", "warp", "mind_ssc", "mind_loss")
PASS_LABEL = {"fwd": "fwd", "fwd_bwd": "fwd+bwd", "fwd_bwd_flow": "fwd+bwd(flow)"}
SIZE_ORDER = ("small", "main", "large")

# (op, pass, baseline, minimum speed-up of fused over the baseline), all at the "main" size.
SPEED_TARGETS = (
    ("gradient_magnitude", "fwd_bwd", "eager", 5.0),
    ("gradient_magnitude", "fwd_bwd", "compiled", 1.5),
    ("warp", "fwd_bwd", "grid_sample", 3.0),
    ("warp", "fwd", "grid_sample", 2.0),
    ("mind_ssc", "fwd_bwd", "eager", 15.0),
    ("mind_loss", "fwd_bwd", "eager", 15.0),
)
# (op, pass, baseline, maximum fused peak / baseline peak).
MEMORY_TARGETS = (
    ("mind_ssc", "fwd", "eager", 1 / 3),
    ("mind_ssc", "fwd_bwd", "eager", 1 / 3),
    ("mind_loss", "fwd_bwd", "eager", 1 / 3),
)


def load_timings(path: str):
    """({(op, pass, size): {impl: median seconds}}, {(op, pass, size): shape}, settings)."""
    with open(path) as f:
        data = json.load(f)
    medians, shapes = {}, {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue  # not one of ours
        key = (info["op"], info["pass"], info["size"])
        medians.setdefault(key, {})[info["impl"]] = bench["stats"]["median"]
        shapes[key] = info["shape"]
    return medians, shapes, data.get("machine_info", {}).get("gradreg_bench", {})


def load_memory(path: str):
    """({(op, pass): {impl: steady peak bytes}}, raw json)."""
    with open(path) as f:
        data = json.load(f)
    peaks = {}
    for case in data["cases"]:
        peaks.setdefault((case["op"], case["pass"]), {})[case["impl"]] = case["steady_bytes"]
    return peaks, data


def _order(key):
    op, pass_, *size = key
    rank = lambda seq, v: seq.index(v) if v in seq else len(seq)  # noqa: E731
    return (rank(OP_ORDER, op), rank(tuple(PASS_LABEL), pass_), *(rank(SIZE_ORDER, s) for s in size))


def _table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731,E501
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def timing_section(medians, shapes):
    impls = [i for i in IMPL_ORDER if any(i in m for m in medians.values())]
    baselines = [i for i in impls if i != "fused"]
    header = ["op", "pass", "shape"] + [f"{IMPL_LABEL[i]} ms" for i in impls] + [f"vs {IMPL_LABEL[b]}" for b in baselines]
    rows = []
    for key in sorted(medians, key=_order):
        op, pass_, _ = key
        times = medians[key]
        row = [op, PASS_LABEL.get(pass_, pass_), "x".join(map(str, shapes[key]))]
        row += [f"{times[i] * 1e3:.2f}" if i in times else "-" for i in impls]
        row += [f"{times[b] / times['fused']:.2f}x" if b in times and "fused" in times else "-" for b in baselines]
        rows.append(row)
    return "Median time per call (lower is better); 'vs X' = X's median / fused median\n" + _table(header, rows)


def memory_section(peaks, size_shape):
    impls = [i for i in IMPL_ORDER if any(i in p for p in peaks.values())]
    baselines = [i for i in impls if i != "fused"]
    header = ["op", "pass"] + [f"{IMPL_LABEL[i]} MiB" for i in impls] + [f"fused/{IMPL_LABEL[b]}" for b in baselines]
    rows = []
    for key in sorted(peaks, key=_order):
        op, pass_ = key
        p = peaks[key]
        row = [op, PASS_LABEL.get(pass_, pass_)] + [f"{p[i] / 2**20:.1f}" if i in p else "-" for i in impls]
        row += [f"{p['fused'] / p[b]:.3f}" if b in p and "fused" in p and p[b] > 0 else "-" for b in baselines]
        rows.append(row)
    return (f"Peak RSS increase per call, fresh process per case, warm call ({size_shape}; lower is better)\n"
            + _table(header, rows))


def target_section(medians, peaks, quick):
    """The targets table and how many were missed (none in quick mode, where they are not evaluated)."""
    rows, missed = [], 0
    verdict = lambda ok: "(quick)" if quick else "PASS" if ok else "MISS"  # noqa: E731
    for op, pass_, baseline, minimum in SPEED_TARGETS:
        times = medians.get((op, pass_, "main"), {})
        if "fused" in times and baseline in times:
            value = times[baseline] / times["fused"]
            ok = value >= minimum
            measured = f"{value:.2f}x ({times[baseline] * 1e3:.1f} / {times['fused'] * 1e3:.1f} ms)"
        else:
            ok, measured = False, "not measured"
        missed += not ok
        rows.append([f"{op} {PASS_LABEL[pass_]}: fused vs {IMPL_LABEL[baseline]}", measured, f">= {minimum:g}x",
                     verdict(ok)])
    for op, pass_, baseline, maximum in MEMORY_TARGETS:
        p = peaks.get((op, pass_), {}) if peaks is not None else {}
        if "fused" in p and p.get(baseline, 0) > 0:
            value = p["fused"] / p[baseline]
            ok = value <= maximum
            measured = f"{value:.3f} ({p['fused'] / 2**20:.0f} / {p[baseline] / 2**20:.0f} MiB)"
        else:
            ok, measured = False, "not measured"
        missed += not ok
        rows.append([f"{op} {PASS_LABEL[pass_]}: fused peak / {IMPL_LABEL[baseline]} peak", measured,
                     f"<= {maximum:.3f}", verdict(ok)])
    title = "Targets (main size, same run)"
    if quick:
        title += " -- QUICK MODE: tiny volumes, these figures say nothing about the targets; not evaluated"
    return title + "\n" + _table(["target", "measured", "required", "result"], rows), 0 if quick else missed


def summarize(timings_path: str, memory_path: str | None):
    medians, shapes, settings = load_timings(timings_path)
    quick = bool(settings.get("quick"))
    parts = []
    env = settings.get("malloc_env", {})
    parts.append(f"torch {settings.get('torch', '?')}, {settings.get('threads', '?')} threads, quick={quick}, "
                 f"malloc env {env}")
    parts.append(timing_section(medians, shapes))
    peaks = None
    if memory_path:
        peaks, memory = load_memory(memory_path)
        quick = quick or bool(memory.get("quick"))
        main_shape = next((shapes[k] for k in shapes if k[2] == memory["size"]), None)
        parts.append(memory_section(peaks, "x".join(map(str, main_shape)) if main_shape else memory["size"]))
    targets, missed = target_section(medians, peaks, quick)
    parts.append(targets)
    return "\n\n".join(parts) + "\n", missed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("timings", help="pytest-benchmark --benchmark-json file")
    parser.add_argument("memory", nargs="?", help="peak_memory.py --out file")
    parser.add_argument("--out", help="also write the summary to this file (replaced atomically)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed or not measured")
    args = parser.parse_args(argv)
    text, missed = summarize(args.timings, args.memory)
    sys.stdout.write(text)
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".summary.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp creates it private
            os.replace(tmp, args.out)
        except BaseException:
            os.unlink(tmp)
            raise
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
