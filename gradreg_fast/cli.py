"""The ``gradreg`` command line: register, train, evaluate, demo.

    gradreg demo                                     # the bundled real CT -> MR pair, end to end
    gradreg register --fixed F --moving M [--fixed-labels FL --moving-labels ML] --out DIR
    gradreg evaluate --pairs DIR --out DIR           # a folder of cases -> metrics.csv + summary.json
    gradreg train ...                                # the trainer (gradreg_fast.train.cli_main)

Every subcommand takes ``--device`` and ``--backend`` and shows tqdm progress bars (``--quiet`` hides
them; ``--no-progress`` for ``train``). Outputs never overwrite inputs, and existing outputs are only replaced with ``--force``, as a
whole set (:func:`gradreg_fast.register.pipeline.save_result`: metrics.json comes last and names each
file of its run with a checksum; a folder caught mid-swap holds ``gradreg_incomplete.json``); the
demo, when no ``--out`` is given, writes to a fresh folder (./gradreg_demo_out, else
./gradreg_demo_out-2, -3, ...) so that running it twice never clobbers anything.

On a busy machine, ``export OMP_WAIT_POLICY=PASSIVE`` before running: the fused CPU ops run many small
OpenMP regions, and spinning idle threads then starve each other (the demo took 2-3x longer without it
on a loaded 2-core box). Errors in the input (missing or corrupt files, existing outputs, bad flags,
an unwritable output folder, a working grid too large for the memory, a malformed checkpoint) end the
command before the work starts, with exit status 1 and a one-line message; SIGTERM and Ctrl-C remove
what was half-written and exit with 143 and 130. ``gradreg evaluate`` carries on past a case that
fails, records its error in metrics.csv (column ``error``) and summary.json (``failed``), and exits
with 1 at the end.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import math
import os
import sys
from pathlib import Path

from ._atomic import Terminated, sigterm_as_interrupt

DEMO_LABELS = {1: "spleen", 2: "right kidney", 3: "left kidney", 5: "liver"}
DEMO_OUT = "gradreg_demo_out"
STAGES = ("before", "initial", "affine", "after")  # as in metrics.json
EXIT_ERROR = 1


class UsageError(ValueError):
    """A bad command-line value (reported without a traceback)."""


# ----------------------------------------------------------------------------------------------- helpers

def demo_data_dir() -> Path:
    """The bundled pair: gradreg_fast/data/abdomen (works installed or from a checkout)."""
    from importlib.resources import files

    return Path(str(files("gradreg_fast") / "data" / "abdomen"))


def parse_labels(text: str | None) -> dict:
    """"1=spleen,2=right kidney" -> {1: "spleen", 2: "right kidney"} (None/"" -> {})."""
    if not text:
        return {}
    names = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, name = item.partition("=")
        try:
            label = int(key.strip())
        except ValueError:
            label = None
        if not sep or label is None or label <= 0 or not name.strip():
            raise UsageError(f"--labels: expected 'id=name' pairs with positive integer ids, like "
                             f"'1=spleen,2=right kidney', got {item.strip()!r}")
        if label in names:
            raise UsageError(f"--labels: id {label} is given twice")
        names[label] = name.strip()
    return names


def parse_ints(text: str | None, what: str, count: int | None = None, each: str = "pyramid level"):
    """"100,50" -> (100, 50); one number is repeated ``count`` times (one per ``each``); None -> None."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if any(v < 0 for v in values):
        raise UsageError(f"{what}: expected counts >= 0, got {text!r}")
    if count is not None and len(values) == 1:
        values = values * count
    if count is not None and len(values) != count:
        raise UsageError(f"{what}: expected 1 or {count} numbers (one per {each}), got {text!r}")
    return values


def parse_range(text: str, what: str) -> tuple:
    """"-200,300" -> (-200.0, 300.0): two finite numbers, low < high."""
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{what}: expected two numbers 'LOW,HIGH', got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"{what}: expected two finite numbers with LOW < HIGH, got {text!r}")
    return low, high


