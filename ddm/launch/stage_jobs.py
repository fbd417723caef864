"""A stage's parts as jobs: ``ddm submit submit.stage=prepare|embed|partition|encode``, and where they stand.

Each stage is one row of ``ddm.launch.stage_parts``; everything here reads the row only. A task (a part, or a
cluster for encode) is

- done: the row says so from its files;
- queued or running: SLURM lists it among the run's ``<stage>-parts`` (``encode``) array tasks, or (encode) a
  live job holds its lock;
- missing: neither (never started, failed or stopped: its logs are in ``logs/<stage>/<task>/``).

On SLURM the missing tasks go out as ONE array job whose indices are their numbers, and the merge as a job that
starts once every task queued, this time or before, has ended well (``--dependency=afterok:...``; with
``--kill-on-invalid-dep`` SLURM drops the merge should one fail, and the next ``ddm submit`` sends that part and
a new merge). With ``submit.launcher=local`` the missing tasks run as processes on this machine,
``submit.parallel`` at a time (``<workers_key>`` their share of the cores), then the merge. With one part, one job
runs the whole stage. Once the stage is complete nothing is started.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from ddm.artifacts import RunDir
from ddm.cores import available_cores
from ddm.errors import MissingInput
from ddm.launch import local, naming, sbatch, slurm
from ddm.launch.local_jobs import machine_plan, run_in_background, show, train_here
from ddm.launch.lock import held_by
from ddm.launch.overrides import job_overrides, override_key
from ddm.launch.stage_spec import StageParts
from ddm.settings import Settings
from ddm.settings.values import changed

log = logging.getLogger("ddm")


@dataclass(frozen=True)
class StageState:
    """Where a stage of a run stands for ``parts`` parts (encode: K clusters)."""

    parts: int
    ids: list[int]  # the tasks considered: every part (none with one part), or the clusters asked for
    complete: bool  # nothing left to start
    done: list[int]
    queued: dict[int, slurm.QueuedJob]  # tasks in SLURM's queue
    running: dict[int, str]  # tasks whose lock a live job holds: who
    missing: list[int]
    final: slurm.QueuedJob | None  # the queued job that completes the stage (the merge)


def stage_state(spec: StageParts, cfg: Settings, rd: RunDir, parts: int, queue: tuple) -> StageState:
    """``queue``: (queued tasks by id, the queued final job), as ``read_queue`` gives them."""
    queued_tasks, final = queue
    ids = spec.ids(cfg, rd, parts)
    finished = set(spec.done(cfg, rd, parts))
    done = [j for j in ids if j in finished]
    queued = {j: queued_tasks[j] for j in ids if j not in finished and j in queued_tasks}
    running = {}
    if spec.lock is not None:
        running = {j: who for j in ids if j not in finished and j not in queued and (who := held_by(spec.lock(rd, j)))}
    missing = [j for j in ids if j not in finished and j not in queued and j not in running]
    return StageState(parts, ids, spec.is_complete(cfg, rd, ids, done), done, queued, running, missing, final)


def read_queue(spec: StageParts, rd: RunDir, strict: bool) -> tuple[tuple, str | None]:
    """((queued tasks, queued final job), why the queue is unknown or None); ``strict``: a SLURM error raises."""
    if not slurm.available():
        return ({}, None), "no SLURM here"
    try:
        return slurm.array_and_job(rd.root, spec.array_job, spec.final_name), None
    except slurm.SlurmError as e:
        if strict:
            raise
        log.debug("submit: SLURM's queue is not readable (%s); going by the run's files alone", e)
        return ({}, None), str(e)


def submit(spec: StageParts, cfg: Settings, rd: RunDir, user: list[str]) -> dict:
    """The tasks of ``spec``'s stage not done, then the merge, on SLURM or (local) here."""
    sub = cfg.submit
    local_launcher = str(sub.launcher) == "local"
    dry_run = bool(sub.dry_run)
    if (missing_input := spec.needs(rd)) is not None:
        raise MissingInput(f"submit.stage={spec.stage}: {missing_input}")
    if not local_launcher and not dry_run and not slurm.available():
        raise slurm.SlurmError(slurm.NOT_AVAILABLE)
    queue, _ = read_queue(spec, rd, strict=not (local_launcher or dry_run))
    st = stage_state(spec, cfg, rd, spec.count(cfg, rd), queue)
    result = dict(
        run_dir=str(rd.root),
        stage=spec.stage,
        launcher=str(sub.launcher),
        dry_run=dry_run,
        parts=st.parts,
        parts_done=st.done,
        parts_queued=sorted(st.queued),
        parts_running=sorted(st.running),
        manifest="done" if st.complete and spec.merge else None,
    )
    for j, who in st.running.items():
        log.info("submit: %s %s is running already: %s", spec.stage, spec.task_job(j), who)
    if st.complete:
        log.info("submit: the %s stage of %s is complete: nothing to start", spec.stage, rd.root)
        return dict(result, **{"parts_started" if local_launcher else "parts_submitted": []})
    args = job_overrides(user, str(cfg.name), str(rd.root))
    python = sub.python or sys.executable
    if local_launcher:
        return _run_here(spec, cfg, rd, st, user, args, python, result)
    return _send(spec, cfg, rd, st, args, python, result)


