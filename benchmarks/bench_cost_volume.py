"""mind_cost_volume: the fused CPU op against the naive reference (pad, one shifted copy per
displacement, block mean), at ConvexAdam's search radius r = 4 (729 displacements) on 12-channel
descriptors. Time (median of several calls) and peak memory (each case in a fresh process).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_cost_volume.py [--cases pooled dense grid2] [--out results.json]

Cases (the registration engine's shapes):

* ``pooled``: 1x12x22x16x6 control points, grid 1 (pooled descriptors of the bundled pair);
* ``dense``: 1x12x48x48x48, grid 1;
* ``grid2``: 1x12x96x96x32, grid 2 (finer descriptors averaged over 2x2x2 blocks).

Passes: ``fwd`` (what the convex search runs) on every case, and ``fwd_bwd`` on ``pooled`` (the naive
backward of the larger cases keeps 729 descriptor-sized intermediates alive: gigabytes).

The malloc settings above keep freed memory for reuse, as benchmarks/run_cpu.sh does for the other
timings. Peak memory is measured as benchmarks/peak_memory.py does: a child process per case, with
small blocks returned to the OS at once (``MALLOC_MMAP_THRESHOLD_=65536``), reporting the peak resident
size increase of a warm call over imports + inputs.

The same cases run under pytest-benchmark with
``python -m pytest benchmarks/bench_cost_volume.py --benchmark-only`` (file named explicitly: it is not
collected with benchmarks/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    "pooled": ((1, 12, 22, 16, 6), 1),
    "dense": ((1, 12, 48, 48, 48), 1),
    "grid2": ((1, 12, 96, 96, 32), 2),
}
RADIUS = 4
IMPLS = ("fused", "naive")
PASSES = {"pooled": ("fwd", "fwd_bwd"), "dense": ("fwd",), "grid2": ("fwd",)}
TIME_BUDGET_S = 1.5
MIN_CALLS, MAX_CALLS = 3, 30


def build(case: str, impl: str, pass_: str):
    """A zero-argument callable running one call of the case on inputs allocated here."""
    import torch

    import gradreg_fast
    from gradreg_fast import reference

    shape, grid = CASES[case]
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(shape, generator=gen)
    moving = torch.rand(shape, generator=gen)
    if impl == "fused":
        fn = lambda f, m: gradreg_fast.mind_cost_volume(f, m, RADIUS, 1, grid, backend="cpu")  # noqa: E731
    else:
        fn = lambda f, m: reference.mind_cost_volume(f, m, RADIUS, 1, grid)  # noqa: E731
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(fixed, moving)
        return run
    leaves = (fixed.requires_grad_(), moving.requires_grad_())

    def run_backward():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run_backward


def time_case(run) -> dict:
    run()  # first touch of the output and of torch's allocator caches
    seconds = []
    start = time.perf_counter()
    while len(seconds) < MIN_CALLS or (len(seconds) < MAX_CALLS and time.perf_counter() - start < TIME_BUDGET_S):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "calls": len(seconds)}


def check_case(case: str, pass_: str) -> None:
    """The fused op equals the naive one on the benchmarked inputs (untimed)."""
    import torch

    fused, naive = build(case, "fused", pass_)(), build(case, "naive", pass_)()
    for a, b in zip(fused if isinstance(fused, tuple) else (fused,), naive if isinstance(naive, tuple) else (naive,)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _warm_up() -> None:
    """Call both implementations once on a tiny volume, forward and backward: the first call of a
    custom op imports several hundred torch modules, which belongs to importing, not to the case."""
    import torch

    import gradreg_fast
    from gradreg_fast import reference

    f, m = torch.rand(1, 2, 3, 3, 3, requires_grad=True), torch.rand(1, 2, 3, 3, 3, requires_grad=True)
    (gradreg_fast.mind_cost_volume(f, m, 1, backend="cpu").sum() + reference.mind_cost_volume(f, m, 1).sum()).backward()


def child(spec: dict) -> dict:
    from peak_memory import _measure_call

    _warm_up()
    run = build(spec["case"], spec["impl"], spec["pass_"])
    first_call = _measure_call(run)
    steady = _measure_call(run)
    return {**spec, "first_call_bytes": first_call, "steady_bytes": steady}


def peak_memory(spec: dict, timeout_s: float = 900.0) -> dict:
    from peak_memory import MEMORY_MALLOC_ENV

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, **MEMORY_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(here), here, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", help="JSON file for the figures")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    rows = []
    for case in args.cases:
        for pass_ in PASSES[case]:
            check_case(case, pass_)
            for impl in IMPLS:
                row = {"case": case, "shape": "x".join(map(str, CASES[case][0])), "grid": CASES[case][1],
                       "pass_": pass_, "impl": impl, **time_case(build(case, impl, pass_))}
                if not args.no_memory:
                    row["steady_bytes"] = peak_memory({"case": case, "impl": impl, "pass_": pass_})["steady_bytes"]
                rows.append(row)
                memory = f"{row['steady_bytes'] / 2**20:9.1f} MiB" if "steady_bytes" in row else ""
                print(f"{case:7s} {pass_:8s} {impl:6s} median {row['median_s'] * 1e3:9.1f} ms  min "
                      f"{row['min_s'] * 1e3:9.1f} ms ({row['calls']} calls)  peak +{memory}", file=sys.stderr,
                      flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, radius {RADIUS} (729 displacements)\n")
    print("| case | shape, grid | pass | fused median | naive median | speed-up | fused peak | naive peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for fused, naive in zip(rows[::2], rows[1::2]):
        peaks = ("", "")
        if "steady_bytes" in fused:
            peaks = tuple(f"{r['steady_bytes'] / 2**20:.1f} MiB" for r in (fused, naive))
        print(f"| {fused['case']} | {fused['shape']}, g={fused['grid']} | {fused['pass_']} | "
              f"{fused['median_s'] * 1e3:.1f} ms | {naive['median_s'] * 1e3:.1f} ms | "
              f"{naive['median_s'] / fused['median_s']:.1f}x | {peaks[0]} | {peaks[1]} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "radius": RADIUS, "rows": rows}, f, indent=2)
    return 0


# ------------------------------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case, pass_", [(c, p) for c in CASES for p in PASSES[c]])
    def test_cost_volume(benchmark, case, pass_, impl):
        run = build(case, impl, pass_)
        run()
        benchmark.pedantic(run, rounds=MIN_CALLS, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
