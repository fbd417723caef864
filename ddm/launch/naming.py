"""How a run's SLURM jobs are named, so ``squeue`` can tell which are ours.

An expert array is named ``ddm:<run>:expert`` (its array task id is the
expert id), the router job ``ddm:<run>:router``; the array that writes the
parts of ``data/`` ``ddm:<run>:prepare-parts`` (its task id is the part) and
the job that writes ``data/manifest.json`` (their merge, or the whole
prepare) ``ddm:<run>:prepare``; ``embed`` and ``partition`` in parts alike
(``embed-parts`` and ``embed``, ...), and the encode array ``ddm:<run>:encode``
(its task id is the cluster), where ``<run>`` is the name
of the run folder (``runs/<name>``: the run's ``name`` unless ``run_dir`` was
set). Folder names repeat across places (every test run is called ``run``),
so ``ddm submit`` also puts the absolute run directory in the job's comment;
a job whose comment names another directory is not ours. Jobs submitted by hand with
``scripts/slurm/*.sbatch`` carry no comment and are matched by name alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddm.artifacts import is_url
from ddm.errors import BadInput

PREFIX = "ddm"
EXPERT = "expert"
ROUTER = "router"
# a stage's array of parts, and its merge (``ddm.launch.stage_parts``); encode, in clusters, has no merge
STAGE_JOBS = (
    "prepare-parts",
    "prepare",
    "embed-parts",
    "embed",
    "partition-parts",
    "partition",
    "encode",
    "sample-parts",
    "sample",
)
JOBS = (EXPERT, ROUTER, *STAGE_JOBS)


def run_label(run_name: str) -> str:
    """The run name as it appears in a job name: no whitespace, ',' (squeue's list separator)
    or '|' (our field separator)."""
    return re.sub(r"[\s|,]+", "_", str(run_name)) or "run"


def job_name(run_name: str, job: str) -> str:
    """``ddm:<run name>:expert``, ``ddm:<run name>:router``, ``ddm:<run name>:prepare``, ..."""
    if job not in JOBS:
        raise BadInput(f"job must be one of {', '.join(JOBS)}, not {job!r}")
    return f"{PREFIX}:{run_label(run_name)}:{job}"


def run_comment(run_dir: str | Path) -> str:
    """The comment that binds a job to one run directory (or to the URL of a run in a bucket)."""
    return str(run_dir) if is_url(run_dir) else str(Path(run_dir).resolve())


def belongs_to(comment: str | None, run_dir: str | Path) -> bool:
    """True when a queued job's comment names this run directory, or names none (a hand-submitted job)."""
    comment = (comment or "").strip()
    return comment in ("", "(null)") or comment == run_comment(run_dir)


def run_job_name(run_dir: str | Path, job: str) -> str:
    """The job name of a run directory's jobs: labelled by the run folder's name (``runs/<name>``; the last part
    of a bucket's URL)."""
    name = str(run_dir).rstrip("/").rsplit("/", 1)[-1] if is_url(run_dir) else Path(run_dir).resolve().name
    return job_name(name, job)


def stage_logs(run_dir: str | Path, stage: str) -> Path:
    """``<run>/logs/<stage>``: the logs of a stage's jobs, outside what the stage writes (a merge removes its
    parts' records)."""
    return Path(run_dir).resolve() / "logs" / stage
