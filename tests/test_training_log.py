"""A training job's log, as it reads in a SLURM log file: one line per few steps, no Lightning noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar

from ddm.train import progress
from tests.fabricate import FAST_JOB, make_partitions

ROOT = Path(__file__).resolve().parent.parent
FAST = [*FAST_JOB, "expert.steps=6", "expert.log_every=2"]


def test_a_non_interactive_training_log_has_one_line_per_logged_step(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20))
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("DDM_STAGE", None)
    cmd = [sys.executable, "-m", "ddm", "train-expert", f"run_dir={rd.root}", *FAST]
    # stdout and stderr to a pipe, as to a SLURM log file: not a terminal
    out = subprocess.run(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    log = out.stdout
    assert out.returncode == 0, log[-3000:]

    assert "\r" not in log and "it/s" not in log, log  # no progress bar redrawn into the file
    lines = [re.sub(r"^\[[\d:]+\] ", "", line) for line in log.splitlines() if line.strip()]
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, log
    steps = [line for line in lines if re.match(r"train-expert 0: step \d+/6, loss [\d.]+, [\d.]+ steps/s$", line)]
    assert [s.split(",")[0] for s in steps] == [f"train-expert 0: step {i}/6" for i in (2, 4, 6)], log
    assert "train-expert 0: 6 steps on 20 samples" in log
    for noise in ("deprecat", "GPU available", "TPU available", "Tip:", "LOCAL_RANK", "eval mode"):
        assert noise.lower() not in log.lower(), log


def test_a_terminal_keeps_the_progress_bar(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert [type(c) for c in progress.progress_callbacks("job", 10)] == [TQDMProgressBar]
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert [type(c) for c in progress.progress_callbacks("job", 10)] == [progress.StepLog]
