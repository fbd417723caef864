"""Stage ``submit``: start a run's unfinished expert jobs and its router job, on SLURM or on this machine.

    ddm submit name=big island=gpu                           # every unfinished expert + the router
    ddm submit name=big submit.experts=[0,1] island=gpu8_ddp # experts 0 and 1 on 8-GPU nodes...
    ddm submit name=big submit.experts=[2,3] island=gpu submit.router=false   # ...2 and 3 on single GPUs
    ddm submit name=big submit.dry_run=true                  # print the scripts, submit nothing
    ddm submit name=big submit.launcher=local island=gpu     # no scheduler: one process per GPU here
    ddm submit name=big submit.stage=prepare data.parts=16 ... # data/'s parts as an array job, then their merge
    ddm submit name=big submit.stage=encode vae=sd island=gpu ...  # one encode task per cluster not encoded
    ddm submit name=big submit.stage=sample sample.parts=8 ...     # the samples in 8 parts, then their join

Reads ``clusters/report.json`` (K) and the experts' records; asks ``squeue``
which of the run's jobs are queued or running, and each job folder's
``lock.json`` whether a job (started by hand, or by the local launcher) runs
there now. The experts that have no ``record.json``, no job in the queue and
no live lock go out as ONE array job whose indices are exactly their ids; the
router, which needs no expert, goes out as its own job. So submitting again is
always safe: a finished run submits nothing, and an interrupted expert is
submitted again and resumes from its ``last.ckpt``.

``submit.launcher=local`` runs the same jobs as processes on this machine
instead, ``submit.parallel`` at a time (``ddm.launch.local_jobs``), and waits
for them (``submit.wait=false``: a launcher in the background does).

Every other override of the ``ddm submit`` call (``island=...``,
``expert.steps=...``) is passed to the jobs, which therefore compose the
same config. Each script is kept under ``<run>/slurm/``; each job's log is
``slurm-*.out`` (``local-*.out``) in the job's own folder.

``submit.stage=prepare`` starts the jobs that write ``data/`` instead: its
``data.parts`` not done as one array job, then their merge
(``ddm.launch.stage_jobs``); they need neither clusters nor partitions.
``submit.stage=embed`` and ``partition`` do the same for ``embed.parts`` and
``cluster.partition_parts``, and ``submit.stage=encode`` sends one task per
cluster not encoded yet, with no merge (``ddm.launch.stage_parts``). ``submit.stage=sample`` sends the
``sample.parts`` not drawn yet, one GPU job each, then the job that joins them.
"""

from __future__ import annotations

import logging
import sys

from ddm.errors import BadInput, MissingInput
from ddm.launch import sbatch, slurm, stage_jobs
from ddm.launch.local_jobs import local_jobs, machine_plan, run_in_background, show, train_here
from ddm.launch.overrides import job_overrides
from ddm.launch.stage_parts import STAGES
from ddm.settings import Settings, Submit
from ddm.store.job_folders import RunView, run_view

log = logging.getLogger("ddm")

LAUNCHERS = ("slurm", "local")


def expert_ids(requested, k: int) -> list[int]:
    """The expert ids asked for (``submit.experts``; None: all K), checked against K."""
    ids = list(range(k)) if requested is None else sorted({int(i) for i in requested})
    bad = [i for i in ids if not 0 <= i < k]
    if bad:
        raise BadInput(
            f"submit.experts={list(requested)}: the run has K={k} clusters, so expert ids are "
            f"0..{k - 1}; {bad} do not exist"
        )
    return ids


def _require_inputs(view: RunView) -> int:
    rd = view.local
    report = view.read(rd.cluster_report)
    if report is None:
        raise MissingInput(
            f"no {view.name_of(rd.cluster_report)}: run `ddm cluster` and `ddm partition` for this run "
            f"first (they are quick and run on this machine)"
        )
    if view.read(rd.partitions_index) is None:
        raise MissingInput(f"no {view.name_of(rd.partitions_index)}: run `ddm partition` first")
    return int(report["k"])