def _send(spec: StageParts, cfg, rd: RunDir, st: StageState, args: list[str], python: str, result: dict) -> dict:
    """The missing tasks as one array job, then (a stage with a merge) the merge depending on every queued one."""
    dry_run = result["dry_run"]
    verb = "would submit" if dry_run else "submitted"
    result.update(parts_submitted=list(st.missing), parts_job=None, manifest_job=None, scripts=[])
    logs = naming.stage_logs(rd.root, spec.stage)
    if st.missing:
        path = sbatch.sbatch_script_path(rd.root, spec.array_job)
        script = sbatch.parts_script(spec, rd.root, st.missing, args, cfg.island, python)
        result["parts_job"] = sbatch.send(script, path, dry_run, [logs / spec.task_job(j) for j in st.missing])
        result["scripts"].append(str(path))
        job = f" {result['parts_job']}" if result["parts_job"] else ""
        log.info("submit: %s %s tasks %s of %d as one array job%s", verb, spec.stage, st.missing, st.parts, job)
    job = spec.final_job(st.parts)
    if job is None:
        return result
    if st.final is not None and not st.missing:
        result["manifest"] = f"queued ({st.final.job_id} {st.final.state})"
        log.info("submit: %s of %s queued already: %s", job, rd.root, result["manifest"])
        return result
    if st.final is not None and not st.final.running:
        _cancel(st.final, job, dry_run)
    after = ([result["parts_job"] or "ARRAY_JOB_ID"] if st.missing else []) + [q.job_id for q in st.queued.values()]
    extra = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
    path = sbatch.sbatch_script_path(rd.root, f"{spec.stage}-{job}" if job != spec.stage else job)
    script = sbatch.final_script(spec, rd.root, job, args, cfg.island, python)
    result["manifest_job"] = sbatch.send(script, path, dry_run, [logs / job], extra)
    result["manifest"] = "submitted"
    result["scripts"].append(str(path))
    log.info(
        "submit: %s the %s job%s%s -> %s",
        verb,
        job,
        f" {result['manifest_job']}" if result["manifest_job"] else "",
        f" after {', '.join(after)}" if after else "",
        rd.root,
    )
    return result


def _cancel(job: slurm.QueuedJob, name: str, dry_run: bool) -> None:
    """A waiting merge waits for jobs that no longer cover every missing part: the one submitted instead waits
    for all of them."""
    log.info("submit: %s the waiting %s job %s", "would cancel" if dry_run else "cancelling", name, job.job_id)
    if dry_run:
        return
    try:
        slurm.scancel(job.job_id)
    except slurm.SlurmError as e:  # it ended meanwhile (SLURM drops a merge whose part failed)
        log.info("submit: %s job %s: %s", name, job.job_id, e)


def _island(spec: StageParts, cfg: Settings, gpu: bool):
    # a stage job that reads no GPU runs on CPUs whatever the island: the cores are what its jobs share
    return cfg.island if gpu else changed(cfg.island, {"accelerator": "cpu", "devices": 1, "num_nodes": 1})


def _run_here(spec: StageParts, cfg, rd: RunDir, st: StageState, user, args: list[str], python: str, result: dict):
    """The missing tasks as processes here, ``submit.parallel`` at a time, then the merge (or, one part, all)."""
    sub = cfg.submit
    cores = available_cores()
    plan = machine_plan(sub.parallel, _island(spec, cfg, spec.gpu), "submit.parallel", len(st.missing) or 1, cores)
    job = spec.final_job(st.parts)
    alone_on = _island(spec, cfg, spec.gpu and job == spec.stage)  # a merge reads no image
    alone = machine_plan(1, alone_on, "submit.parallel", 1, cores)  # the last job has the machine to itself
    own_workers = any(override_key(o) == spec.workers_key for o in user)
    logs = naming.stage_logs(rd.root, spec.stage)

    def command(*first: str, workers: int | None) -> tuple[str, ...]:
        given = [] if own_workers or workers is None or spec.workers_key is None else [f"{spec.workers_key}={workers}"]
        return (python, "-m", "ddm", spec.stage, *first, *args, *given)

    share = plan.threads or max(1, cores // plan.parallel)
    tasks = [
        local.LocalJob(
            spec.task_job(j),
            logs / spec.task_job(j),
            spec.record(rd, j, st.parts),
            command(f"{spec.part_key}={j}", workers=share),
        )
        for j in st.missing
    ]
    finals = []
    if job is not None:
        workers = alone.threads or cores if job == spec.stage else None
        finals = [local.LocalJob(job, logs / job, spec.output(rd), command(workers=workers))]
    # SLURM (or a job started by hand) holds some of it: the merge is left to the job queued there or a later submit
    elsewhere = bool(st.queued) or bool(st.running) or st.final is not None
    result.update(parts_started=list(st.missing), parallel=plan.parallel, jobs={}, manifest="started" if job else None)
    if job is not None and st.final is not None:
        result["manifest"] = f"queued ({st.final.job_id} {st.final.state})"
    elif job is not None and elsewhere:
        result["manifest"] = "after the parts queued or running elsewhere"
        log.info(
            "submit: parts %s of %s are queued or running elsewhere; once they are done, "
            "`ddm submit submit.stage=%s` run again starts the %s",
            sorted([*st.queued, *st.running]),
            rd.root,
            spec.stage,
            job,
        )
    jobs = [*tasks, *([] if elsewhere else finals)]
    if not jobs:
        log.info("submit: nothing to start for the %s stage of %s: the rest is queued or running", spec.stage, rd.root)
        return result
    if result["dry_run"]:
        show(tasks, plan, user)
        show([] if elsewhere else finals, alone, user)
        return result
    if not sub.wait:
        return dict(result, **run_in_background(rd.root, user))
    result["jobs"] = train_here(tasks, plan, user)
    if not elsewhere:
        result["jobs"].update(train_here(finals, alone, user))
    return result
