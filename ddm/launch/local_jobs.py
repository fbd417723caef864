"""A run's training jobs as processes on this machine, for ``ddm submit submit.launcher=local`` and
``ddm pipeline pipeline.parallel=N``.

The jobs' commands, how the machine is divided among them
(``ddm.launch.slots``), and what to tell the user when some fail or are
stopped. The processes themselves are ``ddm.launch.local``'s.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.cores import available_cores
from ddm.errors import JobFailed
from ddm.io import read_json
from ddm.launch import local, slots
from ddm.launch.overrides import job_overrides, override_key
from ddm.settings import Island, Settings

log = logging.getLogger("ddm")


def machine_plan(parallel, island: Island, key: str, jobs: int | None = None, cores: int | None = None) -> slots.Plan:
    """The slots of this machine for ``parallel`` of ``jobs`` jobs of ``island`` (``key``: the option, for errors);
    ``cores``: the cores they share (None: those this process may use)."""
    gpus = None
    if str(island.accelerator).lower() in (*slots.GPU_ACCELERATORS, "auto"):
        from ddm.devices import visible_gpus  # torch, only where GPUs matter

        gpus = visible_gpus()
    return slots.plan(parallel, island, key, gpus, available_cores() if cores is None else cores, jobs)


def thread_args(plan: slots.Plan, user_overrides: list[str]) -> list[str]:
    """``island.threads=<cores // jobs>`` for CPU jobs, unless the user set ``island.threads`` themselves."""
    if plan.threads is None or any(override_key(o) == "island.threads" for o in user_overrides):
        return []
    return [f"island.threads={plan.threads}"]


def show(jobs: list[local.LocalJob], plan: slots.Plan, user_overrides: list[str]) -> None:
    """What a dry run would start: each job's command line, as ``train_here`` starts it, then the slots."""
    if not jobs:
        return
    for job in jobs:
        print(f"# {job.name}: would run in {job.folder}\n{shlex.join([*job.argv, *thread_args(plan, user_overrides)])}")
    print(f"# {plan.describe()}")


def local_jobs(
    cfg: Settings, rd: RunDir, experts: list[int], router: bool, overrides: list[str], python=None, where=None
):
    """The jobs of ``experts`` (and the router), started with the overrides a SLURM job gets; their logs go to
    ``rd``'s job folders. ``where``: the run as the jobs are given it (a bucket's URL), ``rd`` by default."""
    args = job_overrides(list(overrides), str(cfg.name), str(where or rd.root))
    jobs = [local.expert_local_job(rd.root, k, args, python) for k in experts]
    if router:
        jobs.append(local.router_local_job(rd.root, args, python))
    return jobs


def _why(o: local.Outcome) -> str:
    """What a failed job said: its own failed.json when this attempt wrote one, else its last line of output."""
    failed = o.job.folder / "failed.json"
    if o.returncode != 2 and failed.exists() and failed.stat().st_mtime >= o.started_at - 1:
        try:
            info = read_json(failed)
            return f"{info.get('error_type', 'error')}: {info.get('message', '')} (see {failed})"
        except (OSError, ValueError):
            pass
    return o.last_line() or f"exit status {o.returncode}"


def train_here(jobs: list[local.LocalJob], plan: slots.Plan, user_overrides: list[str]) -> dict:
    """Run ``jobs`` on this machine in ``plan``'s slots and wait for them; return each job's state.

    A signal that stopped the launcher exits with 128 + its number once every job has saved and
    stopped; jobs that failed or were stopped from outside raise ``JobFailed`` after the others finished.
    """
    if not jobs:
        return {}
    log.info("local: %s: %s", ", ".join(j.name for j in jobs), plan.describe())
    started = time.monotonic()
    launch = local.run_jobs(jobs, plan, extra=thread_args(plan, user_overrides))
    states = {o.job.name: o.state for o in launch.outcomes}
    log.info(
        "local: %s in %.0fs",
        "; ".join(f"{n} {s}" for n, s in states.items()),
        time.monotonic() - started,
    )
    if launch.signum is not None:
        log.warning("local: stopped by a signal; run the same command again to resume the unfinished jobs")
        raise SystemExit(128 + launch.signum)
    bad = launch.by_state("failed") + launch.by_state("stopped")
    if bad:
        lines = []
        for o in bad:
            what = _why(o) if o.state == "failed" else "stopped by a signal from outside; it resumes when started again"
            lines.append(f"{o.job.name} {o.state}: {what} (log: {o.log})")
        raise JobFailed(
            f"{len(bad)} of {len(jobs)} jobs did not finish: " + "; ".join(lines) + ". Fix what they say and run "
            "the same command again: finished jobs are not rerun, the others resume from their last.ckpt"
        )
    return states


def run_in_background(run_dir, user_overrides: list[str]) -> dict:
    """Start this same ``ddm submit`` again in the background, waiting for its jobs there; return at once."""
    argv = [sys.executable, "-m", "ddm", "submit", *[o for o in user_overrides if override_key(o) != "submit.wait"]]
    argv.append("submit.wait=true")
    path = local.log_path(Path(run_dir) / "local", time.strftime("%Y%m%d-%H%M%S"), prefix="launcher")
    proc = local.detach(argv, path)
    log.info(
        "submit: the launcher runs in the background (pid %d; its log %s); `ddm status` shows the jobs, "
        "`kill %d` stops them (a training job saves last.ckpt first)",
        proc.pid,
        path,
        proc.pid,
    )
    return dict(launcher_pid=proc.pid, launcher_log=str(path))
