"""Reproduce the comparison of Xu et al. (ICASSP 2021), Table 1 / Fig. 4, on synthetic and real data.

Methods: Moving (no deformable registration), ANTs SyN (optional antspyx), VM, VM(concat),
Ours(average), Ours(gated). The four networks are trained with identical settings, data and seeds on
the synthetic multimodal generator (train / validation / test splits are disjoint generator seeds)
and evaluated on held-out synthetic pairs and on the bundled real CT (moving) / MR (fixed) pair; on
the real pair each network also gets an instance-optimisation ("+IO") variant: the trained network
fine-tuned on that one pair for ``--io-iters`` steps under the same loss.

Every finished (dataset, method, seed) writes one JSON file under ``<out>/raw/`` at once, and the
report (``<out>/table.md``, ``<out>/boxplot_dice.png``, ``<out>/qualitative_*.png``) is rebuilt after
each seed, so a run that is cut short still leaves a report of what finished; a rerun with the same
``--out`` skips the finished parts. ``--report-only`` rebuilds the report from ``raw/``.

    python experiments/run_comparison.py                       # the 2-core CPU configuration
    python experiments/run_comparison.py --preset paper        # full sizes and iterations (GPU)
    python experiments/run_comparison.py --preset smoke --out /tmp/smoke --no-syn   # seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from gradreg_fast import warp  # noqa: E402
from gradreg_fast.data.synthetic import SyntheticPairs  # noqa: E402
from gradreg_fast.io import Grid, Scan, normalize_intensity, pair_on_grid, read_nifti  # noqa: E402
from gradreg_fast.losses import RegistrationLoss  # noqa: E402
from gradreg_fast.metrics import folding_percent, label_metrics, sd_log_jacobian  # noqa: E402
from gradreg_fast.register.affine import axial_axis, moments_init, optimize_affine  # noqa: E402
from gradreg_fast.train import TrainConfig, Trainer, load_checkpoint  # noqa: E402

NETWORKS = {"vm": "VM", "vm_concat": "VM(concat)", "average": "Ours(average)", "gated": "Ours(gated)"}
REFERENCES = {"moving": "Moving", "syn": "SyN"}
# The paper's claimed ordering, best first; checked pairwise in the report.
PAPER_ORDER = ("gated", "average", "vm_concat", "vm", "syn", "moving")
REAL_ORGANS = {1: "spleen", 2: "kidney R", 3: "kidney L", 5: "liver"}
REAL_DATA_DIRS = (REPO / "gradreg_fast" / "data" / "abdomen", Path("/work/shared/data/abdomen-ct-mr"))

PRESETS = {
    # A shared 2-core CPU: 32^3 volumes (the U-Net pads to multiples of 16 anyway), narrow networks,
    # 150 steps, the real pair at 6 mm, one thread (with other jobs on the cores, two OpenMP threads
    # measured 2-6x slower than one).
    "cpu": dict(size=32, steps=150, lr=1e-3, enc=(8, 16, 16, 16), dec=16, refine=(8, 8), train_pairs=24,
                val_pairs=2, test_pairs=3, io_iters=15, real_spacing=6.0, affine_iters=(150, 75),
                seeds=(0, 1, 2), syn_iters=(40, 20, 0), threads=1),
    # Full size on a GPU: VoxelMorph widths, the paper's learning rate, 20k steps, 3 mm real grid.
    "paper": dict(size=160, steps=20000, lr=1e-5, enc=(16, 32, 32, 32), dec=32, refine=(16, 16), train_pairs=1000,
                  val_pairs=8, test_pairs=20, io_iters=200, real_spacing=3.0, affine_iters=(150, 75),
                  seeds=(0, 1, 2), syn_iters=(100, 70, 50), threads=max(1, os.cpu_count() or 1)),
    # For the smoke test: everything runs, nothing is learnt.
    "smoke": dict(size=16, steps=2, lr=1e-3, enc=(4, 4, 4, 4), dec=4, refine=(4,), train_pairs=2, val_pairs=1,
                  test_pairs=1, io_iters=1, real_spacing=12.0, affine_iters=(3, 2), seeds=(0,), syn_iters=(5, 0, 0),
                  threads=1),
}


# ------------------------------------------------------------------------------------------- helpers

def write_json(path: Path, payload) -> None:
    """Atomic write: a run killed mid-write never leaves a half file that a rerun would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def warp_labels(labels: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """(1, D, H, W) integer labels warped by a (1, 3, D, H, W) voxel flow, nearest neighbour."""
    return warp(labels[None].float(), flow, mode="nearest").round().long()[0]


def evaluate(flow: torch.Tensor, moving_labels, fixed_labels, spacing, organs, seconds: float) -> dict:
    """Per-organ Dice / ASD / HD95 (mm), folding % and SDlogJ of one network registration of one pair."""
    return evaluate_labels(warp_labels(moving_labels, flow), fixed_labels, flow, spacing, organs, seconds)


def evaluate_labels(warped_labels, fixed_labels, flow, spacing, organs, seconds: float) -> dict:
    """The same, for warped labels computed elsewhere (ANTs warps its own)."""
    per_label = label_metrics(warped_labels[0].numpy(), fixed_labels[0].numpy(), spacing=spacing, labels=list(organs))
    return {"organs": {str(k): v for k, v in per_label.items()}, "folding_pct": folding_percent(flow[0]),
            "sdlogj": sd_log_jacobian(flow[0]), "seconds": seconds}


# ------------------------------------------------------------------------------------------- data

class CachedTrainer(Trainer):
    """The package's Trainer on pre-generated pairs, so that all four networks of a seed train on the
    very same pairs in the same order and the generator runs once per seed, not once per network."""

    def __init__(self, config: TrainConfig, train_set: list, val_set: list):
        self.cached = (train_set, val_set)  # read by _datasets() inside Trainer.__init__
        super().__init__(config)

    def _datasets(self):
        return self.cached


def synthetic_split(length: int, size: int, data_seed: int, displacement: float) -> list[dict]:
    return list(SyntheticPairs(length, (size, size, size), seed=data_seed, displacement=displacement))


def data_seeds(seed: int) -> dict:
    """Disjoint generator seeds per split; the generator hashes (seed, index), so no pair repeats."""
    return {"train": 100 * seed + 1, "val": 100 * seed + 2, "test": 100 * seed + 3}


def find_real_data() -> Path | None:
    for folder in REAL_DATA_DIRS:
        if all((folder / f"{n}.nii.gz").is_file() for n in ("ct", "mr", "ct_labels", "mr_labels")):
            return folder
    return None


def real_pair(folder: Path, spacing: float, affine_iters) -> dict:
    """The MR (fixed) and CT (moving) on the MR's grid at ``spacing`` mm, the CT pre-aligned by body-mask
    moments and an affine optimised on MIND-SSC. Every method starts from this pre-aligned pair."""
    fixed = read_nifti(folder / "mr.nii.gz", "fixed image (MR)")
    moving = read_nifti(folder / "ct.nii.gz", "moving image (CT)")
    fixed_seg = read_nifti(folder / "mr_labels.nii.gz", "fixed labels")
    moving_seg = read_nifti(folder / "ct_labels.nii.gz", "moving labels")
    fixed = Scan(normalize_intensity(fixed.data, "mr"), fixed.affine, fixed.path)
    moving = Scan(normalize_intensity(moving.data, "ct"), moving.affine, moving.path)
    grid_fit = Grid.of_scan(fixed, spacing=spacing).fit(16, "pad")
    organs = tuple(REAL_ORGANS)

    def on_grid(transform):
        return pair_on_grid(fixed, moving, fixed_seg, moving_seg, label_ids=organs, moving_to_fixed=transform,
                            grid_fit=grid_fit)

    started = time.perf_counter()
    init = moments_init(fixed, moving)
    moments = on_grid(init)
    result = optimize_affine(moments["fixed"][None], moments["moving"][None], grid_fit.grid.spacing,
                             iterations=tuple(affine_iters), loss_box=moments["fixed_fov"])
    pair = on_grid(init @ result.world_transform(grid_fit.grid))
    pair["affine_seconds"] = time.perf_counter() - started
    spacing_mm = grid_fit.grid.spacing
    pair["spacing"] = spacing_mm
    pair["before"] = {name: label_metrics(p["moving_labels"][0].numpy(), p["fixed_labels"][0].numpy(), spacing_mm,
                                          labels=list(organs))
                      for name, p in (("identity", on_grid(None)), ("moments", moments), ("affine", pair))}
    return pair


# ------------------------------------------------------------------------------------------- methods

def predict(model, moving, fixed, device) -> tuple[torch.Tensor, float]:
    """The network's flow for one (1, D, H, W) pair, on ``device``; returned on the CPU."""
    model.to(device).eval()
    started = time.perf_counter()
    with torch.no_grad():
        flow = model(moving[None].to(device), fixed[None].to(device)).flow.cpu()
    return flow, time.perf_counter() - started


def instance_optimise(model, moving, fixed, iters: int, lr: float, loss_fn, device) -> tuple[torch.Tensor, float]:
    """Fine-tune a copy of the trained network on this one pair (same loss), then predict."""
    tuned = copy.deepcopy(model).to(device)
    tuned.train()
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    started = time.perf_counter()
    m, f = moving[None].to(device), fixed[None].to(device)
    for _ in range(iters):
        loss, _ = loss_fn(tuned(m, f), m, f)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    tuned.eval()
    with torch.no_grad():
        flow = tuned(m, f).flow.cpu()
    return flow, time.perf_counter() - started


def ants_available() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def run_syn(moving, fixed, moving_labels, spacing, seed: int, iters) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ANTs SyN (deformable only: the inputs are already aligned) with mutual information (multimodal).

    The images get identity directions and the grid spacing, so ANTs' physical displacement (mm) along
    axis k is the voxel displacement along index axis k times the spacing, in the warp() convention.
    """
    import ants

    def image(t, dtype="float32"):
        return ants.from_numpy(t[0].numpy().astype(dtype), origin=(0.0, 0.0, 0.0), spacing=tuple(map(float, spacing)))

    fixed_img, moving_img = image(fixed), image(moving)
    # antspyx takes its sampling seed from this global (a random_seed argument is silently ignored);
    # it also seeds numpy's and Python's global generators, which nothing here draws from.
    ants.config.set_ants_deterministic(True, int(seed) + 1)
    started = time.perf_counter()
    reg = ants.registration(fixed_img, moving_img, type_of_transform="SyNOnly", syn_metric="mattes",
                            reg_iterations=tuple(iters))
    seconds = time.perf_counter() - started
    warped = ants.apply_transforms(fixed_img, image(moving_labels), reg["fwdtransforms"],
                                   interpolator="nearestNeighbor")
    warped_labels = torch.from_numpy(np.rint(warped.numpy()).astype(np.int64))[None]
    field = ants.image_read(reg["fwdtransforms"][0]).numpy()  # (D, H, W, 3), mm
    flow = torch.from_numpy(np.moveaxis(field, -1, 0) / np.asarray(spacing, dtype=np.float64).reshape(3, 1, 1, 1))
    for path in set(reg["fwdtransforms"] + reg["invtransforms"]):
        if os.path.isfile(path) and os.path.basename(path).startswith("tmp"):
            os.remove(path)
    return flow.float()[None], warped_labels, seconds


# ------------------------------------------------------------------------------------------- experiment

# Settings that may differ between invocations on one --out (they do not change the results' meaning).
VOLATILE_SETTINGS = ("out", "threads", "report_only", "device")


def record_invocation(out: Path, args, syn_status: str, real_folder) -> None:
    """Append this invocation to <out>/run.json; refuse to mix results of different settings in one folder."""
    settings = {k: v for k, v in vars(args).items() if k not in VOLATILE_SETTINGS}
    path = out / "run.json"
    info = json.loads(path.read_text()) if path.exists() else {"settings": settings, "invocations": []}
    if info["settings"] != settings:
        changed = sorted(k for k in settings.keys() | info["settings"].keys()
                         if settings.get(k) != info["settings"].get(k))
        raise SystemExit(f"{out} holds results of other settings ({', '.join(changed)} differ); "
                         f"choose another --out")
    info["invocations"].append({
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()}), {platform.platform()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device, "syn": syn_status,
        "real_data": str(real_folder) if real_folder else "not found"})
    write_json(path, info)


def run(args) -> None:
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))  # read by ANTs per call
    syn_status = "run" if args.syn and ants_available() else (
        "not run: antspyx missing" if args.syn else "not run: disabled (--no-syn)")
    real_folder = find_real_data()
    record_invocation(out, args, syn_status, real_folder)

    real = None
    if real_folder is not None and not args.no_real:
        print(f"[real] preparing the CT/MR pair from {real_folder} at {args.real_spacing} mm", flush=True)
        real = real_pair(real_folder, args.real_spacing, args.affine_iters)
        write_json(raw / "real_before.json", {"before": {k: {str(l): m for l, m in v.items()} for k, v in
                                                         real["before"].items()},
                                              "grid": list(real["grid"].shape),
                                              "spacing": [float(s) for s in real["spacing"]],
                                              "affine_seconds": real["affine_seconds"]})

    for seed in args.seeds:
        splits = data_seeds(seed)
        test = synthetic_split(args.test_pairs, args.size, splits["test"], args.displacement)
        keep_qualitative = seed == args.seeds[0]
        for key in ("moving", "syn"):
            if (raw / f"synthetic_{key}_seed{seed}.json").exists() or (key == "syn" and syn_status != "run"):
                continue
            print(f"[seed {seed}] {REFERENCES[key]}", flush=True)
            run_reference(args, raw, key, seed, test, real, keep_qualitative)
        pending = [name for name in args.models if not (raw / f"synthetic_{name}_seed{seed}.json").exists()]
        if pending:
            print(f"[seed {seed}] generating {args.train_pairs} training and {args.val_pairs} validation pairs",
                  flush=True)
            train_set = synthetic_split(args.train_pairs, args.size, splits["train"], args.displacement)
            val_set = synthetic_split(args.val_pairs, args.size, splits["val"], args.displacement)
        for name in pending:
            print(f"[seed {seed}] training {NETWORKS[name]} for {args.steps} steps", flush=True)
            run_network(args, out, name, seed, (train_set, val_set), test, real, keep_qualitative)
        if keep_qualitative:
            save_backgrounds(raw, test[0], real)
        report(out)
    print(f"[done] report in {out / 'table.md'}", flush=True)


def run_reference(args, raw: Path, key: str, seed: int, test: list, real, keep_qualitative: bool) -> None:
    """Moving (zero flow) or SyN on the seed's test pairs and the real pair."""
    organs = tuple(range(2, args.num_organs + 2))  # 0 background, 1 body
    records, qualitative = {"synthetic": [], "real": []}, {}
    cases = [("synthetic", item, (1, 1, 1), organs) for item in test]
    if real is not None:
        cases.append(("real", real, real["spacing"], tuple(REAL_ORGANS)))
    for dataset, item, spacing, organ_ids in cases:
        if key == "moving":
            flow = torch.zeros((1, 3) + tuple(item["fixed"].shape[1:]))
            warped, seconds = item["moving_labels"], 0.0
        else:
            flow, warped, seconds = run_syn(item["moving"], item["fixed"], item["moving_labels"], spacing, seed,
                                            args.syn_iters)
        records[dataset].append(evaluate_labels(warped, item["fixed_labels"], flow, spacing, organ_ids, seconds))
        qualitative.setdefault(dataset, warped[0].numpy())  # the first pair of each dataset
    save_records(raw, key, seed, records, qualitative if keep_qualitative else {})


def run_network(args, out: Path, name: str, seed: int, train_val, test: list, real, keep_qualitative: bool) -> None:
    """Train one network on the seed's pairs, then evaluate it (and its +IO variant on the real pair)."""
    raw = out / "raw"
    run_dir = out / "runs" / f"{name}_seed{seed}"
    if run_dir.exists():  # an unfinished run of an interrupted experiment: start it afresh
        shutil.rmtree(run_dir)
    config = TrainConfig(model=name, enc=tuple(args.enc), dec=args.dec, refine=tuple(args.refine), preset="abdomen",
                         shape=(args.size,) * 3, displacement=args.displacement, train_pairs=args.train_pairs,
                         val_pairs=args.val_pairs, lr=args.lr, steps=args.steps, batch_size=1, num_workers=0,
                         log_every=max(1, args.steps // 10), val_every=max(1, args.steps // 4),
                         checkpoint_every=args.steps, out_dir=str(run_dir), seed=seed, device=args.device,
                         progress=False)
    started = time.perf_counter()
    try:
        best = CachedTrainer(config, *train_val).fit()
    except FloatingPointError as exc:  # a diverged run is reported as unfinished, the others go on
        print(f"[seed {seed}] {NETWORKS[name]} diverged: {exc}", flush=True)
        return
    train_seconds = time.perf_counter() - started
    model, info = load_checkpoint(best)
    organs = tuple(range(2, args.num_organs + 2))
    records, qualitative = {"synthetic": [], "real": [], "real_io": []}, {}
    for item in test:
        flow, seconds = predict(model, item["moving"], item["fixed"], args.device)
        records["synthetic"].append(evaluate(flow, item["moving_labels"], item["fixed_labels"], (1, 1, 1), organs,
                                             seconds))
        qualitative.setdefault("synthetic", warp_labels(item["moving_labels"], flow)[0].numpy())
    if real is not None:
        loss_fn = RegistrationLoss(preset="abdomen")
        for dataset, (flow, seconds) in (
                ("real", predict(model, real["moving"], real["fixed"], args.device)),
                ("real_io", instance_optimise(model, real["moving"], real["fixed"], args.io_iters, args.lr, loss_fn,
                                              args.device))):
            records[dataset].append(evaluate(flow, real["moving_labels"], real["fixed_labels"], real["spacing"],
                                             REAL_ORGANS, seconds))
            qualitative[dataset] = warp_labels(real["moving_labels"], flow)[0].numpy()
    records["train"] = {"seconds": train_seconds, "best": info["best"], "steps": info["step"]}
    save_records(raw, name, seed, records, qualitative if keep_qualitative else {})


def save_records(raw: Path, key: str, seed: int, records: dict, qualitative: dict) -> None:
    if qualitative:
        tmp = raw / f".qualitative_{key}.tmp.npz"
        np.savez_compressed(tmp, **qualitative)
        os.replace(tmp, raw / f"qualitative_{key}.npz")
    for dataset, rows in records.items():
        if dataset != "train" and rows:
            write_json(raw / f"{dataset}_{key}_seed{seed}.json",
                       {"method": key, "seed": seed, "dataset": dataset, "pairs": rows, "train": records.get("train")})


def save_backgrounds(raw: Path, synthetic_item: dict, real) -> None:
    arrays = {"synthetic_fixed": synthetic_item["fixed"][0].numpy(),
              "synthetic_fixed_labels": synthetic_item["fixed_labels"][0].numpy()}
    if real is not None:
        arrays.update(real_fixed=real["fixed"][0].numpy(), real_fixed_labels=real["fixed_labels"][0].numpy(),
                      real_axial_axis=np.array(axial_axis(real["grid"].affine)))
    tmp = raw / ".backgrounds.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, raw / "backgrounds.npz")


# ------------------------------------------------------------------------------------------- report

def method_rows(dataset: str) -> list[tuple[str, str]]:
    """(file key, row label) in the paper's order; the real pair also lists the +IO variants."""
    rows = [("moving", "Moving"), ("syn", "SyN")] + [(k, v) for k, v in NETWORKS.items()]
    if dataset == "real":
        rows += [(f"io:{k}", f"{v} + IO") for k, v in NETWORKS.items()]
    return rows


def load_results(raw: Path, dataset: str, key: str) -> dict[int, list[dict]]:
    """{seed: per-pair records} of one method."""
    file_dataset, file_key = ("real_io", key[3:]) if key.startswith("io:") else (dataset, key)
    results = {}
    for path in sorted(raw.glob(f"{file_dataset}_{file_key}_seed*.json")):
        payload = json.loads(path.read_text())
        results[payload["seed"]] = payload["pairs"]
    return results


def pair_summary(record: dict, organs) -> dict:
    """One pair's numbers: per-organ Dice/ASD/HD95, their means over organs, folding, SDlogJ, seconds."""
    out = {}
    for metric in ("dice", "asd", "hd95"):
        values = [record["organs"][str(o)][metric] for o in organs]
        for organ, value in zip(organs, values):
            out[f"{metric}_{organ}"] = value
        finite = [v for v in values if v is not None and math.isfinite(v)]
        out[f"{metric}_mean"] = float(np.mean(finite)) if finite else math.nan
    out.update(folding=record["folding_pct"], sdlogj=record["sdlogj"], seconds=record["seconds"])
    return out


def seed_means(results: dict[int, list[dict]], organs) -> dict[str, list[float]]:
    """Per quantity, one value per seed: the mean over that seed's test pairs."""
    per_seed = {}
    for seed, pairs in sorted(results.items()):
        summaries = [pair_summary(p, organs) for p in pairs]
        for key in summaries[0]:
            per_seed.setdefault(key, []).append(float(np.nanmean([s[key] for s in summaries])))
    return per_seed


def cell(values, digits: int = 3) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def report(out: Path) -> None:
    raw = out / "raw"
    run_info = json.loads((out / "run.json").read_text())
    settings = run_info["settings"]
    last = run_info["invocations"][-1]
    requested = len(settings["seeds"])
    datasets = {"synthetic": (tuple(range(2, settings["num_organs"] + 2)), "vox"),
                "real": (tuple(REAL_ORGANS), "mm")}
    lines = ["# Comparison (generated by experiments/run_comparison.py)", "",
             *[f"- run (UTC {i['date']}): `{i['command']}` on {i['machine']}; torch {i['torch']}, "
               f"{i['threads']} threads, device {i['device']}" for i in run_info["invocations"]],
             f"- seeds requested: {settings['seeds']}; cells are mean ± std over seeds of the per-seed mean over "
             f"test pairs; a row marked (k/{requested}) has only k seeds finished", f"- SyN: {last['syn']}", ""]
    summaries = {}
    for dataset, (organs, unit) in datasets.items():
        names = [f"organ {o}" for o in organs] if dataset == "synthetic" else [REAL_ORGANS[o] for o in organs]
        title = (f"Synthetic test pairs ({settings['test_pairs']} per seed, {settings['size']}^3, distances in voxels)"
                 if dataset == "synthetic" else
                 f"Real CT->MR pair ({settings['real_spacing']} mm grid, after moments + affine pre-alignment; "
                 "distances in mm)")
        header = (["Method"] + [f"Dice {n}" for n in names] + ["Dice mean"] + [f"ASD {n}" for n in names]
                  + [f"ASD mean ({unit})"])
        extra_header = ["Method", f"HD95 mean ({unit})", "folding %", "SDlogJ", "seconds / pair", "train s"]
        table, extra = [], []
        summaries[dataset] = {}
        for key, label in method_rows(dataset):
            results = load_results(raw, dataset, key)
            if not results:
                reason = last["syn"] if key == "syn" and last["syn"] != "run" else "not finished"
                table.append([label, f"{reason}"] + [""] * (len(header) - 2))
                continue
            per_seed = seed_means(results, organs)
            summaries[dataset][key] = per_seed
            mark = "" if len(results) >= requested else f" ({len(results)}/{requested})"
            table.append([label + mark] + [cell(per_seed[f"dice_{o}"]) for o in organs]
                         + [cell(per_seed["dice_mean"])] + [cell(per_seed[f"asd_{o}"], 2) for o in organs]
                         + [cell(per_seed["asd_mean"], 2)])
            train = train_seconds(raw, key)
            extra.append([label + mark, cell(per_seed["hd95_mean"], 2), cell(per_seed["folding"], 3),
                          cell(per_seed["sdlogj"], 3), cell(per_seed["seconds"], 2), train])
        lines += [f"## {title}", "", markdown_table(header, table), "", markdown_table(extra_header, extra), ""]
        lines += ordering_lines(summaries[dataset]) + [""]
    if (raw / "real_before.json").exists():
        before = json.loads((raw / "real_before.json").read_text())
        lines += ["## Real pair before deformable registration (mean organ Dice)", ""]
        for stage, per_label in before["before"].items():
            values = [v["dice"] for v in per_label.values() if v["dice"] is not None and math.isfinite(v["dice"])]
            lines.append(f"- {stage}: {np.mean(values) if values else float('nan'):.3f}")
        lines += [f"- working grid {before['grid']} at {before['spacing']} mm; pre-alignment took "
                  f"{before['affine_seconds']:.1f} s", ""]
    (out / ".table.md.tmp").write_text("\n".join(lines))
    os.replace(out / ".table.md.tmp", out / "table.md")
    make_figures(out, summaries)


def train_seconds(raw: Path, key: str) -> str:
    if key.startswith("io:") or key in REFERENCES:
        return ""
    values = [json.loads(p.read_text())["train"]["seconds"] for p in raw.glob(f"synthetic_{key}_seed*.json")]
    return cell(values, 0) if values else ""


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ordering_lines(summary: dict) -> list[str]:
    """Each adjacent claim of the paper's ordering, on mean Dice over seeds (with the seed std)."""
    lines = ["Paper's ordering on mean Dice (holds / does not hold; difference of means, pooled seed std):", ""]
    present = [k for k in PAPER_ORDER if k in summary]
    for better, worse in zip(present, present[1:]):
        a, b = np.array(summary[better]["dice_mean"]), np.array(summary[worse]["dice_mean"])
        diff = float(a.mean() - b.mean())
        spread = float(np.sqrt((a.var(ddof=1) if len(a) > 1 else 0) + (b.var(ddof=1) if len(b) > 1 else 0)))
        relation = ">=" if better in ("gated", "average", "vm_concat") else ">"
        holds = diff >= 0 if relation == ">=" else diff > 0
        label = lambda k: NETWORKS.get(k) or REFERENCES[k]  # noqa: E731
        lines.append(f"- {label(better)} {relation} {label(worse)}: {'holds' if holds else 'does NOT hold'} "
                     f"(Δ = {diff:+.3f}, spread {spread:.3f})")
    return lines


def make_figures(out: Path, summaries: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = out / "raw"
    organs = {"synthetic": None, "real": tuple(REAL_ORGANS)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.5))
    for ax, dataset in zip(axes, ("synthetic", "real")):
        labels, data = [], []
        for key, label in method_rows(dataset):
            results = load_results(raw, dataset, key)
            if not results:
                continue
            organ_ids = organs[dataset] or tuple(int(o) for o in next(iter(results.values()))[0]["organs"])
            values = [pair_summary(p, organ_ids)["dice_mean"] for pairs in results.values() for p in pairs]
            labels.append(label.replace(" + IO", "\n+IO"))
            data.append(values)
        if data:
            ax.boxplot(data, showmeans=True)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{dataset}: mean organ Dice per pair (all seeds)")
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, out / "boxplot_dice.png")
    plt.close(fig)

    if not (raw / "backgrounds.npz").exists():
        return
    backgrounds = np.load(raw / "backgrounds.npz")
    for dataset in ("synthetic", "real"):
        if f"{dataset}_fixed" not in backgrounds:
            continue
        image, fixed_labels = backgrounds[f"{dataset}_fixed"], backgrounds[f"{dataset}_fixed_labels"]
        axis = int(backgrounds["real_axial_axis"]) if dataset == "real" else 0
        organ_ids = tuple(REAL_ORGANS) if dataset == "real" else tuple(int(v) for v in np.unique(fixed_labels) if v > 1)
        # The slice where the fixed organs cover the most area.
        areas = np.isin(fixed_labels, organ_ids).sum(axis=tuple(a for a in range(3) if a != axis))
        index = int(np.argmax(areas))
        panels = []
        for key, label in method_rows(dataset):
            path = raw / f"qualitative_{key[3:] if key.startswith('io:') else key}.npz"
            if path.exists():
                stored = np.load(path)
                name = f"{dataset}_io" if key.startswith("io:") else dataset
                if name in stored:
                    panels.append((label, stored[name]))
        count = len(panels) + 1
        columns = min(count, 6)
        grid_rows = -(-count // columns)
        fig, axes = plt.subplots(grid_rows, columns, figsize=(2.6 * columns, 2.9 * grid_rows), squeeze=False)
        axes = axes.ravel()
        for ax in axes[count:]:
            ax.axis("off")
        colours = plt.cm.tab10(np.linspace(0, 1, 10))
        take = lambda a: np.rot90(np.take(a, index, axis=axis))  # noqa: E731
        for ax, (label, labels) in zip(axes, [("Fixed (MR-like)" if dataset == "synthetic" else "Fixed MR",
                                                fixed_labels)] + panels):
            ax.imshow(take(image), cmap="gray")
            for n, organ in enumerate(organ_ids):
                colour = colours[n % 10]
                if (take(fixed_labels) == organ).any() and not label.startswith("Fixed"):
                    ax.contour(take(fixed_labels) == organ, levels=[0.5], colors=[colour], linewidths=0.6,
                               linestyles="dotted")
                if (take(labels) == organ).any():
                    ax.contour(take(labels) == organ, levels=[0.5], colors=[colour], linewidths=1.0)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{dataset}: slice {index} of axis {axis}; solid = warped moving labels, dotted = fixed labels",
                     fontsize=9)
        save_figure(fig, out / f"qualitative_{dataset}.png")
        plt.close(fig)


# ------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu",
                        help="defaults for the flags below: cpu (2-core budget), paper (full size, GPU), smoke")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"), help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="experiment seeds (network init, data order, data)")
    parser.add_argument("--size", type=int, help="synthetic volume edge (voxels)")
    parser.add_argument("--steps", type=int, help="training steps per network")
    parser.add_argument("--lr", type=float, help="Adam learning rate (training and instance optimisation)")
    parser.add_argument("--enc", type=int, nargs=4, help="encoder widths")
    parser.add_argument("--dec", type=int, help="decoder width")
    parser.add_argument("--refine", type=int, nargs="+", help="refinement conv widths")
    parser.add_argument("--train-pairs", type=int, help="synthetic training pairs per seed")
    parser.add_argument("--val-pairs", type=int, help="synthetic validation pairs per seed (best checkpoint)")
    parser.add_argument("--test-pairs", type=int, help="held-out synthetic test pairs per seed")
    parser.add_argument("--num-organs", type=int, default=5, help="organs per synthetic pair")
    parser.add_argument("--displacement", type=float, default=0.12,
                        help="synthetic deformation strength, a fraction of each axis (generator default 0.08 "
                             "leaves organ Dice ~0.85 before registration; 0.12 makes the task harder)")
    parser.add_argument("--io-iters", type=int, help="instance-optimisation steps on the real pair")
    parser.add_argument("--real-spacing", type=float, help="grid spacing (mm) of the real pair")
    parser.add_argument("--affine-iters", type=int, nargs=2, help="affine pre-alignment steps at 1/4 and 1/2")
    parser.add_argument("--syn-iters", type=int, nargs=3, help="SyN iterations per level (coarse to fine)")
    parser.add_argument("--models", nargs="+", choices=tuple(NETWORKS), default=list(NETWORKS))
    parser.add_argument("--no-syn", dest="syn", action="store_false", help="skip ANTs SyN")
    parser.add_argument("--no-real", action="store_true", help="skip the real CT/MR pair")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch (and ANTs) CPU threads")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from <out>/raw and exit")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    for name in ("size", "steps", "train_pairs", "val_pairs", "test_pairs", "num_organs", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.io_iters < 0 or not args.lr > 0 or not args.real_spacing > 0:
        raise SystemExit("--io-iters must be >= 0, --lr and --real-spacing > 0")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise SystemExit(f"--seeds must be distinct ints >= 0, got {args.seeds}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        if not (Path(args.out) / "run.json").exists():
            raise SystemExit(f"--report-only: {args.out} holds no run (run.json missing)")
        report(Path(args.out))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