def settings_from_args(args):
    """:class:`gradreg_fast.register.Settings` from the registration flags (absent flags keep the defaults)."""
    from .register.pipeline import Settings, quick_settings, thorough_settings

    flag = lambda name, default=None: getattr(args, name, default)  # noqa: E731  (demo has fewer flags)
    if flag("quick") and flag("thorough"):
        raise UsageError("give --quick or --thorough, not both")
    settings = quick_settings() if flag("quick") else thorough_settings() if flag("thorough") else Settings()
    if flag("spacing") is not None:
        if not (args.spacing > 0 and math.isfinite(args.spacing)):
            raise UsageError(f"--spacing must be a finite number of mm > 0, got {args.spacing}")
        settings.spacing = args.spacing
    if flag("size"):
        settings.size = parse_ints(args.size, "--size", 3, each="axis")
        if any(v < 1 for v in settings.size):
            raise UsageError(f"--size must be positive voxel counts, got {args.size!r}")
    settings.init = flag("init", settings.init)
    settings.affine_model = flag("affine", settings.affine_model)
    if flag("affine_rigidity") is not None:
        if not (args.affine_rigidity >= 0 and math.isfinite(args.affine_rigidity)):
            raise UsageError(f"--affine-rigidity must be a finite number >= 0, got {args.affine_rigidity}")
        settings.affine_rigidity = args.affine_rigidity
    settings.fixed_modality = flag("fixed_modality", settings.fixed_modality)
    settings.moving_modality = flag("moving_modality", settings.moving_modality)
    if flag("ct_window") is not None:
        settings.ct_window = parse_range(args.ct_window, "--ct-window")
    if flag("mr_percentiles") is not None:
        settings.mr_percentiles = parse_range(args.mr_percentiles, "--mr-percentiles")
        if not 0 <= settings.mr_percentiles[0] < settings.mr_percentiles[1] <= 100:
            raise UsageError(f"--mr-percentiles: expected 0 <= LOW < HIGH <= 100, got {args.mr_percentiles!r}")
    checkpoint = flag("checkpoint")
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint: file not found: {checkpoint}")
        from .train.checkpoint import check_checkpoint, read_checkpoint

        # Read and checked now, not after the affine stage: a bad file fails before any work.
        check_checkpoint(read_checkpoint(checkpoint), f"--checkpoint {checkpoint}")
        settings.checkpoint = str(checkpoint)
    settings.method = flag("method") or ("network" if checkpoint else "field")
    if flag("iterations") is not None:
        if settings.method == "field":
            levels = getattr(settings.field, "levels", None)  # a fixed pyramid, or one level per number given
            settings.field.iterations = parse_ints(args.iterations, "--iterations", len(levels) if levels else None)
        else:
            settings.network_iterations = parse_ints(args.iterations, "--iterations", len(settings.network_levels))
    if flag("affine_iterations") is not None:
        settings.affine_iterations = parse_ints(args.affine_iterations, "--affine-iterations",
                                                len(settings.affine_levels))
    return settings


def _add_common(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA if available; default)")
    parser.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "cpu", "reference"),
                        help="implementation of the fused ops (default: GRADREG_BACKEND or auto)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the fused CPU ops (default: torch's; "
                                                    "on a busy machine also export OMP_WAIT_POLICY=PASSIVE)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true",
                        help="replace the result files of an earlier run in the output folder, as one set: the new "
                             "files are written hidden, then swapped in, and metrics.json, written last, names every "
                             "file of the run with its SHA-256 (its \"files\" entry); files of the earlier run "
                             "that the new one does not write are removed, other files in the folder are kept, and "
                             "inputs are never written. A folder holding gradreg_incomplete.json was interrupted "
                             "mid-swap and may mix two runs; --force repairs it")


QUICK_HELP = ("about 1.25x faster: no gradient-map terms, a search of +-1 cell, 20 Adam steps (a capture range "
              "of +-2 voxels after the affine)")
