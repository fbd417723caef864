"""Fault injection: real `ddm train-expert` processes killed, signalled and resumed.

Each test starts the command line in a subprocess on a fabricated partition,
hurts it once a checkpoint exists, and runs the same command again: the
rerun must resume from a complete checkpoint and end at exactly expert.steps.
The first process is kept alive long enough to be hurt by the test-only hook
DDM_FAULT_SLOW_CHECKPOINT_S (every checkpoint save sleeps before its rename);
reruns go at full speed.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddm.io import read_json
from ddm.train.checkpoint_io import (
    SLOW_CHECKPOINT_ENV,
    AtomicCheckpointIO,
    inspect_checkpoint,
    is_temp_file,
    latest_complete_checkpoint,
)
from ddm.train.signals import PreemptionGuard, stop_after_preemption
from tests.fabricate import FAST_JOB, make_partitions

ROOT = Path(__file__).resolve().parent.parent
STEPS, CKPT_EVERY = 24, 4
FAST = [*FAST_JOB, "expert.log_every=1", f"expert.steps={STEPS}", f"expert.ckpt_every={CKPT_EVERY}"]
TIMEOUT = 240  # generous: other test suites may share these two cores


# ---- the pieces, in this process ---------------------------------------------------------------
def fake_checkpoint(step: int, **ddm) -> dict:
    return dict(global_step=step, state_dict={"w": torch.ones(3)}, loops={}, optimizer_states=[], callbacks={}, ddm=ddm)


def test_atomic_save_keeps_the_old_file_when_a_save_fails(tmp_path):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(fake_checkpoint(2), target)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # lambdas do not pickle
        io.save_checkpoint(dict(fake_checkpoint(4), bad=lambda: 0), target)
    assert step_of(target) == 2 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, caplog):
    io = AtomicCheckpointIO()
    io.save_checkpoint(fake_checkpoint(4, clustering_id="a"), tmp_path / "step-0000004.ckpt")
    io.save_checkpoint(fake_checkpoint(6, clustering_id="a"), tmp_path / "step-0000006.ckpt")
    io.save_checkpoint(fake_checkpoint(6, clustering_id="a"), tmp_path / "last.ckpt")
    assert latest_complete_checkpoint(tmp_path).name == "last.ckpt"  # a tie goes to last.ckpt
    (tmp_path / "last.ckpt").write_bytes(b"garbage")
    torch.save({"global_step": 9}, tmp_path / "step-0000009.ckpt")  # loads, but is no Lightning checkpoint
    (tmp_path / ".step-0000008.ckpt.1.tmp").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="ddm"):
        assert latest_complete_checkpoint(tmp_path, dict(clustering_id="a")).name == "step-0000006.ckpt"
    assert "last.ckpt" in caplog.text and "step-0000009.ckpt: it lacks" in caplog.text
    assert not (tmp_path / ".step-0000008.ckpt.1.tmp").exists()
    with pytest.raises(ValueError, match="clustering_id: checkpoint 'a' vs now 'b'"):
        latest_complete_checkpoint(tmp_path, dict(clustering_id="b"))
    assert latest_complete_checkpoint(tmp_path / "absent") is None


def test_guard_turns_signals_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.requested and guard.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_exit_status_after_a_signal(tmp_path, monkeypatch, fake_scontrol):
    guard = PreemptionGuard()
    guard.signum = signal.SIGUSR1
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert stop_after_preemption(guard, "job", 3, requeue=True).code == 128 + signal.SIGUSR1  # not SLURM
    path_env, calls = fake_scontrol
    monkeypatch.setenv("PATH", path_env["PATH"])
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert stop_after_preemption(guard, "job", 3, requeue=False).code == 128 + signal.SIGUSR1
    assert not calls.exists()
    assert stop_after_preemption(guard, "job", 3, requeue=True, is_global_zero=False).code == 0
    assert not calls.exists()  # only rank 0 requeues
    assert stop_after_preemption(guard, "job", 3, requeue=True).code == 0
    assert calls.read_text() == "requeue 99\n"
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\nexit 1\n")  # scontrol fails: say so, exit non-zero
    assert stop_after_preemption(guard, "job", 3, requeue=True).code == 128 + signal.SIGUSR1


def test_sigterm_never_requeues(monkeypatch, fake_scontrol):
    """scancel sends SIGTERM: a cancelled job must stay cancelled, whatever expert.requeue says."""
    guard = PreemptionGuard()
    guard.signum = signal.SIGTERM
    path_env, calls = fake_scontrol
    monkeypatch.setenv("PATH", path_env["PATH"])
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert stop_after_preemption(guard, "job", 3, requeue=True).code == 128 + signal.SIGTERM
    assert not calls.exists()


# ---- real processes ----------------------------------------------------------------------------
class Job:
    """One `python -m ddm train-expert` process, its output in a log file."""

    def __init__(self, run_dir: Path, log: Path, *overrides: str, env: dict | None = None):
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", SLOW_CHECKPOINT_ENV))}
        base.setdefault("WANDB_MODE", "offline")
        base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "ddm", "train-expert", f"run_dir={run_dir}", *FAST, *overrides]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
            )

    def kill_all(self) -> None:
        """SIGKILL the job and every process it started, as SLURM kills a job's whole cgroup.

        wandb's service runs in a session of its own and outlives a killed parent for a
        while; left alive it would still hold the run id when the rerun starts.
        """
        import psutil

        helpers = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()  # the job itself first, so it starts nothing more; its status is read by finish()
        for p in helpers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(helpers, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the job did not exit in {timeout}s:\n{self.output()[-3000:]}")


def ckpt_dir(rd) -> Path:
    return rd.expert(0) / "checkpoints"


def complete(path: Path) -> bool:
    return path.is_file() and inspect_checkpoint(path)[1] is None


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def rerun_to_the_end(rd, tmp_path: Path, *overrides: str, env: dict | None = None) -> dict:
    """Run the same command again at full speed; it must finish at exactly STEPS."""
    job = Job(rd.root, tmp_path / "rerun.log", *overrides, env=env)
    assert job.finish() == 0, job.output()[-3000:]
    record = read_json(rd.expert_record(0))
    assert record["steps"] == STEPS and record["samples_seen"] == STEPS * 8
    assert record["resumed_from"], "the rerun must resume, not start over"
    assert record["attempts"] >= 2 and record["wall_s"] >= record["wall_s_this_attempt"]
    assert not (rd.expert(0) / "failed.json").exists()
    assert not [p for p in ckpt_dir(rd).iterdir() if is_temp_file(p)]
    return record


@pytest.fixture
def fake_scontrol(tmp_path):
    """An `scontrol` first on PATH that only records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "scontrol.calls"
    script = bindir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(0o755)
    return dict(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}"), calls


