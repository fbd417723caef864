"""Stage ``status``: where each job of a run stands, from its files and (when there is one) SLURM's queue.

    ddm status name=big

prints one row per expert (0..K-1), one for the router and, once `ddm distill` has made
distilled/, one for the student, in one of these states:

- ``done``: ``record.json`` exists (its steps and final loss are shown);
- ``running`` / ``queued``: SLURM lists the job (pending, requeued, ...), or a
  job holds the folder's ``lock.json`` and its process runs (a job started by
  hand or by ``ddm submit submit.launcher=local``: its host and pid are shown);
- ``failed``: the job wrote ``failed.json`` (its error is shown) and is not queued;
- ``stopped``: checkpoints but no record and no queued job: interrupted, and
  ``ddm submit`` resumes it from ``last.ckpt``;
- ``missing``: nothing yet.

Without SLURM (no ``squeue``) the queue column reads ``n/a``; locks still
show the jobs running on this machine. Reads only; writes nothing.

    ddm status run_dir=s3://bucket/big

shows a run that lives in a bucket from any machine (``ddm.store.job_folders``):
each job's record, published failure, lock and last uploaded checkpoint are read
from the bucket, a finished job's row names the host that trained it, and the
queue and logs are this machine's (the jobs its ``ddm submit`` sent). It writes
nothing but the small records it reads, into the run's working copy.

A run at a stage that runs in parts (``ddm.launch.stage_parts``: the last
whose input is there, of prepare, embed, partition and, in a latent run,
encode), begun (its folder is there, or SLURM lists its jobs) and not complete,
while no expert has a folder yet,
shows the jobs of that stage instead: one row per part (per cluster for
encode): done (its files are there), queued or running (in SLURM, or holding
its lock), or missing, and one for the job that merges them. The number of
parts (``data.parts``, ``embed.parts``, ``cluster.partition_parts``) is read
from the parts' files when the command does not give it. Below the experts'
table, the sample stage's parts are shown the same way while they are not yet
joined (``sample.parts``, or parts on disk), each done when drawn with the
settings and models asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.job_names import expert_job
from ddm.launch import naming, slurm
from ddm.launch.stage_jobs import read_queue, stage_state
from ddm.launch.stage_parts import ENCODE, SAMPLE, STAGES
from ddm.launch.stage_spec import StageParts
from ddm.settings import Settings
from ddm.store.job_folders import JobFolder, run_view

log = logging.getLogger("ddm")

STATES = ("done", "running", "queued", "failed", "stopped", "missing")


def _row(log_dir: Path, queued: slurm.QueuedJob | None) -> dict:
    """A job's row before its state is known: missing, its queue entry and its newest log in ``log_dir``."""
    # SLURM's logs and the local launcher's (ddm.launch.local), newest last
    logs = sorted([*log_dir.glob("slurm-*.out"), *log_dir.glob("local-*.out")], key=lambda p: p.stat().st_mtime)
    return dict(
        state="missing",
        steps=None,
        loss=None,
        job=queued.job_id if queued else None,
        slurm_state=queued.state if queued else None,
        detail="",
        log=str(logs[-1]) if logs else None,
    )


def job_status(job: JobFolder, log_dir: Path, queued: slurm.QueuedJob | None) -> dict:
    """The state of one job (an expert or the router) from its folder, its logs here and its queue entry."""
    row = _row(log_dir, queued)
    if (rec := job.record()) is not None:
        row.update(state="done", steps=rec.get("steps"), loss=rec.get("final_loss"))
        host = (rec.get("hardware") or {}).get("host")
        done = [f"on {host}"] if host else []  # which island's node: the run may span several
        if rec.get("resumed_from"):
            done.append("resumed once or more")
        if queued:
            done.append(f"finished, yet SLURM still lists job {queued.job_id}")
        row["detail"] = "; ".join(done)
    elif queued:
        row.update(state=_queued_state(queued), steps=job.checkpoint_step())
        row["detail"] = f"last checkpoint at step {row['steps']}" if row["steps"] is not None else ""
    elif (held := job.holder()) is not None:
        row.update(state="running", steps=job.checkpoint_step(), detail=held)
    elif (failure := job.failure()) is not None:
        row.update(state="failed", steps=job.checkpoint_step(), detail=failure)
    elif job.checkpoints():
        step = job.checkpoint_step()
        row.update(
            state="stopped",
            steps=step,
            detail="interrupted"
            + (f" after step {step}" if step is not None else "")
            + "; `ddm submit` resumes it from last.ckpt",
        )
    return row