THOROUGH_HELP = ("more iterations: affine 40,40 and 100 Adam steps; not more accurate on the validation set (see "
                 "benchmarks/RESULTS.md)")


def _add_registration(parser) -> None:
    group = parser.add_argument_group("registration")
    group.add_argument("--labels", help="label ids to score and their names, e.g. '1=spleen,2=right kidney'; "
                                        "others become background (default: score every id)")
    group.add_argument("--checkpoint", help="a trained network to start from (implies --method network)")
    group.add_argument("--method", choices=("field", "network"), default=None,
                       help="deformable stage: instance-optimised displacement field (default without a "
                            "checkpoint) or the dual-branch network fine-tuned on the pair")
    group.add_argument("--iterations", help="deformable Adam steps per level (field: one level after the convex "
                                            "search, default 15; network: 2 pyramid levels, default 100,50; one "
                                            "number: every level)")
    group.add_argument("--affine-iterations", help="affine Adam steps per pyramid level, at 1/4 and 1/2 scale "
                                                   "(default 5,5; --thorough: 40,40)")
    group.add_argument("--affine", default="affine", choices=("affine", "rigid_scale", "translation", "none"),
                       help="affine stage model (default: affine)")
    group.add_argument("--affine-rigidity", type=float, default=None,
                       help="weight pulling the affine's linear part toward a rotation (default 10: scale and shear "
                            "all but locked, also rigid_scale's scales; 0: a free affine)")
    group.add_argument("--init", default="com", choices=("com", "com_scale", "none"),
                       help="initial alignment: body-mask centres of mass (default), plus in-plane spread, or none")
    group.add_argument("--spacing", type=float, help="working grid spacing in mm (default: the fixed image's)")
    group.add_argument("--size", help="working grid size in voxels, 'X,Y,Z', centred on the fixed image")
    group.add_argument("--fixed-modality", default="auto", choices=("auto", "ct", "mr"),
                       help="intensity normalisation of the fixed image (auto: CT if it reaches -500 HU)")
    group.add_argument("--moving-modality", default="auto", choices=("auto", "ct", "mr"))
    group.add_argument("--ct-window", help="CT intensities in HU clipped and scaled to [0, 1], 'LOW,HIGH' "
                                           "(default -200,300: abdominal soft tissue; a negative LOW needs the =: "
                                           "--ct-window=-150,250)")
    group.add_argument("--mr-percentiles", help="MR intensities clipped to these percentiles of the volume and scaled "
                                                "to [0, 1], 'LOW,HIGH' (default 0.5,99.5)")
    group.add_argument("--quick", action="store_true", help=QUICK_HELP)
    group.add_argument("--thorough", action="store_true", help=THOROUGH_HELP)
    group.add_argument("--no-figure", action="store_true", help="skip overview.png")


