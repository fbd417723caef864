"""Data parallelism inside one island: two CPU ranks (gloo) train one expert, launched as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

from ddm.io import read_json
from tests.fabricate import FAST_JOB, make_partitions


def test_two_rank_ddp_island_trains_one_expert(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("DDM_STAGE", None)
    cmd = [
        sys.executable,
        "-m",
        "ddm",
        "train-expert",
        f"run_dir={rd.root}",
        *FAST_JOB,
        "expert.id=1",
        "island.devices=2",
        "island.strategy=ddp",
        "expert.steps=4",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_json(rd.expert_record(1))
    hw = record["hardware"]
    # The global batch of 8 is split over the island's 2 ranks; the run ends at exactly 4 steps.
    assert (hw["world_size"], hw["per_device_batch"], record["steps"], record["samples_seen"]) == (2, 4, 4, 32)
    assert hw["strategy"] == "DDPStrategy"
    assert not rd.expert(0).exists()  # the other expert's folder is untouched