def _queued(where: str, dry_run: bool):
    """The run's queued jobs; a dry run goes on without them when SLURM cannot be asked."""
    if not slurm.available():
        return {}, None
    try:
        return slurm.run_jobs(where)
    except slurm.SlurmError as e:
        if not dry_run:
            raise
        log.warning("submit: cannot read SLURM's queue (%s); the dry run assumes nothing is queued", e)
        return {}, None


def _queued_if_known(where: str):
    """The run's jobs in SLURM's queue, for the local launcher not to start them twice; none when SLURM cannot say."""
    if not slurm.available():
        return {}, None
    try:
        return slurm.run_jobs(where)
    except slurm.SlurmError as e:
        log.debug("submit: SLURM's queue is not readable here (%s); going by the job folders alone", e)
        return {}, None


def run(cfg: Settings, overrides: list[str] | None = None) -> dict:
    """Submit (or, with the local launcher, run) what is neither finished, queued nor running; return what was done.

    ``overrides``: the Hydra overrides to pass to the jobs. From the command
    line ``ddm.cli`` passes those Hydra parsed; a library caller passes them (the same list
    it composed ``cfg`` with).
    """
    view = run_view(cfg)
    rd = view.local
    sub = cfg.submit
    if cfg.redo:
        raise BadInput(
            "`ddm submit redo=true` is refused: a requeued job would start over and delete its own "
            "checkpoints. To retrain an expert, delete experts/expert-<id>/ and submit again."
        )
    launcher = str(sub.launcher)
    if launcher not in LAUNCHERS:
        raise BadInput(
            f"submit.launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}: slurm submits the jobs to SLURM, "
            f"local runs them as processes on this machine"
        )
    if str(sub.stage) in STAGES:  # a stage's parts: what it needs is its own
        if view.in_bucket:
            raise BadInput(
                f"submit.stage={sub.stage} runs a stage in parts, which a run in a bucket ({view.where}) does not do "
                f"yet: run `ddm {sub.stage} run_dir={view.where}` whole on one machine"
            )
        return stage_jobs.submit(STAGES[str(sub.stage)], cfg, rd, list(overrides or []))
    k = _require_inputs(view)
    ids = expert_ids(sub.experts, k)
    if launcher == "local":
        return _run_here(cfg, view, k, ids, sub, list(overrides or []))
    dry_run = bool(sub.dry_run)
    if not slurm.available() and not dry_run:
        raise slurm.SlurmError(slurm.NOT_AVAILABLE)

    queued_experts, queued_router = _queued(view.where, dry_run)
    done, queued, locked, todo = _sort_experts(view, ids, queued_experts)

    user = list(overrides or [])
    args = job_overrides(user, str(cfg.name), view.where)
    python = sub.python or sys.executable
    result = dict(
        run_dir=view.where,
        k=k,
        launcher="slurm",
        dry_run=dry_run,
        experts_done=done,
        experts_queued=queued,
        experts_locked=sorted(locked),
        experts_submitted=todo,
        expert_job=None,
        router="not asked",
        router_job=None,
        scripts=[],
    )

    if todo:
        path = sbatch.sbatch_script_path(rd.root, "expert-array")
        script = sbatch.expert_array_script(rd.root, todo, args, cfg.island, python=python, where=view.where)
        result["expert_job"] = sbatch.send(script, path, dry_run, [rd.expert(i) for i in todo])
        result["scripts"].append(str(path))

    if sub.router:
        result["router"] = _router_state(view, queued_router, "queued")
        if result["router"] == "to start":
            path = sbatch.sbatch_script_path(rd.root, "router")
            script = sbatch.router_script(rd.root, args, cfg.island, python=python, where=view.where)
            result["router_job"] = sbatch.send(script, path, dry_run, [rd.router])
            result["router"] = "submitted"
            result["scripts"].append(str(path))

    _log_summary(result, queued_experts)
    return result


