"""Reliability of the registration pipeline and the command line (issue 13): consistent output sets,
right and bounded metrics, early one-line refusals, clean interruption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from gradreg_fast import cli
from gradreg_fast.register.pipeline import quick_settings, register

from test_cli import FAST, strict_json, write_case


def quick():
    settings = quick_settings()
    settings.affine_iterations = (3, 3)
    settings.field.iterations = (3, 3, 1)
    return settings


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("case"))


def test_background_is_never_scored_without_a_label_list(case):
    result = register(case["fixed"], case["moving"], case["fixed_labels"], case["moving_labels"], quick(),
                      device="cpu", progress=False)
    for stage, report in result.metrics["stages"].items():
        assert sorted(report["labels"]) == ["1", "2"], stage
        dice = [v["dice"] for v in report["labels"].values()]
        assert report["mean_dice"] == pytest.approx(np.mean(dice)), stage
