"""Shared fixtures: settings made exactly as the CLI makes them, in a temp run dir."""

from __future__ import annotations

import os
from pathlib import Path

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


class TinyRun:
    """A finished run of the tiny experiment: ``settings(*overrides)`` for it, ``rd`` its folder."""

    # every stage, a few steps of training: seconds on 2 cores
    OVERRIDES = ("experiment=tiny", "expert.steps=6", "router.steps=6")

    def __init__(self, root):
        from ddm.artifacts import RunDir

        self.rd = RunDir(root)

    def settings(self, *overrides):
        from ddm.config import settings

        return settings([*self.OVERRIDES, f"run_dir={self.rd.root}", *overrides])

    def copy(self, dest) -> TinyRun:
        """A copy of the run to change (evaluate into, sample again) without touching the shared one."""
        import shutil

        shutil.copytree(self.rd.root, dest)
        return TinyRun(dest)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The tiny experiment through the whole pipeline, built once for every test that reads a finished run.

    Read it as it is; a test that writes into a run takes ``tiny_run.copy(tmp_path / "run")``.
    """
    from ddm.stages import pipeline

    run = TinyRun(tmp_path_factory.mktemp("tiny-run") / "run")
    pipeline.run(run.settings())
    return run


@pytest.fixture
def fast_cfg(make_cfg):
    """``fast_cfg("expert.steps=3", ...)``: ``make_cfg`` with the fast job settings (``tests.fabricate.FAST_JOB``)."""
    from tests.fabricate import FAST_JOB

    return lambda *overrides, run_dir=None: make_cfg(*FAST_JOB, *overrides, run_dir=run_dir)


@pytest.fixture
def no_slurm(monkeypatch):
    """No SLURM here: the dry runs and the local launcher go by the run's files alone."""
    from ddm.launch import slurm

    monkeypatch.setattr(slurm, "available", lambda: False)


@pytest.fixture
def fake_slurm(monkeypatch):
    """SLURM that records what is submitted (script, extra arguments) and cancelled; `queued` is the run's
    queue of the stage `array` names (prepare's unless a test says) as (parts, the merge job)."""
    from ddm.launch import slurm

    state = dict(submitted=[], cancelled=[], queued=({}, None), array="prepare-parts")

    def stage_queue(run_dir, array, single):
        return state["queued"] if array == state["array"] else ({}, None)

    monkeypatch.setattr(slurm, "available", lambda: True)
    monkeypatch.setattr(slurm, "array_and_job", stage_queue)
    monkeypatch.setattr(slurm, "scancel", lambda job_id, signal=None: state["cancelled"].append(job_id))

    def fake_sbatch(path, extra_args=None):
        state["submitted"].append((Path(path), list(extra_args or [])))
        return str(100 + len(state["submitted"]))

    monkeypatch.setattr(slurm, "sbatch", fake_sbatch)
    return state


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is visible (``make gpu-check``); elsewhere they are skipped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto) for the session; its endpoint and test credentials are in the environment while
    a test uses it (``s3_bucket``)."""
    from tests.object_store import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """``s3://<a fresh bucket>``: the clients find the server through the environment, as a user's would."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3_server.new_bucket()}"
