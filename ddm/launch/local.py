"""The local launcher: a run's training jobs as processes on this machine, N at a time, no scheduler.

Each job is one ``python -m ddm train-expert`` (or ``train-router``)
process, started with the overrides a SLURM job gets
(``ddm.launch.overrides``), in a slot of its own (``ddm.launch.slots``: its
GPUs, or its share of the cores); the other jobs wait in a queue and start as
slots free. A job's output goes to ``local-<time>-<launcher pid>.out`` in its
own folder, and its Hydra logs to ``hydra/local-<time>`` there, as a SLURM
job's do. Nothing else is shared between the jobs.

SIGINT (Ctrl-C) and SIGTERM reach only the launcher: each job runs in its own
session, so a terminal's Ctrl-C does not hit it mid-step. The launcher passes
them on as SIGTERM, which makes each job save ``last.ckpt`` at its next step
and exit (``ddm.train.signals``); queued jobs are not started. Running the
same command again resumes them. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ddm.job_names import ROUTER_JOB, expert_job
from ddm.launch.overrides import hydra_value
from ddm.launch.slots import Plan

log = logging.getLogger("ddm")

FORWARDED = (signal.SIGINT, signal.SIGTERM)
# Set by a launcher (Lightning's, torchrun, the CLI) for the process it started; a job started here
# is a fresh job, not one of those processes (two DDP jobs given one MASTER_PORT would collide).
INHERITED_NOT = (
    "DDM_STAGE",
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class LocalJob:
    """One job to start: its name (``expert-03``, ``router``), its folder and the command, short of per-start args."""

    name: str
    folder: Path
    record: Path  # exists once the job finished
    argv: tuple[str, ...]


def _command(python: str | None, stage: str, args: list[str]) -> tuple[str, ...]:
    return (python or sys.executable, "-m", "ddm", stage, *args)


def expert_local_job(run_dir, k: int, overrides: list[str], python: str | None = None) -> LocalJob:
    """Expert ``k`` of the run as a local job; ``overrides`` as ``ddm.launch.overrides.job_overrides`` gives them."""
    folder = Path(run_dir).resolve() / "experts" / expert_job(k)
    return LocalJob(
        expert_job(k), folder, folder / "record.json", _command(python, "train-expert", [f"expert.id={k}", *overrides])
    )


def router_local_job(run_dir, overrides: list[str], python: str | None = None) -> LocalJob:
    folder = Path(run_dir).resolve() / "router"
    return LocalJob(ROUTER_JOB, folder, folder / "record.json", _command(python, "train-router", list(overrides)))


@dataclass
class Outcome:
    """How one job ended: ``returncode`` None when it never started (the launcher was stopped first)."""

    job: LocalJob
    returncode: int | None = None
    log: Path | None = None
    pid: int | None = None
    wall_s: float = 0.0
    started_at: float = 0.0  # time.time() at its start

    @property
    def state(self) -> str:
        """done, stopped (by a signal: it resumes when started again), failed, or not started."""
        if self.returncode is None:
            return "not started"
        if self.returncode == 0 and self.job.record.exists():
            return "done"
        if self.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT):
            return "stopped"
        return "failed"

    def last_line(self) -> str:
        """The job's last line of output: an expected error (exit status 2) is that one line."""
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, AttributeError):
            return ""
        return lines[-1].strip() if lines else ""


@dataclass
class Launch:
    """What ``run_jobs`` did: one outcome per job, and the signal that stopped the launcher, if one did."""

    outcomes: list[Outcome]
    signum: int | None = None

    def by_state(self, state: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.state == state]


def log_path(folder: Path, stamp: str, prefix: str = "local") -> Path:
    """``<folder>/<prefix>-<time>-<launcher pid>.out``, never an existing file."""
    path, n = folder / f"{prefix}-{stamp}-{os.getpid()}.out", 1
    while path.exists():
        n += 1
        path = folder / f"{prefix}-{stamp}-{os.getpid()}-{n}.out"
    return path