# A SLURM batch step as Lightning sees it: with these it would install its own SIGUSR1 requeue handler.
SLURM_ENV = dict(
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="1",
    SLURM_NTASKS_PER_NODE="1",
    SLURM_PROCID="0",
    SLURM_LOCALID="0",
    SLURM_NODEID="0",
    SLURM_JOB_NAME="ddm-test",
    SLURM_NODELIST="localhost",
)


def test_sigusr1_under_slurm_saves_requeues_and_resumes(tmp_path, fake_scontrol):
    rd = make_partitions(tmp_path / "run")
    path_env, calls = fake_scontrol
    job = Job(rd.root, tmp_path / "first.log", env={**path_env, **SLURM_ENV, SLOW_CHECKPOINT_ENV: "1"})
    job.wait_for(lambda: complete(ckpt_dir(rd) / "last.ckpt"), "a first checkpoint")
    job.proc.send_signal(signal.SIGUSR1)
    assert job.finish() == 0, job.output()[-3000:]  # requeued: a clean exit

    out = job.output()
    assert calls.read_text().split("\n")[:-1] == ["requeue 4242"], out[-3000:]  # once: Lightning's handler is off
    last = ckpt_dir(rd) / "last.ckpt"
    assert complete(last) and CKPT_EVERY <= step_of(last) < STEPS
    assert "SIGUSR1" in out and "requeued" in out
    assert not rd.expert_record(0).exists() and not rd.expert_weights(0).exists()
    assert not (rd.expert(0) / "failed.json").exists()  # a requeue is not a failure
    assert not list(rd.expert(0).rglob("hpc_ckpt*"))

    # The requeued job: same SLURM job id, same command; it resumes and finishes.
    record = rerun_to_the_end(rd, tmp_path, env={**path_env, **SLURM_ENV})
    assert record["resumed_from"].endswith("last.ckpt")
    assert calls.read_text().count("requeue") == 1
    # Resubmitting the finished job changes nothing.
    stamp = rd.expert_record(0).stat().st_mtime_ns
    again = Job(rd.root, tmp_path / "again.log", env={**path_env, **SLURM_ENV})
    assert again.finish() == 0 and rd.expert_record(0).stat().st_mtime_ns == stamp
    assert "already done" in again.output()