def _sort_experts(view: RunView, ids: list[int], queued_experts: dict):
    """``ids`` as (done, queued in SLURM, running under a lock, to start)."""
    rd = view.local
    done = [i for i in ids if view.job(rd.expert(i), rd.expert_record(i)).record() is not None]
    queued = [i for i in ids if i not in done and i in queued_experts]
    locked = {}  # {id: who}: held by a job that is not in SLURM's queue (started by hand, on another island)
    for i in (i for i in ids if i not in done and i not in queued):
        if (who := view.job(rd.expert(i), rd.expert_record(i)).holder()) is not None:
            locked[i] = who
            log.info("submit: expert %d is running already: %s", i, who)
    todo = [i for i in ids if i not in done and i not in queued and i not in locked]
    return done, queued, locked, todo


def _router_state(view: RunView, queued_router, queued_word: str) -> str:
    """``done``, queued, running (under its lock) or ``to start``."""
    job = view.job(view.local.router, view.local.router_record)
    if job.record() is not None:
        return "done"
    if queued_router is not None:
        return f"{queued_word} ({queued_router.job_id} {queued_router.state})"
    if (holder := job.holder()) is not None:
        return f"running ({holder})"
    return "to start"


def _run_here(cfg: Settings, view: RunView, k: int, ids: list[int], sub: Submit, user: list[str]) -> dict:
    """``submit.launcher=local``: the unfinished, unlocked experts (then the router) as processes on this machine."""
    rd = view.local
    queued_experts, queued_router = _queued_if_known(view.where)
    done, queued, locked, todo = _sort_experts(view, ids, queued_experts)
    router = "not asked"
    if sub.router:
        router = _router_state(view, queued_router, "queued in SLURM")
        router = "started" if router == "to start" else router
    jobs = local_jobs(cfg, rd, todo, router == "started", user, sub.python, where=view.where)
    plan = machine_plan(sub.parallel, cfg.island, "submit.parallel", len(jobs))
    result = dict(
        run_dir=view.where,
        k=k,
        launcher="local",
        dry_run=bool(sub.dry_run),
        parallel=plan.parallel,
        experts_done=done,
        experts_queued=queued,
        experts_locked=sorted(locked),
        experts_started=todo,
        router=router,
        jobs={},
    )
    if not jobs:
        parts = [
            f"experts {which} {what}"
            for which, what in ((done, "done"), (queued, "queued in SLURM"), (sorted(locked), "running"))
            if which
        ]
        log.info("submit: nothing to start for %s: %s; router %s", view.where, ", ".join(parts), router)
        return result
    if result["dry_run"]:
        show(jobs, plan, user)
        return result
    if not sub.wait:
        return dict(result, **run_in_background(rd.root, user))
    result["jobs"] = train_here(jobs, plan, user)
    return result


def _log_summary(r: dict, queued_experts: dict) -> None:
    verb = "would submit" if r["dry_run"] else "submitted"
    parts = []
    if r["experts_submitted"]:
        job = f" as array job {r['expert_job']}" if r["expert_job"] else ""
        parts.append(f"{verb} experts {r['experts_submitted']}{job}")
    if r["experts_done"]:
        parts.append(f"experts {r['experts_done']} done")
    if r["experts_locked"]:
        parts.append(f"experts {r['experts_locked']} running already (see their lock.json)")
    if r["experts_queued"]:
        parts.append(
            "experts already queued: "
            + ", ".join(f"{i} ({queued_experts[i].job_id} {queued_experts[i].state})" for i in r["experts_queued"])
        )
    router = r["router"]
    if router == "submitted":
        router = f"{verb} router" + (f" as job {r['router_job']}" if r["router_job"] else "")
    else:
        router = f"router {router}"
    parts.append(router)
    if not r["experts_submitted"] and r["router"] != "submitted":
        log.info("submit: nothing to submit for %s: %s", r["run_dir"], "; ".join(parts))
    else:
        log.info("submit: %s -> %s", "; ".join(parts), r["run_dir"])
