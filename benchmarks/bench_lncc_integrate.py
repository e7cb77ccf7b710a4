"""lncc_loss and integrate_velocity against the naive code they replace, on the CPU (issue 14).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_lncc_integrate.py [--size main|small|quick] [--repeats 3]

Cases, each forward plus backward (the gradient w.r.t. the warped image / the velocity, with a fixed
upstream gradient) and forward alone:

* LNCC: ``gradreg_fast.lncc_loss(warped, fixed, window=9)`` (CPU core) against the naive code, VoxelMorph's
  NCC with its five conv3d box sums (``gradreg_fast.reference.lncc_loss``).
* Integration: ``gradreg_fast.integrate_velocity(v, steps=7)`` (CPU core) against VoxelMorph's VecInt chain
  of seven ``grid_sample`` calls (``gradreg_fast.reference.integrate_velocity_grid_sample``), on a smooth
  random velocity of up to 8 voxels per axis.

Time: the median (and the minimum) of ``--repeats`` calls after one warm-up call, in this process (torch
threads from BENCH_THREADS, default 2), the fused and the naive call alternating, so that a change of the
machine's load between calls hits both alike. Peak memory: each case in a fresh process (benchmarks/peak_memory.py's
method: peak resident-size increase over imports + inputs during a second, warm call, with
MALLOC_MMAP_THRESHOLD_=65536 so that the resident size follows the live tensors). The load average is
printed with the figures: other work on the machine slows both sides, not always equally.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

TIMING_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
SIZES = {"main": (144, 144, 128), "small": (96, 96, 96), "quick": (24, 21, 19)}
PASSES = ("fwd", "fwd_bwd")
SEED = 1234
VELOCITY_VOXELS = 8.0


def build(case: str, pass_: str, size):
    """A zero-argument callable doing exactly the measured work, with its inputs allocated."""
    import torch

    import gradreg_fast
    from gradreg_fast import reference

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    gen = torch.Generator().manual_seed(SEED)
    op, impl = case.split(":")
    grad = pass_ == "fwd_bwd"
    if op == "lncc":
        fixed = torch.rand((1, 1, *size), generator=gen)
        warped = (0.8 * fixed + 0.2 * torch.rand((1, 1, *size), generator=gen)).requires_grad_(grad)
        fn = (lambda w: gradreg_fast.lncc_loss(w, fixed, 9, backend="cpu")) if impl == "fused" else \
            (lambda w: reference.lncc_loss(w, fixed, 9))
        inputs, upstream = warped, None
    else:
        # A smooth velocity (as a network or an optimiser gives), up to VELOCITY_VOXELS per axis.
        coarse = torch.randn((1, 3, *(max(2, s // 16) for s in size)), generator=gen)
        velocity = torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
        velocity = (velocity * (VELOCITY_VOXELS / velocity.abs().amax())).requires_grad_(grad)
        fn = (lambda v: gradreg_fast.integrate_velocity(v, 7, backend="cpu")) if impl == "fused" else \
            (lambda v: reference.integrate_velocity_grid_sample(v, 7))
        inputs, upstream = velocity, torch.randn((1, 3, *size), generator=gen)
    if not grad:
        def run():
            with torch.no_grad():
                return fn(inputs)
    else:
        def run():
            out = fn(inputs)
            return torch.autograd.grad(out, inputs, upstream)
    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (the memory figures need Linux)")


def memory_child(case: str, pass_: str, size) -> dict:
    import torch

    import gradreg_fast

    # The first call of a custom op imports more of torch: part of importing, not of the case.
    tiny = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    torch.autograd.grad(gradreg_fast.lncc_loss(tiny, tiny.detach() + 1, 3), tiny)
    velocity = torch.rand(1, 3, 4, 4, 4, requires_grad=True)
    torch.autograd.grad(gradreg_fast.integrate_velocity(velocity).sum(), velocity)
    run = build(case, pass_, size)
    figures = []
    for _ in range(2):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        baseline = _status_kib("VmRSS")
        result = run()
        figures.append((_status_kib("VmHWM") - baseline) * 1024)
        del result
    return {"first_call_bytes": figures[0], "steady_bytes": figures[1]}


def measure_times(op: str, pass_: str, size, repeats: int) -> dict:
    """Seconds per call of the fused and the naive code, the two timed alternately (after one warm-up call
    each), so that a change in the machine's load between calls hits both sides alike."""
    runs = {impl: build(f"{op}:{impl}", pass_, size) for impl in ("fused", "naive")}
    for run in runs.values():
        run()
    times = {impl: [] for impl in runs}
    for _ in range(repeats):
        for impl, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="main", choices=tuple(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, size)))
        return 0
    if any(os.environ.get(k) != v for k, v in TIMING_MALLOC_ENV.items()):
        # Naive code allocates a fresh tensor per step; without these, glibc returns every large block to
        # the OS and each call pays page faults (see benchmarks/cases.py).
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                  {**os.environ, **TIMING_MALLOC_ENV})

    import torch

    import gradreg_fast

    print(f"torch {torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads, cpu isa "
          f"{gradreg_fast._C.cpu_isa()}, size 1x1x{'x'.join(map(str, size))}, load average before "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    env = {**os.environ, **MEMORY_MALLOC_ENV}
    results = {}
    for op in ("lncc", "integrate"):
        for pass_ in PASSES:
            times = measure_times(op, pass_, size, args.repeats)
            for impl in ("fused", "naive"):
                case = f"{op}:{impl}"
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--size", args.size,
                                       "--memory-child", case, pass_], env=env, capture_output=True, text=True,
                                      timeout=1200)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child {case} {pass_} failed:\n{proc.stderr[-3000:]}")
                memory = json.loads(proc.stdout.strip().splitlines()[-1])
                seconds = statistics.median(times[impl])
                results[f"{case}:{pass_}"] = {"seconds": seconds, "min_seconds": min(times[impl]), **memory}
                print(f"{case:18s} {pass_:8s} median {seconds * 1e3:9.1f} ms  min {min(times[impl]) * 1e3:9.1f} ms"
                      f"   peak +{memory['steady_bytes'] / 2**20:8.1f} MiB (first call "
                      f"+{memory['first_call_bytes'] / 2**20:.1f} MiB)   load {os.getloadavg()[0]:.2f}", flush=True)
    print("\nratios (naive / fused): time = speed-up, memory = fused peak / naive peak")
    targets = {"lncc": (50.0, 0.25), "integrate": (3.0, 0.5)}
    for op, (min_speedup, max_memory) in targets.items():
        for pass_ in PASSES:
            fused, naive = results[f"{op}:fused:{pass_}"], results[f"{op}:naive:{pass_}"]
            speedup = naive["seconds"] / fused["seconds"]
            memory = fused["steady_bytes"] / max(naive["steady_bytes"], 1)
            verdict = ""
            if pass_ == "fwd_bwd":
                ok = speedup >= min_speedup and memory <= max_memory
                verdict = f"   target >= {min_speedup:g}x, <= {max_memory:g}: {'PASS' if ok else 'FAIL'}"
            print(f"{op:10s} {pass_:8s} {speedup:7.1f}x faster   peak {memory:.3f} of naive{verdict}")
    print(f"load average after {os.getloadavg()[0]:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": size, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