def _fmt(value, digits=3) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_report(metrics: dict) -> str:
    """The per-label table (Dice, ASD, HD95 at each stage) and regularity, as text."""
    stages = metrics.get("stages") or {}
    lines = []
    if stages:
        names = [(k, v["name"]) for k, v in stages["after"]["labels"].items()]
        order = [s for s in STAGES if s in stages]
        head = f"{'label':<20}" + "".join(f"{'Dice ' + s:>14}" for s in order) + \
            f"{'ASD before':>12}{'ASD after':>11}{'HD95 before':>13}{'HD95 after':>12}"
        lines += [head, "-" * len(head)]
        rows = names + [("mean", "mean")]
        for key, name in rows:
            if key == "mean":
                cells = [stages[s]["mean_dice"] for s in order]
                asd = (stages["before"]["mean_asd"], stages["after"]["mean_asd"])
                hd = (stages["before"]["mean_hd95"], stages["after"]["mean_hd95"])
            else:
                cells = [stages[s]["labels"][key]["dice"] for s in order]
                asd = (stages["before"]["labels"][key]["asd"], stages["after"]["labels"][key]["asd"])
                hd = (stages["before"]["labels"][key]["hd95"], stages["after"]["labels"][key]["hd95"])
            label = name if key == "mean" else f"{key} {name}" if name != key else key
            lines.append(f"{label:<20}" + "".join(f"{_fmt(c):>14}" for c in cells) +
                         f"{_fmt(asd[0], 2):>12}{_fmt(asd[1], 2):>11}{_fmt(hd[0], 2):>13}{_fmt(hd[1], 2):>12}")
        lines.append("(before = identity in world space, scored on the fixed grid's lattice extended to where the "
                     "moving labels lie; initial = centres of mass; affine; after = affine + deformable; ASD/HD95 "
                     "in mm; n/a: label missing)")
    lines.append(f"folding (det J <= 0): {_fmt(metrics['folding_percent'])} %   SDlogJ: "
                 f"{_fmt(metrics['sd_log_jacobian'])}   registration runtime: {metrics['runtime_s']:.1f} s on "
                 f"{metrics['device']} ({metrics['threads']} threads)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- commands

def cmd_register(args) -> int:
    from .register.pipeline import check_outputs, register, save_result

    settings = settings_from_args(args)
    names = parse_labels(args.labels)
    inputs = [p for p in (args.fixed, args.moving, args.fixed_labels, args.moving_labels, args.checkpoint) if p]
    with_labels = args.fixed_labels is not None and args.moving_labels is not None
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise UsageError("give both --fixed-labels and --moving-labels, or neither")
    for path, what in ((args.fixed, "--fixed"), (args.moving, "--moving"), (args.fixed_labels, "--fixed-labels"),
                       (args.moving_labels, "--moving-labels")):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what}: file not found: {path}")
    check_outputs(args.out, inputs, with_labels, args.force)  # fail before spending minutes
    result = register(args.fixed, args.moving, args.fixed_labels, args.moving_labels, settings, label_names=names,
                      device=args.device, backend=args.backend, progress=not args.quiet)
    paths = save_result(result, args.out, inputs=inputs, force=args.force, figure=not args.no_figure)
    print(format_report(result.metrics))
    print(f"outputs: {Path(args.out).resolve()} ({', '.join(paths)})")
    return 0


def fresh_demo_dir(base: str = DEMO_OUT) -> Path:
    """./gradreg_demo_out, or the first of ./gradreg_demo_out-2, -3, ... that does not exist."""
    candidate, n = Path(base), 1
    while os.path.lexists(candidate):  # a dangling symbolic link is in the way too
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


def demo_settings(quick: bool = False, thorough: bool = False):
    from .register.pipeline import Settings, quick_settings, thorough_settings

    return quick_settings() if quick else thorough_settings() if thorough else Settings()


