"""Shared set-up of the CPU benchmarks (run them with benchmarks/run_cpu.sh; see benchmarks/README.md).

``time_case`` is the one timing procedure every benchmark uses:

1. build the case (inputs allocated once, outside the timing);
2. one untimed call: torch.compile compiles here, first-touch allocations happen here;
3. check that call's output and gradients against the fused op (untimed);
4. one more untimed call, whose duration picks the number of rounds (about ``ROUND_BUDGET_S`` of
   timing per case, between ``MIN_ROUNDS`` and ``MAX_ROUNDS``), so the whole run stays short;
5. ``benchmark.pedantic`` with one call per round; the median is the reported figure.
"""

from __future__ import annotations

import gc
import math
import os
import time

import pytest
import torch

import cases

MIN_ROUNDS, MAX_ROUNDS = 3, 100
ROUND_BUDGET_S = 0.3 if cases.QUICK else 1.0


@pytest.fixture
def time_case(benchmark):
    """``time_case(case)`` times one case with the procedure above."""
    return lambda case: _time_case(benchmark, case)


def _time_case(benchmark, case: cases.Case) -> None:
    run = case.build()
    case.check_against_fused(run())
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(ROUND_BUDGET_S / max(seconds, 1e-9))))
    benchmark.group = case.group
    benchmark.extra_info.update(case.info())
    # Short calls get two more warm-up rounds: the OpenMP pool and the caches take a few calls to settle.
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=2 if seconds < 0.05 else 0)


@pytest.fixture(autouse=True)
def _release_between_cases():
    yield
    torch._dynamo.reset()  # drops compiled graphs (and the memory they hold) of the case just run
    gc.collect()


def _settings() -> dict:
    return {
        "quick": cases.QUICK,
        "threads": torch.get_num_threads(),
        "sizes": {name: list(size) for name, size in cases.SIZES.items()},
        "torch": torch.__version__,
        "malloc_env": {key: os.environ.get(key) for key in cases.TIMING_MALLOC_ENV},
    }


def pytest_report_header(config):
    settings = _settings()
    lines = [f"gradreg benchmarks: torch {settings['torch']}, {settings['threads']} threads, quick={settings['quick']}"]
    if settings["malloc_env"] != cases.TIMING_MALLOC_ENV:
        lines.append("WARNING: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ are not set as benchmarks/run_cpu.sh sets "
                     "them; the naive PyTorch timings will include page faults.")
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gradreg_bench"] = _settings()
