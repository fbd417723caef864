"""Stage ``submit``: send a run's unfinished expert jobs and its router job to SLURM.

    ddm submit name=big island=gpu                           # every unfinished expert + the router
    ddm submit name=big submit.experts=[0,1] island=gpu8_ddp # experts 0 and 1 on 8-GPU nodes...
    ddm submit name=big submit.experts=[2,3] island=gpu submit.router=false   # ...2 and 3 on single GPUs
    ddm submit name=big submit.dry_run=true                  # print the scripts, submit nothing

Reads ``clusters/report.json`` (K) and the experts' records; asks ``squeue``
which of the run's jobs are queued or running. The experts that have no
``record.json`` and no job in the queue go out as ONE array job whose indices
are exactly their ids; the router, which needs no expert, goes out as its own
job. So submitting again is always safe: a finished run submits nothing, and
an interrupted expert is submitted again and resumes from its ``last.ckpt``.

Every other override of the ``ddm submit`` call (``island=...``,
``expert.steps=...``) is passed to the jobs, which therefore compose the
same config. Each script is kept under ``<run>/slurm/``; each job's log is
``slurm-*.out`` in the job's own folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, write_text
from ddm.launch import sbatch, slurm
from ddm.launch.overrides import job_overrides

log = logging.getLogger("ddm")


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


def _require_inputs(rd: RunDir) -> int:
    if not rd.cluster_report.exists():
        raise MissingInput(
            f"no {rd.cluster_report}: run `ddm cluster` and `ddm partition` for this run "
            f"first (they are quick and run on this machine)"
        )
    if not rd.partitions_index.exists():
        raise MissingInput(f"no partitions under {rd.partitions}: run `ddm partition` first")
    return int(read_json(rd.cluster_report)["k"])


def _queued(rd: RunDir, dry_run: bool):
    """The run's queued jobs; a dry run goes on without them when SLURM cannot be asked."""
    if not slurm.available():
        return {}, None
    try:
        return slurm.run_jobs(rd.root)
    except slurm.SlurmError as e:
        if not dry_run:
            raise
        log.warning("submit: cannot read SLURM's queue (%s); the dry run assumes nothing is queued", e)
        return {}, None


def _send(script: str, path: Path, dry_run: bool, folders=()) -> str | None:
    """Write the script beside the run and sbatch it; with dry_run only print both. Returns the job id."""
    if dry_run:
        print(f"# --- {path} (dry run: not written, not submitted)\n{script}")
        print(f"# would run: sbatch --parsable {path}\n")
        return None
    for folder in folders:  # SLURM opens each job's log there and does not create folders
        Path(folder).mkdir(parents=True, exist_ok=True)
    write_text(path, script)
    return slurm.sbatch(path)


def run(cfg, overrides: list[str] | None = None) -> dict:
    """Submit what is neither finished nor queued; return what was done.

    ``overrides``: the Hydra overrides to pass to the jobs. From the command
    line ``ddm.cli`` passes those Hydra parsed; a library caller passes them (the same list
    it composed ``cfg`` with).
    """
    rd = RunDir(Path(cfg.run_dir).resolve())
    sub = cfg.get("submit") or {}
    if cfg.get("redo", False):
        raise BadInput(
            "`ddm submit redo=true` is refused: a requeued job would start over and delete its own "
            "checkpoints. To retrain an expert, delete experts/expert-<id>/ and submit again."
        )
    k = _require_inputs(rd)
    ids = expert_ids(sub.get("experts"), k)
    dry_run = bool(sub.get("dry_run", False))
    if not slurm.available() and not dry_run:
        raise slurm.SlurmError(slurm.NOT_AVAILABLE)

    queued_experts, queued_router = _queued(rd, dry_run)
    done = [i for i in ids if rd.expert_record(i).exists()]
    queued = [i for i in ids if i not in done and i in queued_experts]
    todo = [i for i in ids if i not in done and i not in queued]

    user = list(overrides or [])
    args = job_overrides(user, str(cfg.name), str(rd.root))
    python = sub.get("python") or sys.executable
    result = dict(
        run_dir=str(rd.root),
        k=k,
        dry_run=dry_run,
        experts_done=done,
        experts_queued=queued,
        experts_submitted=todo,
        expert_job=None,
        router="not asked",
        router_job=None,
        scripts=[],
    )

    if todo:
        path = sbatch.sbatch_script_path(rd.root, "expert-array")
        script = sbatch.expert_array_script(rd.root, todo, args, cfg.island, python=python)
        result["expert_job"] = _send(script, path, dry_run, [rd.expert(i) for i in todo])
        result["scripts"].append(str(path))

    if sub.get("router", True):
        if rd.router_record.exists():
            result["router"] = "done"
        elif queued_router is not None:
            result["router"] = f"queued ({queued_router.job_id} {queued_router.state})"
        else:
            path = sbatch.sbatch_script_path(rd.root, "router")
            script = sbatch.router_script(rd.root, args, cfg.island, python=python)
            result["router_job"] = _send(script, path, dry_run, [rd.router])
            result["router"] = "submitted"
            result["scripts"].append(str(path))

    _log_summary(result, queued_experts)
    return result


def _log_summary(r: dict, queued_experts: dict) -> None:
    verb = "would submit" if r["dry_run"] else "submitted"
    parts = []
    if r["experts_submitted"]:
        job = f" as array job {r['expert_job']}" if r["expert_job"] else ""
        parts.append(f"{verb} experts {r['experts_submitted']}{job}")
    if r["experts_done"]:
        parts.append(f"experts {r['experts_done']} done")
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