def cmd_demo(args) -> int:
    from .register.pipeline import check_outputs, register, save_result

    folder = demo_data_dir()
    files = {name: folder / f"{name}.nii.gz" for name in ("mr", "ct", "mr_labels", "ct_labels")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the bundled demo data is missing: {', '.join(missing)} (reinstall gradreg_fast)")
    settings = settings_from_args(args)
    out = Path(args.out) if args.out else fresh_demo_dir()
    inputs = list(files.values())
    check_outputs(out, inputs, True, args.force)
    print(f"gradreg demo: real abdominal CT (moving, {files['ct'].name}) -> MR (fixed, {files['mr'].name}), two "
          f"different people; TotalSegmentator reference files (Apache-2.0; see {folder / 'PROVENANCE.md'})")
    result = register(files["mr"], files["ct"], files["mr_labels"], files["ct_labels"], settings,
                      label_names=DEMO_LABELS, device=args.device, backend=args.backend, progress=not args.quiet)
    paths = save_result(result, out, inputs=inputs, force=args.force)
    stages = result.metrics["stages"]
    print()
    print(format_report(result.metrics))
    print()
    dice = ", ".join(f"{_fmt(stages[s]['mean_dice'])} {s}" for s in STAGES)
    asd = ", ".join(f"{_fmt(stages[s]['mean_asd'], 2)} {s}" for s in STAGES)
    print(f"mean organ Dice (liver, spleen, kidneys): {dice}")
    print(f"mean organ ASD (mm):                      {asd}")
    print(f"runtime: {result.timings['registration_s']:.1f} s registration, {result.timings['total_s']:.1f} s in all "
          f"(including {result.timings['startup_s']:.1f} s of one-time start-up: PyTorch's first custom-op call)")
    print(f"figure: {paths['overview.png'].resolve()}")
    print(f"outputs: {out.resolve()}")
    return 0


def _find_case_files(case: Path) -> dict:
    def find(role):
        for suffix in (".nii.gz", ".nii"):
            if (case / f"{role}{suffix}").is_file():
                return case / f"{role}{suffix}"
        return None

    return {role: find(role) for role in ("fixed", "moving", "fixed_labels", "moving_labels")}


CSV_FIELDS = (("case", "label", "name") + tuple(f"{m}_{s}" for m in ("dice", "asd", "hd95") for s in STAGES)
              + ("folding_percent", "sd_log_jacobian", "runtime_s", "error"))


def cmd_evaluate(args) -> int:
    from tqdm.auto import tqdm

    from .io import check_output_path, check_writable_dir
    from ._atomic import INCOMPLETE_MARKER, FileSet
    from .register.pipeline import _json_bytes, check_outputs, register, save_result

    root = Path(args.pairs)
    if not root.is_dir():
        raise FileNotFoundError(f"--pairs: not a directory: {root}")
    out = Path(args.out)
    # --out inside --pairs (pairs/results) is this command's own output, not a case
    cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.resolve() != out.resolve())
    if not cases:
        raise FileNotFoundError(f"--pairs: no case folders in {root} (expected <pairs>/<case>/fixed.nii.gz, "
                                "moving.nii.gz and optionally fixed_labels.nii.gz, moving_labels.nii.gz)")
    found = {case.name: _find_case_files(case) for case in cases}
    failed = {}  # case -> one-line error; such a case is recorded and skipped, the others still run
    for name, files in found.items():
        missing = [role for role in ("fixed", "moving") if files[role] is None]
        if missing:
            failed[name] = f"no {' or '.join(m + '.nii[.gz]' for m in missing)} in {root / name}"
        elif (files["fixed_labels"] is None) != (files["moving_labels"] is None):  # as register refuses it
            have, lack = ("fixed", "moving") if files["moving_labels"] is None else ("moving", "fixed")
            failed[name] = f"{have}_labels but no {lack}_labels.nii[.gz] in {root / name}: give both or neither"
    csv_path, summary_path = out / "metrics.csv", out / "summary.json"
    all_inputs = [p for files in found.values() for p in files.values() if p is not None]
    if (out / INCOMPLETE_MARKER).exists() and not args.force:
        raise FileExistsError(f"--out {out} holds the files of an interrupted run ({INCOMPLETE_MARKER}); use --force "
                              "to replace them")
    for path in (csv_path, summary_path):
        check_output_path(path, all_inputs, args.force)
    check_writable_dir(out)
    if args.save_outputs:
        for name, files in found.items():
            if name not in failed:
                check_outputs(out / name, all_inputs, files["fixed_labels"] is not None, args.force)
    settings = settings_from_args(args)
    names = parse_labels(args.labels)
    rows, per_case = [], {}
    for name, files in tqdm(found.items(), desc="cases", disable=args.quiet):
        if name in failed:
            rows.append({"case": name, "label": "", "name": "", "error": failed[name]})
            continue
        labelled = files["fixed_labels"] is not None and files["moving_labels"] is not None
        try:
            result = register(files["fixed"], files["moving"], files["fixed_labels"] if labelled else None,
                              files["moving_labels"] if labelled else None, settings, label_names=names,
                              device=args.device, backend=args.backend, progress=not args.quiet)
            if args.save_outputs:
                save_result(result, out / name, inputs=all_inputs, force=args.force, figure=not args.no_figure)
        except Exception as exc:  # noqa: BLE001  one bad case (corrupt file, bug, memory) must not end the batch
            failed[name] = f"{type(exc).__name__}: {_one_line(exc)}"
            rows.append({"case": name, "label": "", "name": "", "error": failed[name]})
            continue
        m = result.metrics
        per_case[name] = {key: m[key] for key in ("folding_percent", "sd_log_jacobian", "runtime_s")}
        common = {"case": name, "folding_percent": m["folding_percent"], "sd_log_jacobian": m["sd_log_jacobian"],
                  "runtime_s": m["runtime_s"]}
        stages = m["stages"]
        if stages:
            per_case[name]["mean_dice_before"] = stages["before"]["mean_dice"]
            per_case[name]["mean_dice_after"] = stages["after"]["mean_dice"]
            for key, entry in stages["after"]["labels"].items():
                cells = {f"{metric}_{stage}": stages[stage]["labels"][key][metric]
                         for stage in STAGES for metric in ("dice", "asd", "hd95")}
                rows.append({**common, "label": key, "name": entry["name"], **cells})
        else:
            rows.append({**common, "label": "", "name": ""})
    summary = _summarise(rows, per_case)
    summary["failed"] = failed
    # One set, as a registration's files: summary.json comes last and names metrics.csv with its SHA-256.
    files = FileSet(out, protect=all_inputs)
    Path(files.stage(csv_path.name)).write_bytes(_csv_bytes(rows))
    files.commit(summary_path.name, lambda checksums: _json_bytes({**summary, "files": checksums}))
    print(_format_summary(summary))
    print(f"wrote {csv_path.resolve()} and {summary_path.resolve()}")
    if failed:
        print(f"gradreg evaluate: error: {len(failed)} of {len(found)} case(s) failed (recorded in metrics.csv): "
              + "; ".join(f"{case}: {error}" for case, error in failed.items()), file=sys.stderr)
        return EXIT_ERROR
    return 0


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _summarise(rows, per_case) -> dict:
    labels = {}
    for row in rows:
        if row["label"] != "":
            labels.setdefault((row["label"], row["name"]), []).append(row)
    by_label = {f"{key} {name}" if name != key else key: {
        metric: _mean(r[metric] for r in group)
        for metric in ("dice_before", "dice_affine", "dice_after", "asd_before", "asd_after", "hd95_after")}
        for (key, name), group in labels.items()}
    return {"cases": len(per_case), "per_case": per_case, "per_label": by_label,
            "mean_dice_before": _mean(r["dice_before"] for r in rows if "dice_before" in r),
            "mean_dice_after": _mean(r["dice_after"] for r in rows if "dice_after" in r),
            "mean_asd_after": _mean(r["asd_after"] for r in rows if "asd_after" in r),
            "mean_folding_percent": _mean(c["folding_percent"] for c in per_case.values()),
            "mean_runtime_s": _mean(c["runtime_s"] for c in per_case.values())}


