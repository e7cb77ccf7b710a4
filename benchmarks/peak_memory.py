"""Peak memory of the benchmarked cases, each in a fresh process.

    python benchmarks/peak_memory.py --out out/bench-cpu/peak_memory.json [--ops warp mind_ssc] [--size main]

Every case of ``cases.py`` (op x implementation x pass) at one size runs in its own subprocess, so
nothing one case allocates or caches can lower or raise another's figure. The child:

1. imports torch and gradreg_fast, calls each fused op once on a 4^3 volume (the first call of any
   custom op imports several hundred more torch modules), and allocates the inputs;
2. resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), reads the resident size (VmRSS),
   runs the case once and reads the peak (VmHWM): ``first_call`` is that peak minus that baseline,
   i.e. the peak increase over imports + inputs. For ``compiled`` it includes compiling;
3. frees that call's results, resets the counter again, and does the same for a second call:
   ``steady``, the figure compared (a warm call, as in a training loop; compiling excluded).

The children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (not the timing setting): every block of 64 KiB
or more is then mapped on allocation and unmapped on free, so the resident size follows the live
tensors and a freed block cannot hide the next call's peak. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

MEMORY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
DEFAULT_OPS = ("gradient_magnitude", "warp", "mind_ssc", "mind_loss")
# fwd_bwd_flow of warp is a subset of fwd_bwd's work; it is timed, not measured here.
DEFAULT_PASSES = {"warp": ("fwd", "fwd_bwd")}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (peak_memory.py needs Linux)")


def _reset_peak() -> None:
    # "5" resets VmHWM to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _measure_call(run) -> int:
    """Peak resident-size increase, in bytes, over the current resident size, during one call of ``run``."""
    gc.collect()
    _reset_peak()
    baseline = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    del result
    gc.collect()
    return (peak - baseline) * 1024


def _finish_imports() -> None:
    """Call every fused op once on a tiny volume, forward and backward.

    The first call of any torch.library custom op imports several hundred more torch modules (about
    150 MiB resident); that is part of importing, not of the case, so it happens before the baseline.
    """
    import torch

    import gradreg_fast

    vol = torch.rand(1, 1, 4, 4, 4, requires_grad=True)
    flow = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    total = gradreg_fast.gradient_magnitude(vol, backend="cpu").sum() + gradreg_fast.warp(vol, flow, backend="cpu").sum()
    total = total + gradreg_fast.mind_ssc(vol, backend="cpu").sum() + gradreg_fast.mind_loss(vol, vol.detach() + 1,
                                                                                             backend="cpu")
    total.backward()


def child(spec: dict) -> dict:
    import cases  # imported here: the parent never loads torch's kernels itself

    _finish_imports()
    case = cases.Case(**spec)
    run = case.build()
    first_call = _measure_call(run)
    steady = _measure_call(run)
    return {**case.info(), "first_call_bytes": first_call, "steady_bytes": steady}


def run_child(spec: dict, env: dict, timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json_atomically(path: str, data) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".peak_memory.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp creates it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file to write (replaced atomically); required")
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=DEFAULT_OPS)
    parser.add_argument("--size", default="main", help="a size name of cases.SIZES (default: main)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.out:
        parser.error("--out is required")

    # The children import gradreg_fast from where this process finds it, and cases.py from here.
    import gradreg_fast

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gradreg_fast.__file__)))
    env = {**os.environ, **MEMORY_MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)

    import cases

    if args.size not in cases.SIZES:
        parser.error(f"--size must be one of {tuple(cases.SIZES)}, got {args.size!r}")
    results = []
    for op in args.ops:
        for pass_ in DEFAULT_PASSES.get(op, cases.PASSES[op]):
            for impl in cases.IMPLS[op]:
                spec = {"op": op, "impl": impl, "pass_": pass_, "size": args.size}
                result = run_child(spec, env, args.timeout)
                results.append(result)
                print(f"{op:20s} {pass_:8s} {impl:12s} peak +{result['steady_bytes'] / 2**20:9.1f} MiB "
                      f"(first call +{result['first_call_bytes'] / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
    write_json_atomically(args.out, {"quick": cases.QUICK, "threads": cases.THREADS, "size": args.size,
                                     "malloc_env": MEMORY_MALLOC_ENV, "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
