"""One job at a time in a job folder: its lock.json refuses a second job, is taken over when stale,
goes when the job ends, and shows a running job in `ddm status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from ddm.io import read_json, write_json
from ddm.stages import status, train_expert
from ddm.train.checkpoint_io import SLOW_CHECKPOINT_ENV
from tests.fabricate import make_partitions
from tests.test_faults import Job, ckpt_dir, complete
from tests.test_submit import cfg_for, fake_run


def dead_pid() -> int:
    """The pid of a process that ran and is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_process():
    """A real process on this host that outlives the test's checks."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def hand_written_lock(folder, pid: int, host: str | None = None, **fields) -> dict:
    """A lock.json as another job would have left it."""
    holder = dict(
        host=host or socket.gethostname(),
        pid=pid,
        started="2026-01-02T03:04:05+00:00",
        command="ddm train-expert expert.id=0",
        token="f" * 32,
        **fields,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock.json").write_text(json.dumps(holder))
    return holder


def test_a_second_job_on_a_busy_expert_refuses_naming_the_first(tmp_path):
    rd = make_partitions(tmp_path / "run")
    # The first job, under SLURM job 4242, kept alive by slow checkpoint saves and more steps than it will live
    # to take (it is killed below), however long the second job takes to start on a busy machine.
    steps = "expert.steps=100000"
    first = Job(rd.root, tmp_path / "first.log", steps, env={"SLURM_JOB_ID": "4242", SLOW_CHECKPOINT_ENV: "3"})
    try:
        first.wait_for(lambda: complete(ckpt_dir(rd) / "last.ckpt"), "a first checkpoint")
        held = read_json(rd.expert(0) / "lock.json")
        assert held["pid"] == first.proc.pid and held["slurm_job_id"] == "4242"

        second = Job(rd.root, tmp_path / "second.log", steps)
        assert second.finish() == 2, second.output()[-3000:]
        message = second.output().strip().splitlines()[-1]
        assert message.startswith("ddm train-expert: error: train-expert 0: ")
        for part in (f"pid {first.proc.pid}", f"host {socket.gethostname()}", "SLURM job 4242", "started 20"):
            assert part in message, message
        assert "scancel 4242" in message and "ddm status" in message
        # the refused job left no failure and no timing in the folder it was refused
        assert not (rd.expert(0) / "failed.json").exists() and not (rd.expert(0) / "timing.json").exists()
        assert read_json(rd.expert(0) / "lock.json")["pid"] == first.proc.pid
    finally:
        first.proc.kill()
        first.finish()


def test_a_stale_lock_of_a_dead_process_is_taken_over(fast_cfg, tmp_path, caplog):
    rd = make_partitions(tmp_path / "run")
    pid = dead_pid()
    hand_written_lock(rd.expert(0), pid)
    with caplog.at_level("WARNING", logger="ddm"):
        record = train_expert.run(fast_cfg("expert.steps=2"))
    assert record["steps"] == 2
    assert "taking over the stale lock" in caplog.text and f"process {pid} is no longer running" in caplog.text
    assert not (rd.expert(0) / "lock.json").exists()


def test_the_lock_is_held_while_training_and_removed_however_the_job_ends(fast_cfg, tmp_path, monkeypatch):
    from ddm.train.signals import Preempted

    rd = make_partitions(tmp_path / "run")
    original = train_expert.ExpertModule.training_step
    seen = []

    def watching(self, batch, idx, fail_at=None, signal_at=None):
        seen.append(read_json(rd.expert(0) / "lock.json"))
        if self.global_step == fail_at:
            raise RuntimeError("injected failure")
        if self.global_step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, idx)

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(train_expert.ExpertModule, "training_step", lambda s, b, i: watching(s, b, i, signal_at=1))
    with pytest.raises(Preempted):
        train_expert.run(fast_cfg("expert.steps=4"))
    assert not (rd.expert(0) / "lock.json").exists(), "a signal left the lock behind"

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", lambda s, b, i: watching(s, b, i, fail_at=2))
    with pytest.raises(RuntimeError, match="injected"):
        train_expert.run(fast_cfg("expert.steps=4"))
    assert (rd.expert(0) / "failed.json").exists()
    assert not (rd.expert(0) / "lock.json").exists(), "a failure left the lock behind"

    monkeypatch.setattr(train_expert.ExpertModule, "training_step", lambda s, b, i: watching(s, b, i))
    assert train_expert.run(fast_cfg("expert.steps=4"))["steps"] == 4
    assert not (rd.expert(0) / "lock.json").exists(), "a finished job left the lock behind"
    assert seen and all(h["pid"] == os.getpid() and h["host"] == socket.gethostname() for h in seen)
    assert len({h["token"] for h in seen}) == 3  # one lock per attempt


def test_redo_refuses_to_delete_the_folder_of_a_running_job(fast_cfg, tmp_path, live_process):
    rd = make_partitions(tmp_path / "run")
    train_expert.run(fast_cfg("expert.steps=2"))
    hand_written_lock(rd.expert(0), live_process.pid)
    with pytest.raises(RuntimeError, match=f"in use by another job, pid {live_process.pid}"):  # ddm.errors.Locked
        train_expert.run(fast_cfg("expert.steps=2", "redo=true"))
    assert rd.expert_record(0).exists()


def test_status_shows_a_job_holding_a_live_lock_as_running(make_cfg, tmp_path, monkeypatch, live_process, capsys):
    monkeypatch.setattr("ddm.launch.slurm.available", lambda: False)
    rd = fake_run(tmp_path / "run", k=3)
    hand_written_lock(rd.expert(0), dead_pid())  # a dead job: its lock means nothing
    hand_written_lock(rd.expert(1), live_process.pid)
    write_json(rd.expert(2) / "failed.json", dict(error="an earlier attempt"))
    hand_written_lock(rd.expert(2), live_process.pid)  # running again after a failure
    cfg, _ = cfg_for(make_cfg, rd.root)
    result = status.run(cfg)
    assert [e["state"] for e in result["experts"]] == ["missing", "running", "running"]
    detail = result["experts"][1]["detail"]
    assert f"pid {live_process.pid} on host {socket.gethostname()}" in detail
    assert f"pid {live_process.pid}" in capsys.readouterr().out


# ---- judging a lock from elsewhere --------------------------------------------------------------
@pytest.fixture
def slurm_bin(tmp_path, monkeypatch):
    """SLURM's client commands, first on PATH; `scontrol show job` answers the state written in STATE."""
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    state = tmp_path / "state"
    for name in ("sbatch", "squeue"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
    (bindir / "scontrol").write_text(
        f'#!/bin/sh\nif [ -s "{state}" ]; then read s < "{state}"; echo "JobId=$4 JobState=$s"; '
        'else echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi\n'
    )
    for p in bindir.iterdir():
        p.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    return state


def test_a_lock_from_another_host_is_judged_by_slurm(tmp_path, slurm_bin, monkeypatch):
    from ddm.errors import Locked
    from ddm.launch import lock

    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    holder = hand_written_lock(tmp_path / "job", 123, host="node-elsewhere", slurm_job_id="77")
    slurm_bin.write_text("RUNNING")
    assert lock.judge(holder).state == lock.LIVE
    with pytest.raises(Locked, match=r"pid 123 on host node-elsewhere \(SLURM job 77\).*scancel 77"):
        lock.acquire(tmp_path / "job", "train-expert 0")
    slurm_bin.write_text("COMPLETED")
    assert lock.judge(holder) == lock.Verdict(lock.STALE, "SLURM job 77 is COMPLETED")
    slurm_bin.write_text("")  # purged from the controller
    assert lock.judge(holder).state == lock.STALE
    (tmp_path / "slurm-bin" / "scontrol").write_text(
        "#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n"
    )
    assert lock.judge(holder).state == lock.UNKNOWN  # cannot ask: never taken for ended


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    from ddm.launch import lock

    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM command to ask
    holder = hand_written_lock(tmp_path / "job", 123, host="node-a", slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert lock.judge(holder).state == lock.UNKNOWN  # the same instance of job 77, on another node
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what SLURM sets in a requeued job
    assert lock.judge(holder).state == lock.STALE
    taken = lock.acquire(tmp_path / "job", "train-expert 0")
    assert read_json(tmp_path / "job" / "lock.json")["token"] == taken["token"]
    lock.release(tmp_path / "job", taken)
    assert not (tmp_path / "job" / "lock.json").exists()


def test_a_lock_nothing_here_can_check_is_refused_with_what_to_do(tmp_path, monkeypatch):
    from ddm.errors import Locked
    from ddm.launch import lock

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    hand_written_lock(tmp_path / "job", 123, host="laptop")
    with pytest.raises(Locked, match=r"cannot be checked.*If you know that job is dead, delete .*lock.json"):
        lock.acquire(tmp_path / "job", "train-expert 0")


def test_only_global_rank_zero_takes_the_lock(tmp_path, monkeypatch, live_process):
    from ddm.launch import lock

    assert lock.is_global_rank_zero({})
    assert lock.is_global_rank_zero(dict(SLURM_PROCID="0", LOCAL_RANK="0"))
    for env in (dict(LOCAL_RANK="1"), dict(SLURM_PROCID="3"), dict(RANK="1"), dict(NODE_RANK="1", LOCAL_RANK="0")):
        assert not lock.is_global_rank_zero(env), env
    hand_written_lock(tmp_path / "job", live_process.pid)  # rank 0 of the same job holds it
    monkeypatch.setenv("LOCAL_RANK", "1")
    with lock.job_lock(tmp_path / "job", "train-expert 0") as held:
        assert held is None  # rank 1 neither refuses nor takes it
    assert read_json(tmp_path / "job" / "lock.json")["pid"] == live_process.pid
