"""`ddm submit submit.launcher=local` and `ddm pipeline pipeline.parallel=N`: a run's experts as real
`ddm train-expert` processes on this machine, N at a time, queued, stopped, killed and resumed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ddm.cores import available_cores
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.stages import pipeline, status, submit
from ddm.train.checkpoint_io import SLOW_CHECKPOINT_ENV
from tests.fabricate import FAST_JOB
from tests.test_faults import complete
from tests.test_submit import fake_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # generous: other test suites may share these two cores
# The fast job, with the threads left to the launcher to divide.
LOCAL_JOB = [o for o in FAST_JOB if not o.startswith("island.threads")]


def overrides_for(rd, *extra) -> list[str]:
    return ["experiment=tiny", f"run_dir={rd.root}", *LOCAL_JOB, "expert.steps=3", "submit.launcher=local", *extra]


def launch(make_cfg, rd, *extra):
    ovr = overrides_for(rd, *extra)
    return submit.run(make_cfg(*ovr, run_dir=rd.root), overrides=ovr)


def local_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("local: ")]


def the_log(folder: Path) -> str:
    (path,) = folder.glob("local-*.out")
    return path.read_text()


class Launcher:
    """`python -m ddm submit ...` in a subprocess, its output in a file."""

    def __init__(self, rd, log: Path, *extra: str, env: dict | None = None):
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", SLOW_CHECKPOINT_ENV))}
        base["PYTHONPATH"] = str(ROOT) + os.pathsep + base.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "ddm", "submit", *overrides_for(rd, *extra)]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def finish(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the launcher did not exit in {TIMEOUT}s:\n{self.output()[-3000:]}")


def checkpointed(rd, k: int):
    return lambda: complete(rd.expert(k) / "checkpoints" / "last.ckpt") and (rd.expert(k) / "lock.json").exists()


def test_two_experts_train_side_by_side_each_in_its_own_process(make_cfg, tmp_path, caplog):

    rd = fake_run(tmp_path / "run", k=2)
    with caplog.at_level("INFO", logger="ddm"):
        result = launch(make_cfg, rd, "submit.parallel=2", "submit.router=false")
    assert result["experts_started"] == [0, 1] and result["jobs"] == {"expert-00": "done", "expert-01": "done"}
    lines = local_messages(caplog)
    starts = [i for i, m in enumerate(lines) if m.startswith("local: started")]
    ends = [i for i, m in enumerate(lines) if re.fullmatch(r"local: \S+ done in \d+s", m)]
    assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends), lines  # both ran at once
    threads = max(1, available_cores() // 2)  # the cores divided between the two
    for k in range(2):
        record = read_json(rd.expert_record(k))
        assert record["steps"] == 3 and record["hardware"]["cpu_threads"] == threads
        header = the_log(rd.expert(k)).splitlines()[0]
        assert f" -m ddm train-expert expert.id={k} " in header and f"island.threads={threads}" in header
        assert f"hydra.run.dir={rd.expert(k).resolve()}/hydra/local-" in header
        assert not (rd.expert(k) / "lock.json").exists()
    assert not rd.router.exists()
    assert [e["state"] for e in status.run(make_cfg(f"run_dir={rd.root}"))["experts"]] == ["done", "done"]


def test_jobs_beyond_the_slots_wait_their_turn(make_cfg, tmp_path, caplog):
    rd = fake_run(tmp_path / "run", k=3)
    with caplog.at_level("INFO", logger="ddm"):
        result = launch(make_cfg, rd, "submit.parallel=2", "router.steps=3", "router.eval_samples=20")
    assert result["jobs"] == {"expert-00": "done", "expert-01": "done", "expert-02": "done", "router": "done"}
    lines = local_messages(caplog)
    start_of = {m.split()[2]: i for i, m in enumerate(lines) if m.startswith("local: started")}
    first_end = min(i for i, m in enumerate(lines) if re.fullmatch(r"local: \S+ done in \d+s", m))
    assert start_of["expert-00"] < first_end and start_of["expert-01"] < first_end
    assert start_of["expert-02"] > first_end and start_of["router"] > first_end  # queued until a slot freed
    assert all(read_json(rd.expert_record(k))["steps"] == 3 for k in range(3)) and rd.router_record.exists()
    again = launch(make_cfg, rd, "submit.parallel=2")
    assert again["experts_done"] == [0, 1, 2] and again["router"] == "done" and again["jobs"] == {}


def test_a_killed_expert_is_reported_and_resumes_when_submitted_again(make_cfg, tmp_path):
    rd = fake_run(tmp_path / "run", k=2)
    steps = ["expert.steps=24", "expert.ckpt_every=4", "submit.parallel=2", "submit.router=false"]
    launcher = Launcher(rd, tmp_path / "launcher.log", *steps, env={SLOW_CHECKPOINT_ENV: "1"})
    launcher.wait_for(checkpointed(rd, 0), "a first checkpoint of expert 0")
    os.kill(read_json(rd.expert(0) / "lock.json")["pid"], signal.SIGKILL)  # no chance to save or unlock
    assert launcher.finish() == 2, launcher.output()[-3000:]
    out = launcher.output()
    assert "1 of 2 jobs did not finish: expert-00 failed" in out, out[-3000:]
    assert rd.expert_record(1).exists() and not rd.expert_record(0).exists()  # the other one finished

    result = launch(make_cfg, rd, *steps)  # at full speed; it takes over the dead job's lock
    assert result["experts_done"] == [1] and result["jobs"] == {"expert-00": "done"}
    record = read_json(rd.expert_record(0))
    assert record["steps"] == 24 and record["resumed_from"] and record["attempts"] >= 2
    assert "taking over the stale lock" in the_log_newest(rd.expert(0))


def the_log_newest(folder: Path) -> str:
    return max(folder.glob("local-*.out"), key=lambda p: p.stat().st_mtime_ns).read_text()


def test_sigterm_to_the_launcher_stops_each_job_at_a_checkpoint(make_cfg, tmp_path):
    rd = fake_run(tmp_path / "run", k=1)
    launcher = Launcher(
        rd, tmp_path / "launcher.log", "expert.steps=24", "expert.ckpt_every=4", "submit.router=false",
        env={SLOW_CHECKPOINT_ENV: "1"},
    )  # fmt: skip
    launcher.wait_for(checkpointed(rd, 0), "a first checkpoint")
    child = read_json(rd.expert(0) / "lock.json")["pid"]
    row = status.run(make_cfg(f"run_dir={rd.root}"))["experts"][0]
    assert row["state"] == "running" and f"pid {child} " in row["detail"]  # seen through its lock

    launcher.proc.send_signal(signal.SIGTERM)
    assert launcher.finish() == 128 + signal.SIGTERM, launcher.output()[-3000:]
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    job_log = the_log(rd.expert(0))
    assert "received SIGTERM" in job_log and "saved " in job_log, job_log[-3000:]
    last = rd.expert(0) / "checkpoints" / "last.ckpt"
    assert complete(last) and not rd.expert_record(0).exists() and not (rd.expert(0) / "failed.json").exists()
    assert not (rd.expert(0) / "lock.json").exists()
    assert "run the same command again to resume" in launcher.output()


def test_a_detached_launcher_runs_the_jobs_in_the_background(make_cfg, tmp_path):
    rd = fake_run(tmp_path / "run", k=1)
    result = launch(make_cfg, rd, "submit.wait=false", "submit.router=false", "expert.steps=2")
    assert result["jobs"] == {} and result["launcher_pid"] != os.getpid()  # it returned at once
    background = psutil.Process(result["launcher_pid"])
    background.wait(TIMEOUT)
    text = Path(result["launcher_log"]).read_text()
    assert "submit.wait=true" in text.splitlines()[0] and "expert-00 done" in text, text[-3000:]
    assert read_json(rd.expert_record(0))["steps"] == 2


def test_pipeline_trains_its_experts_side_by_side(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddm", "pipeline", "experiment=tiny", f"run_dir={run_dir}", *LOCAL_JOB]
    cmd += ["expert.steps=3", "router.steps=3", "sample.per_class=1", "pipeline.parallel=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2 * TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "local: expert-00, expert-01: 2 at a time" in out.stderr
    for k in range(2):
        folder = run_dir / "experts" / f"expert-{k:02d}"
        assert read_json(folder / "record.json")["steps"] == 3
        assert "pipeline.parallel" not in the_log(folder).splitlines()[0]  # the pipeline's own option stays
        assert (folder / "timing.json").exists()  # the child timed itself, for the report
    assert (run_dir / "report.md").exists() and (run_dir / "samples" / "grid.png").exists()


# ---- what is refused, before anything starts ----------------------------------------------------
@pytest.mark.parametrize(
    "option, message",
    [
        ("submit.parallel=0", r"submit.parallel=0: at least one job must run at a time"),
        ("submit.parallel=-2", r"submit.parallel=-2: at least one job"),
        # refused at the door: a value of the wrong type never reaches the launcher
        ("submit.parallel=two", r"submit.parallel='two' is not an integer or 'auto': give submit.parallel an integer"),
        ("submit.launcher=pbs", r"submit.launcher='pbs' is not one of slurm, local"),
        (
            "island.num_nodes=2",
            r"island.num_nodes=2: the local launcher \(submit.parallel\) runs jobs on this machine only",
        ),
        ("island=gpu", r"island.devices=1 GPU\(s\) per job but 0 visible here"),
    ],
)
def test_bad_options_are_refused_naming_them(make_cfg, tmp_path, monkeypatch, option, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # this machine has no GPU to give
    rd = fake_run(tmp_path / "run", k=2)
    with pytest.raises(BadInput, match=message):
        launch(make_cfg, rd, option)
    assert not rd.experts.exists()  # nothing started


def test_pipeline_refuses_a_bad_parallel_before_any_stage(make_cfg, tmp_path):
    with pytest.raises(BadInput, match="pipeline.parallel=0: at least one job"):
        pipeline.run(make_cfg("experiment=tiny", "pipeline.parallel=0"), overrides=[])
    assert not (tmp_path / "run").exists()


def test_a_dry_run_prints_the_commands_and_starts_nothing(make_cfg, tmp_path, capsys):
    rd = fake_run(tmp_path / "run", k=2)
    result = launch(make_cfg, rd, "submit.dry_run=true", "submit.parallel=2")
    out = capsys.readouterr().out
    assert result["experts_started"] == [0, 1] and result["router"] == "started"
    assert out.count(" -m ddm train-expert ") == 2 and " -m ddm train-router " in out and "2 at a time" in out
    assert not rd.experts.exists() and not rd.router.exists()


def test_slots_give_each_job_its_own_gpus_or_its_share_of_the_cores(make_cfg):
    from ddm.launch import slots

    one_gpu, eight_gpus, cpu = (make_cfg(o).island for o in ("island=gpu", "island=gpu8_ddp", "island=local_cpu"))
    plan = slots.plan(None, one_gpu, "k", gpus=["0", "1", "2"], cores=12)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in plan.slot_env] == ["0", "1", "2"] and plan.threads is None
    assert {e["OMP_NUM_THREADS"] for e in plan.slot_env} == {"4"}
    with_two = make_cfg("island=gpu8_ddp", "island.devices=2").island
    plan = slots.plan(None, with_two, "k", gpus=[f"GPU-{i}" for i in range(8)], cores=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in plan.slot_env] == [
        "GPU-0,GPU-1",
        "GPU-2,GPU-3",
        "GPU-4,GPU-5",
        "GPU-6,GPU-7",
    ]
    with pytest.raises(BadInput, match=r"k=2 jobs of 8 GPU\(s\) each need 16 GPUs; 8 are visible here, so at most k=1"):
        slots.plan(2, eight_gpus, "k", gpus=[str(i) for i in range(8)], cores=16)
    plan = slots.plan(3, cpu, "k", gpus=None, cores=8)
    assert plan.parallel == 3 and plan.threads == 2 and plan.gpus_per_job == 0
    # auto: every job at once, as far as the GPUs or cores go
    assert slots.plan("auto", one_gpu, "k", gpus=["0", "1", "2"], cores=12, jobs=2).parallel == 2
    assert (slots.plan(None, cpu, "k", gpus=None, cores=8, jobs=3).parallel, plan.threads) == (3, 2)
    assert slots.plan("auto", cpu, "k", gpus=None, cores=2, jobs=4).threads == 1
    assert slots.plan("auto", cpu, "k", gpus=None, cores=2, jobs=4).parallel == 2
