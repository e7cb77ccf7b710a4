"""End-to-end smoke test of experiments/run_comparison.py at its smallest setting (16^3, 2 steps, 1 seed).

It checks the plumbing (training, evaluation, incremental results, report, figures), not the numbers:
nothing is learnt in two steps.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "run_comparison.py"
NETWORK_ROWS = ("VM", "VM(concat)", "Ours(average)", "Ours(gated)")


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def table_rows(text: str) -> dict[str, list[str]]:
    """{row label: cells} of every markdown table row (the first row of a label wins)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    result = run_script("--preset", "smoke", "--out", str(out), "--no-syn")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_report_lists_every_method(smoke_run):
    text = (smoke_run / "table.md").read_text()
    rows = table_rows(text)
    for label in ("Moving",) + NETWORK_ROWS:
        assert label in rows, f"row {label!r} missing from table.md"
        assert rows[label][0] not in ("", "n/a", "not finished"), f"row {label!r} has no numbers: {rows[label]}"
        dice = float(rows[label][0].split("±")[0])
        assert 0.0 <= dice <= 1.0
    assert rows["SyN"][0] == "not run: disabled (--no-syn)"
    real_data = json.loads((smoke_run / "run.json").read_text())["invocations"][-1]["real_data"]
    if real_data != "not found":
        for label in NETWORK_ROWS:
            assert f"{label} + IO" in rows, f"instance-optimisation row of {label} missing"
    assert "Paper's ordering" in text


def test_results_and_figures_are_written(smoke_run):
    raw = smoke_run / "raw"
    for key in ("moving", "vm", "vm_concat", "average", "gated"):
        payload = json.loads((raw / f"synthetic_{key}_seed0.json").read_text())
        assert payload["method"] == key and payload["seed"] == 0 and len(payload["pairs"]) == 1
        record = payload["pairs"][0]
        assert set(record) == {"organs", "folding_pct", "sdlogj", "seconds"}
        assert all(set(v) == {"dice", "asd", "hd95"} for v in record["organs"].values())
    for name in ("boxplot_dice.png", "qualitative_synthetic.png"):
        path = smoke_run / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_only_marks_missing_results(smoke_run, tmp_path):
    run = tmp_path / "run"  # a copy: the other tests read the shared run whatever their order
    shutil.copytree(smoke_run, run)
    (run / "raw" / "synthetic_gated_seed0.json").unlink()
    result = run_script("--out", str(run), "--report-only")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows((run / "table.md").read_text())
    assert rows["Ours(gated)"][0] == "not finished"
    assert rows["VM"][0] not in ("", "not finished")


def test_other_settings_are_refused_in_the_same_folder(smoke_run):
    result = run_script("--preset", "smoke", "--out", str(smoke_run), "--no-syn", "--steps", "3")
    assert result.returncode != 0 and "steps" in result.stderr and "other settings" in result.stderr


def test_bad_arguments_are_refused(tmp_path):
    result = run_script("--preset", "smoke", "--out", str(tmp_path), "--steps", "0")
    assert result.returncode != 0 and "--steps must be >= 1" in result.stderr
    result = run_script("--out", str(tmp_path / "empty"), "--report-only")
    assert result.returncode != 0 and "run.json missing" in result.stderr
