"""The prepare stage's parts as jobs: ``ddm submit submit.stage=prepare``, and where they stand for ``ddm status``.

With ``data.parts=N`` separate jobs write the parts of ``data/`` (``ddm prepare data.part=J``) and one more
merges them into ``data/manifest.json`` (``ddm prepare``, no ``data.part``). A part is

- done: its record ``data/parts/part-JJJJ-of-NNNN.json`` exists;
- queued or running: SLURM lists its task of the run's ``prepare-parts`` array;
- missing: neither (never started, failed or stopped: its logs are in ``logs/prepare/part-JJJJ/``).

On SLURM the missing parts go out as ONE array job whose indices are their numbers, and the merge as a job that
starts once every part queued, this time or before, has ended well (``--dependency=afterok:...``; with
``--kill-on-invalid-dep`` SLURM drops the merge should one fail, and the next ``ddm submit`` sends that part and
a new merge). With ``submit.launcher=local`` the missing parts run as processes on this machine,
``submit.parallel`` at a time, each with ``data.workers`` its share of the cores, then the merge. With
``data.parts=1`` one job writes all of ``data/`` and the manifest. Once the manifest exists nothing is started.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.cores import available_cores
from ddm.launch import local, naming, sbatch, slots, slurm
from ddm.launch.local_jobs import run_in_background, train_here
from ddm.launch.overrides import job_overrides, override_key
from ddm.settings import Settings
from ddm.settings.values import changed

log = logging.getLogger("ddm")

_RECORD = re.compile(r"part-(\d+)-of-(\d+)\.json")


def final_job(parts: int) -> str:
    """The job that writes ``data/manifest.json``: ``merge`` (of the parts) or, with one part, ``prepare``."""
    return "merge" if int(parts) > 1 else "prepare"


def part_record(rd: RunDir, part: int, parts: int) -> Path:
    # torch comes with the sources' module; imported only where a record is looked at
    from ddm.data.ingest.parts import part_path

    return part_path(rd.data, part, parts)


def recorded_parts(rd: RunDir) -> int | None:
    """The ``data.parts`` the records under ``data/parts/`` were written for, when they all agree."""
    counts = {int(m.group(2)) for p in rd.data.glob("parts/part-*.json") if (m := _RECORD.fullmatch(p.name))}
    return counts.pop() if len(counts) == 1 else None


@dataclass(frozen=True)
class PrepareState:
    """Where ``data/`` of a run stands for ``data.parts=parts``."""

    parts: int
    complete: bool  # data/manifest.json exists
    done: list[int]
    queued: dict[int, slurm.QueuedJob]  # parts with a task in SLURM's queue
    missing: list[int]
    final: slurm.QueuedJob | None  # the queued job that writes the manifest


def prepare_state(rd: RunDir, parts: int, queued_parts: dict, final: slurm.QueuedJob | None) -> PrepareState:
    parts = int(parts)
    done = [j for j in range(parts) if parts > 1 and part_record(rd, j, parts).exists()]
    queued = {j: queued_parts[j] for j in range(parts) if parts > 1 and j not in done and j in queued_parts}
    missing = [j for j in range(parts) if parts > 1 and j not in done and j not in queued]
    return PrepareState(parts, rd.data_manifest.exists(), done, queued, missing, final)


def read_queue(rd: RunDir, strict: bool) -> tuple[dict, slurm.QueuedJob | None, str | None]:
    """(queued parts, queued manifest job, why the queue is unknown or None); ``strict``: a SLURM error raises."""
    if not slurm.available():
        return {}, None, "no SLURM here"
    try:
        return (*slurm.prepare_jobs(rd.root), None)
    except slurm.SlurmError as e:
        if strict:
            raise
        log.debug("submit: SLURM's queue is not readable (%s); going by data/ alone", e)
        return {}, None, str(e)


def submit(cfg: Settings, rd: RunDir, user: list[str]) -> dict:
    """``ddm submit submit.stage=prepare``: the parts not done, then the merge, on SLURM or (local) here."""
    sub = cfg.submit
    local_launcher = str(sub.launcher) == "local"
    dry_run = bool(sub.dry_run)
    if not local_launcher and not dry_run and not slurm.available():
        raise slurm.SlurmError(slurm.NOT_AVAILABLE)
    queued_parts, final, _ = read_queue(rd, strict=not (local_launcher or dry_run))
    st = prepare_state(rd, int(cfg.data.parts), queued_parts, final)
    result = dict(
        run_dir=str(rd.root),
        stage="prepare",
        launcher=str(sub.launcher),
        dry_run=dry_run,
        parts=st.parts,
        parts_done=st.done,
        parts_queued=sorted(st.queued),
        manifest="done" if st.complete else None,
    )
    if st.complete:
        log.info("submit: data/ of %s is complete (%s): nothing to start", rd.root, rd.data_manifest)
        return dict(result, **{"parts_started" if local_launcher else "parts_submitted": []})
    args = job_overrides(user, str(cfg.name), str(rd.root))
    python = sub.python or sys.executable
    if local_launcher:
        return _run_here(cfg, rd, st, user, args, python, result)
    return _send(cfg, rd, st, args, python, result)


def _send(cfg: Settings, rd: RunDir, st: PrepareState, args: list[str], python: str, result: dict) -> dict:
    """The missing parts as one array job, then the merge depending on every queued part."""
    dry_run = result["dry_run"]
    verb = "would submit" if dry_run else "submitted"
    result.update(parts_submitted=list(st.missing), parts_job=None, manifest_job=None, scripts=[])
    if st.missing:
        path = sbatch.sbatch_script_path(rd.root, naming.PREPARE_PARTS)
        script = sbatch.prepare_parts_script(rd.root, st.missing, args, cfg.island, python)
        folders = [naming.prepare_logs(rd.root) / naming.part_job(j) for j in st.missing]
        result["parts_job"] = sbatch.send(script, path, dry_run, folders)
        result["scripts"].append(str(path))
        log.info(
            "submit: %s parts %s of data.parts=%d as one array job%s",
            verb,
            st.missing,
            st.parts,
            f" {result['parts_job']}" if result["parts_job"] else "",
        )
    if st.final is not None and not st.missing:
        result["manifest"] = f"queued ({st.final.job_id} {st.final.state})"
        log.info("submit: %s of %s queued already: %s", final_job(st.parts), rd.root, result["manifest"])
        return result
    if st.final is not None and not st.final.running:
        _cancel(st.final, final_job(st.parts), dry_run)
    after = ([result["parts_job"] or "ARRAY_JOB_ID"] if st.missing else []) + [q.job_id for q in st.queued.values()]
    extra = [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"] if after else []
    job = final_job(st.parts)
    path = sbatch.sbatch_script_path(rd.root, f"prepare-{job}" if job == "merge" else job)
    script = sbatch.prepare_script(rd.root, job, args, cfg.island, python)
    result["manifest_job"] = sbatch.send(script, path, dry_run, [naming.prepare_logs(rd.root) / job], extra)
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


def _run_here(cfg, rd: RunDir, st: PrepareState, user: list[str], args: list[str], python: str, result: dict):
    """The missing parts as processes here, ``submit.parallel`` at a time, then the merge (or, one part, all)."""
    sub = cfg.submit
    # prepare runs on CPUs whatever the island: the cores are what its jobs share
    cpu = changed(cfg.island, {"accelerator": "cpu", "devices": 1, "num_nodes": 1})
    cores = available_cores()
    plan = slots.plan(sub.parallel, cpu, "submit.parallel", None, cores, max(1, len(st.missing)))
    alone = slots.plan(1, cpu, "submit.parallel", None, cores, 1)  # the last job has the machine to itself
    own_workers = any(override_key(o) == "data.workers" for o in user)
    logs = naming.prepare_logs(rd.root)

    def command(*first: str, workers: int | None) -> tuple[str, ...]:
        given = [] if own_workers or workers is None else [f"data.workers={workers}"]
        return (python, "-m", "ddm", "prepare", *first, *args, *given)

    parts = [
        local.LocalJob(
            naming.part_job(j),
            logs / naming.part_job(j),
            part_record(rd, j, st.parts),
            command(f"data.part={j}", workers=plan.threads),
        )
        for j in st.missing
    ]
    job = final_job(st.parts)
    # the merge reads no image; one part alone writes them all with every core
    final = local.LocalJob(job, logs / job, rd.data_manifest, command(workers=alone.threads if st.parts == 1 else None))
    # SLURM holds some of it: the manifest is written once those are done, by the merge queued there or a later submit
    elsewhere = bool(st.queued) or st.final is not None
    result.update(parts_started=list(st.missing), parallel=plan.parallel, jobs={}, manifest="started")
    if st.final is not None:
        result["manifest"] = f"queued ({st.final.job_id} {st.final.state})"
    elif st.queued:
        result["manifest"] = "after the parts queued in SLURM"
    if st.queued:
        log.info(
            "submit: SLURM has parts %s of %s queued; once they are done %s writes data/manifest.json",
            sorted(st.queued),
            rd.root,
            f"its {job} job {st.final.job_id}" if st.final else "`ddm submit submit.stage=prepare` run again",
        )
    jobs = [*parts, *([] if elsewhere else [final])]
    if not jobs:
        log.info("submit: nothing to start for data/ of %s: the %s job is queued in SLURM", rd.root, job)
        return result
    if result["dry_run"]:
        for j in jobs:
            print(f"# {j.name}: would run, its log in {j.folder}\n{shlex.join(j.argv)}")
        print(f"# parts: {plan.describe()}")
        return result
    if not sub.wait:
        return dict(result, **run_in_background(rd.root, user))
    result["jobs"] = train_here(parts, plan, user)
    if not elsewhere:
        result["jobs"].update(train_here([final], alone, user))
    return result
