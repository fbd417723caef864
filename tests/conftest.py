"""Shared fixtures: settings made exactly as the CLI makes them, in a temp run dir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg("data=digits", ...)`` -> the typed settings of a config composed as the CLI composes it, whose
    run_dir is a temp folder."""
    from ddm.config import settings

    def _make(*overrides, run_dir=None):
        run_dir = run_dir or tmp_path / "run"
        return settings([f"run_dir={run_dir}", *overrides])

    return _make


@pytest.fixture
def fast_cfg(make_cfg):
    """``fast_cfg("expert.steps=3", ...)``: ``make_cfg`` with the fast job settings (``tests.fabricate.FAST_JOB``)."""
    from tests.fabricate import FAST_JOB

    return lambda *overrides, run_dir=None: make_cfg(*FAST_JOB, *overrides, run_dir=run_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is visible (``make gpu-check``); elsewhere they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
