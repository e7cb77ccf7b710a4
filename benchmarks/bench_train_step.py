"""Training-step time and peak memory of DualBranchNet: fused ops against the naive reference ops.

One training step = forward of the gated dual-branch net (two VoxelMorph U-Nets, gradient maps, two
warps), the loss of eq. 2 (two MIND-SSC similarities, two regularisers), backward and an Adam step,
at 1x1x144x144x128 by default. Each backend runs in its own process, so that its peak memory is its
own: the peak resident set size (``resource.getrusage(...).ru_maxrss``) on CPU, and
``torch.cuda.max_memory_allocated`` on a GPU. "Above baseline" subtracts the memory held before the
first step (interpreter, torch, model, inputs).

    python benchmarks/bench_train_step.py                       # fused vs reference, CPU or GPU
    python benchmarks/bench_train_step.py --shape 64,64,64 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# "fused": the package picks its compiled core for the device (the default, backend="auto").
BACKENDS = {"fused": "auto", "reference": "reference"}


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(args) -> dict:
    import torch

    import gradreg_fast
    from gradreg_fast.losses import RegistrationLoss
    from gradreg_fast.models import DualBranchNet

    device = torch.device(args.device)
    shape = tuple(args.shape)
    torch.manual_seed(0)
    gradreg_fast.set_backend(BACKENDS[args.backend])
    model = DualBranchNet(fusion=args.fusion).to(device)
    loss_fn = RegistrationLoss(preset="abdomen")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    # Smooth random images: what the ops do does not depend on the content.
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((2, 1, *(max(2, s // 8) for s in shape)), generator=generator)
    images = torch.nn.functional.interpolate(images, size=shape, mode="trilinear", align_corners=True)
    moving, fixed = images[:1].contiguous().to(device), images[1:].contiguous().to(device)

    def step():
        output = model(moving, fixed)
        loss, _ = loss_fn(output, moving, fixed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        synchronize()
        baseline = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _rss_mib()
    for _ in range(args.warmup):
        step()
    synchronize()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"backend": args.backend, "device": str(device), "shape": list(shape), "times_s": times,
            "median_s": statistics.median(times), "peak_mib": peak, "baseline_mib": baseline,
            "loss": float(loss), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="144,144,128", help="D,H,W (default: 144,144,128)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per backend (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--fusion", default="gated", choices=("gated", "average"))
    parser.add_argument("--backends", default="fused,reference", help="comma-separated, of: fused, reference")
    parser.add_argument("--worker", choices=tuple(BACKENDS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.shape = [int(v) for v in args.shape.split(",")]
    if len(args.shape) != 3 or min(args.shape) < 1:
        parser.error(f"--shape must be three positive ints, got {args.shape}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        args.backend = args.worker
        print(json.dumps(worker(args)))
        return 0

    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"--backends: unknown {sorted(unknown)}; choose from {sorted(BACKENDS)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    results = []
    for backend in backends:
        command = [sys.executable, __file__, "--worker", backend, "--shape", ",".join(map(str, args.shape)),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                   "--fusion", args.fusion]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    if not results:
        return 1
    first = results[0]
    memory = "GPU memory allocated" if first["device"].startswith("cuda") else "peak RSS"
    print(f"DualBranchNet({args.fusion}) training step, input 1x1x{'x'.join(map(str, args.shape))}, "
          f"device {first['device']}, {first['threads']} threads, {args.warmup} warm-up + {args.steps} timed steps")
    print(f"| backend | step time, median (s) | all steps (s) | {memory} (MiB) | above baseline (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} |")
    by_name = {r["backend"]: r for r in results}
    if {"fused", "reference"} <= set(by_name):
        fused, ref = by_name["fused"], by_name["reference"]
        print(f"fused vs reference: {ref['median_s'] / fused['median_s']:.2f}x faster, "
              f"{(ref['peak_mib'] - ref['baseline_mib']) / max(fused['peak_mib'] - fused['baseline_mib'], 1):.2f}x "
              f"less memory above baseline; losses {fused['loss']:.6f} vs {ref['loss']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
