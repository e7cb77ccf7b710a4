"""gradreg against ANTs SyN on the bundled real abdominal CT (moving) -> MR (fixed) pair.

Both methods start from the NIfTI files and are scored the same way: the moving label map is carried
onto the fixed image's own grid by each method's transform (nearest / generic-label interpolation),
and :mod:`gradreg_fast.metrics` computes Dice, ASD and HD95 (mm) per organ against the fixed labels
(1 spleen, 2 right kidney, 3 left kidney, 5 liver; other ids are background). Runtimes are wall-clock
seconds of the registration alone (files already read), on the same machine and thread count.

ANTs SyN: ``ants.registration(type_of_transform="SyN")``, i.e. ANTs' centre-of-mass initialisation,
an affine stage and the SyN stage, with the Mattes mutual-information metric (``--metric``) for both
and explicit iterations that include the full resolution (``--syn-iterations``, default 100,70,50 at
shrink factors 4,2,1; ANTs' own default, 40,20,0, skips the full resolution).

antspyx is an optional dependency (``pip install 'gradreg_fast[ants]'``). It pins numpy < 2.4 and
scipy < 1.16, so install it in a virtual environment if the system has newer ones::

    python -m venv --system-site-packages /tmp/ants-env && /tmp/ants-env/bin/pip install antspyx
    /tmp/ants-env/bin/python benchmarks/bench_syn.py

gradreg's runtime is the median of ``--gradreg-runs`` registrations in one process; its one-time start-up
(the first custom-op call imports torch._dynamo) is timed and printed apart, as importing ANTs is for SyN.

Usage: python benchmarks/bench_syn.py [--threads 2] [--quick] [--json results.json] [--skip-syn] [--thorough]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (as in the test suite): on a shared machine spinning
# teams starve each other and gradreg's many small kernels slow down several times. Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

ORGANS = {1: "spleen", 2: "right kidney", 3: "left kidney", 5: "liver"}


def data_files() -> dict:
    from gradreg_fast.cli import demo_data_dir

    folder = demo_data_dir()
    return {role: folder / f"{name}.nii.gz" for role, name in
            (("fixed", "mr"), ("moving", "ct"), ("fixed_labels", "mr_labels"), ("moving_labels", "ct_labels"))}


def score(fixed_labels, warped_labels, spacing) -> dict:
    from gradreg_fast import metrics

    table = metrics.label_metrics(fixed_labels, warped_labels, spacing, list(ORGANS))
    means = {key: float(sum(v[key] for v in table.values()) / len(table)) for key in ("dice", "asd", "hd95")}
    return {"labels": {ORGANS[k]: v for k, v in table.items()}, **{f"mean_{k}": v for k, v in means.items()}}


def run_gradreg(files, quick: bool, thorough: bool = False) -> dict:
    from gradreg_fast.cli import demo_settings
    from gradreg_fast.register import register

    result = register(files["fixed"], files["moving"], files["fixed_labels"], files["moving_labels"],
                      demo_settings(quick=quick, thorough=thorough), label_names=ORGANS, device="cpu",
                      progress=False)
    stages = result.metrics["stages"]  # scored by the pipeline with gradreg_fast.metrics, as score() does
    table = lambda stage: {"labels": {v["name"]: v for v in stages[stage]["labels"].values()},  # noqa: E731
                           **{k: stages[stage][k] for k in ("mean_dice", "mean_asd", "mean_hd95")}}
    return {
        **{stage: table(stage) for stage in ("before", "initial", "affine", "after")},
        "runtime_s": result.timings["registration_s"],
        "startup_s": result.timings["startup_s"],
        "folding_percent": result.metrics["folding_percent"],
        "sd_log_jacobian": result.metrics["sd_log_jacobian"],
    }


def run_syn(files, metric: str, syn_iterations, quick: bool) -> dict:
    import ants
    import numpy as np

    from gradreg_fast import metrics
    from gradreg_fast.io import keep_labels, read_nifti

    fixed = ants.image_read(str(files["fixed"]))
    moving = ants.image_read(str(files["moving"]))
    fixed_labels = keep_labels(read_nifti(files["fixed_labels"]).data, ORGANS)
    moving_labels = ants.image_read(str(files["moving_labels"]))
    moving_labels = moving_labels.new_image_like(keep_labels(moving_labels.numpy(), ORGANS).astype(np.float32))
    spacing = np.asarray(fixed.spacing, dtype=float)
    iterations = (10, 5, 2) if quick else tuple(syn_iterations)
    tick = time.perf_counter()
    transform = ants.registration(fixed, moving, type_of_transform="SyN", aff_metric=metric, syn_metric=metric,
                                  reg_iterations=iterations)
    runtime = time.perf_counter() - tick
    warped = ants.apply_transforms(fixed, moving_labels, transform["fwdtransforms"], interpolator="genericLabel")
    warped = np.rint(warped.numpy()).astype(np.int64)
    if warped.shape != fixed_labels.shape:
        raise RuntimeError(f"ANTs returned labels of shape {warped.shape}, the fixed grid is {fixed_labels.shape}")
    out = {"after": score(fixed_labels, warped, spacing), "runtime_s": runtime, "iterations": list(iterations),
           "metric": metric}
    fields = [t for t in transform["fwdtransforms"] if t.endswith(".nii.gz")]
    if fields:  # the SyN warp field (ITK: displacement in mm, LPS) -> voxels of the fixed grid for the Jacobian
        field = np.asarray(ants.image_read(fields[0]).numpy(), dtype=np.float64)  # (X, Y, Z, 3)
        direction = np.asarray(fixed.direction) * spacing  # columns: world step of one voxel (LPS)
        voxels = np.einsum("ij,...j->i...", np.linalg.inv(direction), field)
        out["folding_percent"] = metrics.folding_percent(voxels)
        out["sd_log_jacobian"] = metrics.sd_log_jacobian(voxels)
    for path in set(transform["fwdtransforms"]) | set(transform["invtransforms"]):
        if os.path.exists(path) and path.startswith(("/tmp", os.path.realpath("/tmp"))):
            os.remove(path)
    return out


def row(name, entry) -> str:
    organs = " ".join(f"{entry['labels'][organ]['dice']:.3f}" for organ in ORGANS.values())
    return f"{name:<28} {entry['mean_dice']:>6.3f}  {organs}  {entry['mean_asd']:>7.2f} {entry['mean_hd95']:>7.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                        help="threads for both methods (torch and ITK)")
    parser.add_argument("--metric", default="mattes", choices=("mattes", "MI"), help="ANTs metric")
    parser.add_argument("--syn-iterations", default="100,70,50",
                        help="SyN iterations per level, coarse to fine (the last is the full resolution)")
    parser.add_argument("--syn-runs", type=int, default=3,
                        help="SyN runs (its affine stage samples points at random, so results vary a little)")
    parser.add_argument("--quick", action="store_true", help="a few iterations only (a smoke test)")
    parser.add_argument("--skip-syn", action="store_true", help="run gradreg only")
    parser.add_argument("--gradreg-runs", type=int, default=3, help="gradreg runs (the median time is compared)")
    parser.add_argument("--thorough", action="store_true", help="also run gradreg once with --thorough settings")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    files = data_files()
    print(f"pair: {files['moving'].name} (CT, moving) -> {files['fixed'].name} (MR, fixed); threads {args.threads}; "
          f"torch {torch.__version__}")
    results = {"threads": args.threads}
    syn = None
    if not args.skip_syn:
        try:
            import ants
        except ImportError as exc:
            print(f"ANTs SyN skipped: antspyx is not importable ({exc}). Install it with `pip install antspyx` "
                  "(in a virtual environment if your numpy >= 2.4 or scipy >= 1.16; see this file's docstring).")
        else:
            iterations = [int(v) for v in args.syn_iterations.split(",")]
            print(f"running ANTs SyN {args.syn_runs}x (antspyx {ants.__version__}, metric {args.metric}, "
                  f"iterations {iterations}) ...")
            syn = [run_syn(files, args.metric, iterations, args.quick) for _ in range(max(1, args.syn_runs))]
            results["syn"] = syn
    print(f"running gradreg {args.gradreg_runs}x ({'quick' if args.quick else 'default demo'} settings) ...")
    runs = [run_gradreg(files, args.quick) for _ in range(max(1, args.gradreg_runs))]
    # register() runs the custom ops once before its clock starts; only the first run pays for it.
    results["gradreg_startup_s"] = runs[0]["startup_s"]
    print(f"gradreg start-up (first custom-op call of the process, timed apart): {runs[0]['startup_s']:.2f} s")
    ours = runs[0]
    times = sorted(run["runtime_s"] for run in runs)
    ours["runtime_s"] = times[len(times) // 2]
    ours["runtimes_s"] = [run["runtime_s"] for run in runs]
    results["gradreg"] = ours
    thorough = None
    if args.thorough:
        print("running gradreg once with --thorough settings ...")
        thorough = results["gradreg_thorough"] = run_gradreg(files, args.quick, thorough=True)

    header = f"{'method':<28} {'Dice':>6}  " + " ".join(f"{n[:6]:>5}" for n in ORGANS.values()) + \
        f"  {'ASD mm':>7} {'HD95 mm':>7}   time s  fold %  SDlogJ"
    print()
    print(header)
    print("-" * len(header))
    for stage in ("before", "initial", "affine"):
        print(row(f"gradreg: {stage}", ours[stage]))
    print(row("gradreg: affine+deformable", ours["after"]) +
          f"  {ours['runtime_s']:7.2f}  {ours['folding_percent']:6.3f}  {ours['sd_log_jacobian']:6.3f}")
    if thorough is not None:
        print(row("gradreg --thorough", thorough["after"]) + f"  {thorough['runtime_s']:7.2f}  "
              f"{thorough['folding_percent']:6.3f}  {thorough['sd_log_jacobian']:6.3f}")
    if syn is not None:
        for n, run in enumerate(syn, 1):
            fold = run.get("folding_percent", math.nan)
            sd = run.get("sd_log_jacobian", math.nan)
            print(row(f"ANTs SyN ({run['metric']}) run {n}", run["after"]) +
                  f"  {run['runtime_s']:7.2f}  {fold:6.3f}  {sd:6.3f}")
        dice = [run["after"]["mean_dice"] for run in syn]
        times = [run["runtime_s"] for run in syn]
        mean_dice, mean_time = sum(dice) / len(dice), sum(times) / len(times)
        print()
        print(f"gradreg vs ANTs SyN (mean of {len(syn)} runs, range): mean organ Dice {ours['after']['mean_dice']:.3f} "
              f"vs {mean_dice:.3f} ({min(dice):.3f}-{max(dice):.3f}); runtime {ours['runtime_s']:.2f} s (median of "
              f"{len(ours['runtimes_s'])}) vs {mean_time:.1f} s ({min(times):.1f}-{max(times):.1f}), ratio "
              f"{ours['runtime_s'] / mean_time:.3f}")
    if args.json:
        from gradreg_fast.register.pipeline import write_json

        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