def test_sigterm_without_requeue_saves_and_exits_nonzero(tmp_path, fake_scontrol):
    rd = make_partitions(tmp_path / "run")
    path_env, calls = fake_scontrol
    # Under SLURM but with expert.requeue=false: save, no requeue, exit 128 + SIGTERM.
    job = Job(
        rd.root,
        tmp_path / "first.log",
        "expert.requeue=false",
        env={**path_env, "SLURM_JOB_ID": "77", SLOW_CHECKPOINT_ENV: "1"},
    )
    job.wait_for(lambda: complete(ckpt_dir(rd) / "last.ckpt"), "a first checkpoint")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job.output()[-3000:]

    out = job.output()
    assert not calls.exists(), "requeue=false must not call scontrol"
    assert "SIGTERM" in out and "exiting with status 143" in out
    assert complete(ckpt_dir(rd) / "last.ckpt") and step_of(ckpt_dir(rd) / "last.ckpt") < STEPS
    assert not rd.expert_record(0).exists() and not (rd.expert(0) / "failed.json").exists()
    rerun_to_the_end(rd, tmp_path, "expert.requeue=false")


def test_kill_9_at_a_random_moment_resumes_with_the_same_wandb_run(tmp_path):
    rd = make_partitions(tmp_path / "run")
    delay = random.uniform(0.0, 2.5)
    # slow saves keep the first job alive for 5 s or more after its first checkpoint: longer than the delay
    job = Job(rd.root, tmp_path / "first.log", "logger=wandb", env={SLOW_CHECKPOINT_ENV: "0.5"})
    job.wait_for(lambda: complete(ckpt_dir(rd) / "last.ckpt"), "a first checkpoint")
    time.sleep(delay)
    if job.proc.poll() is not None:
        pytest.fail(f"the job finished before the kill after {delay:.2f}s:\n{job.output()[-3000:]}")
    job.kill_all()
    assert job.finish() == -signal.SIGKILL

    assert not rd.expert_record(0).exists()
    rerun_to_the_end(rd, tmp_path, "logger=wandb")

    # One wandb run, resumed: every offline run folder ends with the same stable id.
    runs = sorted(p.name for p in (rd.expert(0) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert len({name.rsplit("-", 1)[1] for name in runs}) == 1, runs


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    rd = make_partitions(tmp_path / "run")
    job = Job(rd.root, tmp_path / "first.log", env={SLOW_CHECKPOINT_ENV: "3"})
    folder = ckpt_dir(rd)
    job.wait_for(lambda: complete(folder / "last.ckpt"), "a first checkpoint")
    job.wait_for(
        lambda: folder.is_dir() and any(is_temp_file(p) for p in folder.iterdir()), "the next checkpoint write"
    )
    job.kill_all()
    assert job.finish() == -signal.SIGKILL

    temps = [p for p in folder.iterdir() if is_temp_file(p)]
    finished = sorted(p for p in folder.glob("*.ckpt"))
    assert temps, "the kill should have left the unfinished write behind"
    assert finished and all(complete(p) for p in finished), finished  # every named checkpoint loads
    assert step_of(folder / "last.ckpt") == CKPT_EVERY

    record = rerun_to_the_end(rd, tmp_path)
    assert not any(t.exists() for t in temps)
    assert "a checkpoint write that never finished" in (tmp_path / "rerun.log").read_text()
    assert record["resumed_from_step"] == CKPT_EVERY
