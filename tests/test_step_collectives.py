"""No collective and no host sync on every training step: the ranks agree on a signal only where it is due.

Agreeing on "did any rank get SIGUSR1/SIGTERM" is an all-reduce whose result
the host reads: done at every step, it stalls each of 8 GPUs once per step.
The unit test drives ``JobCheckpoint`` with a stand-in trainer and counts the
decisions; the island test counts the tensor collectives a real 2-rank DDP job
makes from Python (DDP's gradient all-reduce runs in C++ and is not counted).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from ddm.train.job_checkpoint import JobCheckpoint
from ddm.train.signals import PreemptionGuard
from tests.fabricate import FAST_JOB, make_partitions


class CountingStrategy:
    def __init__(self):
        self.decisions: list[int] = []
        self.step = 0

    def reduce_boolean_decision(self, decision, all=True):
        self.decisions.append(self.step)
        return decision


@pytest.fixture
def drive(tmp_path, monkeypatch):
    # Lightning's own periodic save is not what is counted here
    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", lambda *a, **k: None)
    return lambda *args, **kwargs: _drive(tmp_path, *args, **kwargs)


def _drive(tmp_path, world_size: int, steps: int, every: int, ckpt_every: int, signal_at: int | None = None):
    """Run JobCheckpoint's batch-end hook over ``steps`` optimizer steps; return the steps that decided, and
    the step the fit was told to stop at."""
    guard = PreemptionGuard()
    callback = JobCheckpoint(dirpath=tmp_path, every_n_train_steps=ckpt_every, guard=guard, decide_every=every)
    strategy = CountingStrategy()
    trainer = SimpleNamespace(world_size=world_size, global_step=0, strategy=strategy, should_stop=False)
    callback._seen_step = 0
    callback._save_last_checkpoint = lambda *a: None
    callback._monitor_candidates = lambda t: {}
    for step in range(1, steps + 1):
        trainer.global_step = strategy.step = step
        if step % ckpt_every == 0:
            callback._last_global_step_saved = step
        if signal_at is not None and step == signal_at:
            guard.signum = 10
        callback.on_train_batch_end(trainer, None, None, None, step - 1)
        if trainer.should_stop:
            return strategy.decisions, step
    return strategy.decisions, None


def test_ranks_agree_on_a_signal_every_few_steps_and_at_checkpoints_not_every_step(drive):
    decisions, stopped = drive(world_size=8, steps=100, every=10, ckpt_every=25)
    # before: one all-reduce and host read per step (100); now at multiples of 10 and at checkpoint steps
    assert decisions == sorted({*range(10, 101, 10), 25, 75})
    assert stopped is None


def test_a_signal_on_a_multi_rank_island_stops_at_the_next_decision(drive):
    decisions, stopped = drive(world_size=2, steps=100, every=10, ckpt_every=1000, signal_at=13)
    assert stopped == 20 and decisions == [10, 20]


def test_one_process_reads_its_own_flag_every_step_without_a_collective(drive):
    decisions, stopped = drive(world_size=1, steps=30, every=10, ckpt_every=1000, signal_at=13)
    assert decisions == [] and stopped == 13


def test_a_decision_interval_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        JobCheckpoint(dirpath=tmp_path, decide_every=0)


# A sitecustomize in the ranks' path counts every Python-level tensor collective each rank makes.
COUNTER = textwrap.dedent(
    """
    import atexit, os
    import torch.distributed as dist

    counts = {"all_reduce": 0, "broadcast": 0}

    def counting(name):
        original = getattr(dist, name)
        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        setattr(dist, name, call)

    for name in counts:
        counting(name)

    @atexit.register
    def write():
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
        with open(os.path.join(os.environ["DDM_COUNT_DIR"], f"rank-{rank}.txt"), "w") as f:
            f.write(f"{counts['all_reduce']} {counts['broadcast']}")
    """
)


@pytest.mark.slow
def test_a_two_rank_ddp_expert_makes_far_fewer_collectives_than_steps(tmp_path):
    steps = 24
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    hooks, counts = tmp_path / "hooks", tmp_path / "counts"
    hooks.mkdir()
    counts.mkdir()
    (hooks / "sitecustomize.py").write_text(COUNTER)
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", DDM_COUNT_DIR=str(counts))
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), os.getcwd(), env.get("PYTHONPATH", "")])
    env.pop("DDM_STAGE", None)
    cmd = [sys.executable, "-m", "ddm", "train-expert", f"run_dir={rd.root}", *FAST_JOB]
    cmd += ["island.devices=2", "island.strategy=ddp", f"expert.steps={steps}", "expert.ckpt_every=12"]
    cmd += ["expert.nan_check_every=12"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = sorted(counts.glob("rank-*.txt"))
    assert len(files) == 2, [f.name for f in files]
    for f in files:
        all_reduce, broadcast = map(int, f.read_text().split())
        # Before: Lightning's SIGTERM broadcast and the signal all-reduce on each of the 24 steps (48 and more).
        # Now: the signal and NaN decisions at steps 12 and 24, the checkpoints' decisions, and set-up.
        assert all_reduce + broadcast < steps, (f.name, all_reduce, broadcast)