def job_environment(base: dict | None = None) -> dict:
    """This process's environment for a job it starts: what launchers set for their ranks removed."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in INHERITED_NOT}
    env["PYTHONUNBUFFERED"] = "1"  # its log file follows the job as it runs
    return env


@dataclass
class _Running:
    job: LocalJob
    proc: subprocess.Popen
    log: Path
    started: float  # time.monotonic()
    started_at: float  # time.time()
    signalled: int = 0


@dataclass
class _Stop:
    """The launcher's handler of SIGINT/SIGTERM: counts them; the loop passes each on to the jobs."""

    signum: int | None = None
    count: int = 0
    _previous: dict = field(default_factory=dict)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning(
                "local: %s: telling every running job to save last.ckpt and stop; queued jobs will not start",
                signal.Signals(signum).name,
            )
        self.signum = signum
        self.count += 1

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def _start(job: LocalJob, slot_env: dict, extra: list[str], env: dict) -> _Running:
    job.folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = log_path(job.folder, stamp)
    # each job keeps Hydra's own logs in its folder, as under SLURM, instead of one shared, timestamped one
    argv = [*job.argv, f"hydra.run.dir={hydra_value(f'{job.folder}/hydra/local-{stamp}-{os.getpid()}')}", *extra]
    with open(path, "x") as out:
        out.write(f"# {shlex.join(argv)}\n# {' '.join(f'{k}={v}' for k, v in slot_env.items())}\n")
        out.flush()
        proc = subprocess.Popen(
            argv,
            env={**env, **slot_env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher only; it forwards SIGTERM
        )
    where = ", ".join(f"{k}={v}" for k, v in slot_env.items() if k == "CUDA_VISIBLE_DEVICES")
    log.info("local: started %s (pid %d%s) -> %s", job.name, proc.pid, f", {where}" if where else "", path)
    return _Running(job, proc, path, time.monotonic(), time.time())


def run_jobs(jobs: list[LocalJob], plan: Plan, extra: list[str] = (), env: dict | None = None, poll_s=0.2) -> Launch:
    """Run ``jobs`` in ``plan``'s slots, queueing the rest; return when every started job has ended.

    ``extra``: arguments every job gets after its own (``island.threads=...``).
    """
    env = job_environment() if env is None else env
    pending, free = deque(jobs), deque(range(plan.parallel))
    running: dict[int, _Running] = {}
    outcomes: dict[str, Outcome] = {job.name: Outcome(job) for job in jobs}
    with _Stop() as stop, _stopped_on_error(running):
        while pending or running:
            while pending and free and stop.signum is None:
                slot = free.popleft()
                running[slot] = _start(pending.popleft(), plan.slot_env[slot], list(extra), env)
            for slot, r in list(running.items()):
                if r.signalled < stop.count:
                    r.signalled = stop.count
                    # the job's own process only: its loader workers die with it, not mid-batch
                    r.proc.send_signal(signal.SIGTERM)
                code = r.proc.poll()
                if code is None:
                    continue
                done = Outcome(r.job, code, r.log, r.proc.pid, round(time.monotonic() - r.started, 1), r.started_at)
                outcomes[r.job.name] = done
                _log_end(done)
                del running[slot]
                free.append(slot)
            if stop.signum is not None:
                pending.clear()
            if running:
                time.sleep(poll_s)
    return Launch([outcomes[job.name] for job in jobs], stop.signum)


@contextlib.contextmanager
def _stopped_on_error(running: dict[int, _Running]):
    """Should the launcher itself fail, its jobs still save and stop rather than run on unattended."""
    try:
        yield
    except BaseException:
        for r in running.values():
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in running.values():
            try:
                r.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                log.error("local: %s (pid %d) did not stop within 600s after SIGTERM", r.job.name, r.proc.pid)
        raise


def _log_end(o: Outcome) -> None:
    if o.state == "done":
        log.info("local: %s done in %.0fs", o.job.name, o.wall_s)
    elif o.state == "stopped":
        log.warning(
            "local: %s stopped after %.0fs (exit %s): it resumes when started again", o.job.name, o.wall_s, o.returncode
        )
    else:
        log.error("local: %s failed (exit %s) after %.0fs: %s", o.job.name, o.returncode, o.wall_s, o.last_line())


def detach(argv: list[str], log_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``argv`` in a session of its own, its output in ``log_file``: it outlives this process and its terminal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "x") as out:
        out.write(f"# {shlex.join(argv)}\n")
        out.flush()
        return subprocess.Popen(
            argv,
            env=job_environment() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
