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

A run whose ``data/`` is not complete yet (no ``data/manifest.json``; it has
parts, or prepare jobs in the queue) shows the jobs that write it instead: one
row per part of ``data.parts`` (done: its record is there; queued or running in
SLURM; missing) and one for the job that writes the manifest (the merge).
``data.parts`` is read from the records when the command does not give it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.job_names import expert_job
from ddm.launch import lock, naming, slurm
from ddm.launch.prepare_jobs import final_job, part_record, prepare_state, read_queue, recorded_parts
from ddm.settings import Settings

log = logging.getLogger("ddm")

STATES = ("done", "running", "queued", "failed", "stopped", "missing")
_STEP = re.compile(r"step[-=_]?(\d+)")


def _last_step(ckpt_dir: Path) -> int | None:
    """The highest step among the step checkpoints' names, None when there is none."""
    steps = [int(m.group(1)) for p in ckpt_dir.glob("*.ckpt") if (m := _STEP.search(p.stem))]
    return max(steps) if steps else None


def _failure(path: Path) -> str:
    try:
        info = read_json(path)
    except (OSError, ValueError) as e:
        return f"unreadable failed.json ({e})"
    if isinstance(info, dict):
        for key in ("error", "message", "reason", "exception"):
            if info.get(key):
                return str(info[key])
    return str(info)


def job_status(job_dir: Path, record: Path, queued: slurm.QueuedJob | None) -> dict:
    """The state of one job (an expert or the router) from its folder and its queue entry."""
    # SLURM's logs and the local launcher's (ddm.launch.local), newest last
    logs = sorted([*job_dir.glob("slurm-*.out"), *job_dir.glob("local-*.out")], key=lambda p: p.stat().st_mtime)
    row = dict(
        state="missing",
        steps=None,
        loss=None,
        job=queued.job_id if queued else None,
        slurm_state=queued.state if queued else None,
        detail="",
        log=str(logs[-1]) if logs else None,
    )
    ckpts = job_dir / "checkpoints"
    if record.exists():
        rec = read_json(record)
        row.update(state="done", steps=rec.get("steps"), loss=rec.get("final_loss"))
        if rec.get("resumed_from"):
            row["detail"] = "resumed once or more"
        if queued:
            row["detail"] = f"finished, yet SLURM still lists job {queued.job_id}"
    elif queued:
        row.update(state="running" if queued.running else "queued", steps=_last_step(ckpts))
        row["detail"] = f"last checkpoint at step {row['steps']}" if row["steps"] is not None else ""
    elif (held := lock.held_by(job_dir)) is not None:
        row.update(state="running", steps=_last_step(ckpts), detail=held)
    elif (job_dir / "failed.json").exists():
        row.update(state="failed", steps=_last_step(ckpts), detail=_failure(job_dir / "failed.json"))
    elif any(ckpts.glob("*.ckpt")):
        step = _last_step(ckpts)
        row.update(
            state="stopped",
            steps=step,
            detail="interrupted"
            + (f" after step {step}" if step is not None else "")
            + "; `ddm submit` resumes it from last.ckpt",
        )
    return row


def _queue(rd: RunDir) -> tuple[dict, object, str | None]:
    """(queued experts, queued router, why the queue is unknown or None)."""
    if not slurm.available():
        return {}, None, "no SLURM here"
    try:
        experts, router = slurm.run_jobs(rd.root)
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


def _grown(rd: RunDir) -> str:
    """`` (grown from K=2 by ddm extend)`` for a run that grew, else nothing."""
    extensions = read_json(rd.cluster_report).get("extensions") or []
    if not extensions:
        return ""
    return f" (grown from K={extensions[0]['k_before']} by `ddm extend`, {len(extensions)} time(s))"


def run(cfg: Settings) -> dict:
    """Print the table for the run ``cfg.run_dir`` and return it as a dict."""
    rd = RunDir(Path(cfg.run_dir).resolve())
    if not rd.cluster_report.exists() and not rd.data_manifest.exists() and (shown := _data_status(cfg, rd)):
        return shown
    if not rd.cluster_report.exists():
        raise MissingInput(
            f"no {rd.cluster_report}: this run has not been clustered yet, so it has no "
            f"experts (run `ddm cluster` and `ddm partition`, then `ddm submit`)"
        )
    k = int(read_json(rd.cluster_report)["k"])
    queued_experts, queued_router, no_queue = _queue(rd)
    experts = []
    for i in range(k):
        row = job_status(rd.expert(i), rd.expert_record(i), queued_experts.get(i))
        experts.append(dict(name=expert_job(i), id=i, **row))
    router = dict(name="router", **job_status(rd.router, rd.router_record, queued_router))
    # the optional student (`ddm distill`): listed once it has a folder
    distilled = (
        dict(name="distilled", **job_status(rd.distilled, rd.distilled_record, None)) if rd.distilled.exists() else None
    )
    counts = {s: sum(r["state"] == s for r in experts) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(
        f"run {rd.root}: K={k}{_grown(rd)}; experts: {summary}; router: {router['state']}"
        + (f"; distilled: {distilled['state']}" if distilled else "")
        + (f" (queue: n/a, {no_queue})" if no_queue else "")
    )
    print(format_table(experts + [router] + ([distilled] if distilled else []), queue_known=no_queue is None))
    return dict(
        distilled=distilled,
        run_dir=str(rd.root),
        k=k,
        experts=experts,
        router=router,
        counts=counts,
        queue=None if no_queue else "slurm",
        queue_error=no_queue,
    )


def _data_status(cfg: Settings, rd: RunDir) -> dict | None:
    """The table of the jobs writing ``data/``; None when there is nothing of them (no data/, none queued)."""
    parts = int(cfg.data.parts) if int(cfg.data.parts) > 1 else recorded_parts(rd) or 1
    queued_parts, final, no_queue = read_queue(rd, strict=False)
    if not rd.data.exists() and not queued_parts and final is None:
        return None
    if parts == 1 and queued_parts:
        raise BadInput(
            f"SLURM has tasks {sorted(queued_parts)} of prepare's parts queued for {rd.root} and no part is done "
            f"yet: give data.parts=N, as they were submitted with, to see them"
        )
    st = prepare_state(rd, parts, queued_parts, final)
    logs = naming.prepare_logs(rd.root)
    rows = [
        dict(
            name=naming.part_job(j),
            part=j,
            **_no_record(job_status(logs / naming.part_job(j), part_record(rd, j, parts), queued_parts.get(j))),
        )
        for j in range(parts if parts > 1 else 0)
    ]
    job = final_job(parts)
    manifest = dict(name=job, **_no_record(job_status(logs / job, rd.data_manifest, final)))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(
        f"run {rd.root}: data/ not complete (no {rd.data_manifest.name}); "
        + (f"parts (data.parts={parts}): {summary}; " if rows else "")
        + f"{job}: {manifest['state']}"
        + (f" (queue: n/a, {no_queue})" if no_queue else "")
    )
    print(format_table(rows + [manifest], queue_known=no_queue is None))
    return dict(
        run_dir=str(rd.root),
        stage="prepare",
        parts=parts,
        part_rows=rows,
        manifest=manifest,
        counts=counts,
        parts_done=st.done,
        parts_queued=sorted(st.queued),
        parts_missing=st.missing,
        queue=None if no_queue else "slurm",
        queue_error=no_queue,
    )


def _no_record(row: dict) -> dict:
    """A prepare job with no record yet and none queued: where its last log is (it may have failed or stopped)."""
    if row["state"] == "missing" and row["log"]:
        row["detail"] = f"no record yet; its last log: {row['log']}"
    return row
