"""Each logger option writes where a user would look for it, without any service running."""

from __future__ import annotations

import pytest

from ddm.stages import train_expert
from tests.fabricate import FAST_JOB, make_partitions

FAST = [*FAST_JOB, "expert.steps=3", "expert.log_every=1"]


@pytest.mark.parametrize(
    "logger,pattern",
    [
        ("csv", "logs/**/metrics.csv"),
        ("tensorboard", "logs/**/events.out.tfevents.*"),
        ("wandb", "wandb/offline-run-*"),
    ],
)
def test_logger_writes_under_the_experts_folder(make_cfg, tmp_path, monkeypatch, logger, pattern):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    train_expert.run(make_cfg(*FAST, f"logger={logger}"))
    found = list(rd.expert(0).glob(pattern))
    assert found, f"logger={logger} wrote nothing matching {pattern} under {rd.expert(0)}"
    if logger == "csv":
        assert "train/loss" in found[0].read_text().splitlines()[0]