def _format_summary(summary) -> str:
    lines = [f"{summary['cases']} case(s)"]
    for label, values in summary["per_label"].items():
        lines.append(f"  {label:<20} Dice {_fmt(values['dice_before'])} -> {_fmt(values['dice_after'])}   "
                     f"ASD {_fmt(values['asd_before'], 2)} -> {_fmt(values['asd_after'], 2)} mm")
    lines.append(f"mean Dice {_fmt(summary['mean_dice_before'])} -> {_fmt(summary['mean_dice_after'])}; folding "
                 f"{_fmt(summary['mean_folding_percent'])} %; runtime {_fmt(summary['mean_runtime_s'], 1)} s per case")
    return "\n".join(lines)


def _csv_bytes(rows) -> bytes:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue().encode()


def cmd_train(argv) -> int:
    from .train import cli_main  # imported on use: the trainer pulls in the models and data modules

    return cli_main(list(argv))


# ----------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradreg", description="Multimodal (CT/MR) deformable registration with "
                                     "fused MIND-SSC / warp kernels and the gradient-guided dual-branch network.")
    sub = parser.add_subparsers(dest="command", metavar="{register,train,evaluate,demo}")
    sub.required = True

    reg = sub.add_parser("register", help="register one pair of NIfTI files",
                         description="Register --moving onto --fixed (NIfTI .nii/.nii.gz) and write DIR/warped.nii.gz, "
                                     "warped_labels.nii.gz (with labels), flow.nii.gz, metrics.json, overview.png.")
    reg.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    reg.add_argument("--moving", required=True, help="moving image (NIfTI)")
    reg.add_argument("--fixed-labels", help="fixed label map (for evaluation only)")
    reg.add_argument("--moving-labels", help="moving label map (warped with nearest neighbour; evaluation)")
    reg.add_argument("--out", required=True, help="output directory")
    _add_registration(reg)
    _add_common(reg)

    ev = sub.add_parser("evaluate", help="register every pair of a folder; write metrics.csv and summary.json",
                        description="Cases are folders <pairs>/<case>/ holding fixed.nii.gz, moving.nii.gz and "
                                    "optionally fixed_labels.nii.gz, moving_labels.nii.gz (.nii works too).")
    ev.add_argument("--pairs", required=True, help="folder of case folders")
    ev.add_argument("--out", required=True, help="output directory (metrics.csv, summary.json)")
    ev.add_argument("--save-outputs", action="store_true", help="also write each case's registration to OUT/<case>/")
    _add_registration(ev)
    _add_common(ev)

    demo = sub.add_parser("demo", help="register the bundled real abdominal CT -> MR pair end to end",
                          description="Register the bundled CT (moving) onto the MR (fixed) of another person and "
                                      "report organ Dice/ASD before and after, the runtime and the figure.")
    demo.add_argument("--out", help=f"output directory (default: a fresh ./{DEMO_OUT}[-N])")
    demo.add_argument("--quick", action="store_true", help=QUICK_HELP)
    demo.add_argument("--thorough", action="store_true", help=THOROUGH_HELP)
    demo.add_argument("--iterations", help="deformable Adam steps after the convex search (default 15)")
    demo.add_argument("--affine-iterations", help="affine Adam steps per pyramid level (default 5,5)")
    _add_common(demo)

    sub.add_parser("train", help="train the dual-branch network (arguments go to gradreg_fast.train)",
                   add_help=False)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with sigterm_as_interrupt():
        try:
            if argv and argv[0] == "train":
                return cmd_train(argv[1:])  # the trainer parses its own flags (and --help)
        except KeyboardInterrupt as exc:
            return _interrupted("train", exc)
        parser = build_parser()
        args = parser.parse_args(argv)
        return _run(args)


def _interrupted(command: str, exc: KeyboardInterrupt) -> int:
    terminated = isinstance(exc, Terminated)
    print(f"gradreg {command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130  # 128 + the signal's number, as a shell reports it


def _run(args) -> int:
    command = {"register": cmd_register, "evaluate": cmd_evaluate, "demo": cmd_demo}[args.command]
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if hasattr(args, "device"):  # checked before any file is read: evaluate would otherwise fail case by case
            from .register.pipeline import resolve_device

            resolve_device(args.device, args.backend)
        return command(args)
    except KeyboardInterrupt as exc:
        return _interrupted(args.command, exc)
    except (OSError, ValueError) as exc:  # NiftiError and UsageError are ValueErrors; PermissionError is an OSError
        print(f"gradreg {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError as exc:  # the up-front check says what it needs; an allocation that failed says nothing
        message = _one_line(exc) if str(exc) else "out of memory (try a coarser --spacing or a smaller --size)"
        print(f"gradreg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