def _queued_state(queued: slurm.QueuedJob) -> str:
    return "running" if queued.running else "queued"


def part_status(log_dir: Path, done: bool, queued: slurm.QueuedJob | None, holder: str | None) -> dict:
    """The state of one job of a stage's parts: ``done`` from its files, else queued or running (in SLURM, or
    ``holder`` holds its lock), else missing (then its last log, if any: it may have failed or stopped)."""
    row = _row(log_dir, queued)
    if done:
        row.update(state="done", detail=f"finished, yet SLURM still lists job {queued.job_id}" if queued else "")
    elif queued:
        row["state"] = _queued_state(queued)
    elif holder:
        row.update(state="running", detail=holder)
    elif row["log"]:
        row["detail"] = f"not done; its last log: {row['log']}"
    return row


def _queue(where: str) -> tuple[dict, object, str | None]:
    """(queued experts, queued router, why the queue is unknown or None) of the run at ``where``."""
    if not slurm.available():
        return {}, None, "no SLURM here"
    try:
        experts, router = slurm.run_jobs(where)
        return experts, router, None
    except slurm.SlurmError as e:
        return {}, None, str(e)


def format_table(rows: list[dict], queue_known: bool) -> str:
    """A fixed-width table: job, state, steps, loss, SLURM job, detail."""

    def cell(row):
        if not queue_known:
            q = "n/a"
        else:
            q = f"{row['job']} {row['slurm_state']}" if row["job"] else "-"
        loss = f"{row['loss']:.4f}" if isinstance(row["loss"], (int, float)) else "-"
        steps = "-" if row["steps"] is None else str(row["steps"])
        return [row["name"], row["state"], steps, loss, q, row["detail"]]

    table = [["job", "state", "steps", "loss", "slurm", "detail"]] + [cell(r) for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(5)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line[:5], widths)) + "  " + line[5] for line in table
    ).rstrip()


def _grown(report: dict) -> str:
    """`` (grown from K=2 by ddm extend)`` for a run that grew, else nothing."""
    extensions = report.get("extensions") or []
    if not extensions:
        return ""
    return f" (grown from K={extensions[0]['k_before']} by `ddm extend`, {len(extensions)} time(s))"


def run(cfg: Settings) -> dict:
    """Print the table for the run ``cfg.run_dir`` (a folder, or a bucket's URL) and return it as a dict."""
    view = run_view(cfg)
    rd = view.local
    # a stage's parts, and the samples' parts, run on local (shared) disk only: a bucket's run has none
    if not view.in_bucket and (shown := _stage_status(cfg, rd)) is not None:
        return shown
    report = view.read(rd.cluster_report)
    if report is None:
        raise MissingInput(
            f"no {view.name_of(rd.cluster_report)}: this run has not been clustered yet, so it has no "
            f"experts (run `ddm cluster` and `ddm partition`, then `ddm submit`)"
        )
    k = int(report["k"])
    queued_experts, queued_router, no_queue = _queue(view.where)
    experts = []
    for i in range(k):
        row = job_status(view.job(rd.expert(i), rd.expert_record(i)), rd.expert(i), queued_experts.get(i))
        experts.append(dict(name=expert_job(i), id=i, **row))
    router = dict(name="router", **job_status(view.job(rd.router, rd.router_record), rd.router, queued_router))
    # the optional student (`ddm distill`): listed once it has a folder
    distilled = (
        dict(name="distilled", **job_status(view.job(rd.distilled, rd.distilled_record), rd.distilled, None))
        if view.has(rd.distilled)
        else None
    )
    counts = {s: sum(r["state"] == s for r in experts) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(
        f"run {view.where}: K={k}{_grown(report)}; experts: {summary}; router: {router['state']}"
        + (f"; distilled: {distilled['state']}" if distilled else "")
        + (f" (queue: n/a, {no_queue})" if no_queue else "")
    )
    print(format_table(experts + [router] + ([distilled] if distilled else []), queue_known=no_queue is None))
    sampling = None if view.in_bucket else _sample_parts(cfg, rd)  # the samples' parts, while not joined
    return dict(
        sampling=sampling,
        distilled=distilled,
        run_dir=view.where,
        k=k,
        experts=experts,
        router=router,
        counts=counts,
        queue=None if no_queue else "slurm",
        queue_error=no_queue,
    )


def _current_stage(cfg: Settings, rd: RunDir) -> StageParts | None:
    """The last stage before the experts whose input is there (prepare needs none); None for encode in a pixel
    run. (The sample stage's parts are shown beside the experts' table: ``_sample_parts``.)"""
    before = [spec for spec in STAGES.values() if spec is not SAMPLE]
    spec = next(spec for spec in reversed(before) if spec.needs(rd) is None)
    return None if spec is ENCODE and str(cfg.vae.kind) == "none" else spec


def _parts(spec: StageParts, cfg: Settings, rd: RunDir, queued_tasks: dict) -> int:
    """The number of parts: given, else read from the parts' files; refused when only SLURM knows of them."""
    parts = spec.count(cfg, rd)
    if spec.count_key is None or parts > 1:
        return parts
    parts = spec.recorded_parts(rd) or 1
    if parts == 1 and queued_tasks:
        raise BadInput(
            f"SLURM has tasks {sorted(queued_tasks)} of {spec.stage}'s parts queued for {rd.root} and no part is "
            f"done yet: give {spec.count_key}=N, as they were submitted with, to see them"
        )
    return parts


def _stage_status(cfg: Settings, rd: RunDir) -> dict | None:
    """The table of the jobs of the stage the run is at; None when it has not begun or is complete."""
    spec = _current_stage(cfg, rd)
    if spec is None or rd.experts.exists():  # training has begun: its table is the one to see
        return None
    return _parts_table(spec, cfg, rd)


def _sample_parts(cfg: Settings, rd: RunDir) -> dict | None:
    """The sample stage's parts (``sample.parts``, or parts drawn already) until they are joined; else None."""
    if int(cfg.sample.parts) < 2 and not (rd.samples / "parts").exists():
        return None
    return _parts_table(SAMPLE, cfg, rd)


def _parts_table(spec: StageParts, cfg: Settings, rd: RunDir) -> dict | None:
    """Print and return the table of ``spec``'s parts; None when the stage has not begun or is complete."""
    queue, no_queue = read_queue(spec, rd, strict=False)
    queued_tasks, final = queue
    if not spec.folder(rd).exists() and not queued_tasks and final is None:
        return None
    st = stage_state(spec, cfg, rd, _parts(spec, cfg, rd, queued_tasks), queue)
    if st.complete:
        return None
    logs = naming.stage_logs(rd.root, spec.stage)
    rows = [
        dict(
            name=spec.task_job(j),
            part=j,
            **part_status(logs / spec.task_job(j), j in st.done, st.queued.get(j), st.running.get(j)),
        )
        for j in st.ids
    ]
    job = spec.final_job(st.parts)
    merge = dict(name=job, **part_status(logs / job, False, final, None)) if job else None
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    what = f"parts ({spec.count_key}={st.parts})" if spec.count_key else f"clusters (K={st.parts})"
    shown = ([f"{what}: {summary}"] if rows else []) + ([f"{job}: {merge['state']}"] if merge else [])
    print(
        f"run {rd.root}: {spec.stage} not complete; "
        + "; ".join(shown)
        + (f" (queue: n/a, {no_queue})" if no_queue else "")
    )
    print(format_table(rows + ([merge] if merge else []), queue_known=no_queue is None))
    return dict(
        run_dir=str(rd.root),
        stage=spec.stage,
        parts=st.parts,
        part_rows=rows,
        manifest=merge,
        counts=counts,
        parts_done=st.done,
        parts_queued=sorted(st.queued),
        parts_running=sorted(st.running),
        parts_missing=st.missing,
        queue=None if no_queue else "slurm",
        queue_error=no_queue,
    )
