"""Stage ``pipeline``: every stage in order on one config; what ``make demo`` runs.

prepare -> embed -> cluster -> partition -> encode (latent runs) -> train-expert (k = 0..K-1) ->
train-router -> sample -> (evaluate, with ``pipeline.evaluate=true``) -> report.
Each stage skips what is already complete,
so rerunning the pipeline after an interruption continues where it stopped.
Each runs through ``run_stage``, exactly as ``ddm <stage>`` would run it.

``pipeline.parallel=N`` (N > 1) trains the unfinished experts N at a time,
each as its own ``ddm train-expert`` process on this machine with its own
share of it (the local launcher, ``ddm.launch.local_jobs``); 1 trains them
one after another in this process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.launch.local_jobs import local_jobs, machine_plan, train_here
from ddm.launch.slots import check_parallel
from ddm.settings import Settings, changed
from ddm.stages.runner import run_stage
from ddm.store.job_folders import RunView, run_view
from ddm.store.objects import is_url

log = logging.getLogger("ddm")

BEFORE_EXPERTS = ("prepare", "embed", "cluster", "partition", "encode")
AFTER_EXPERTS = ("train-router", "sample")


def with_expert(cfg: Settings, k: int) -> Settings:
    """A copy of ``cfg`` for expert ``k``."""
    return changed(cfg, {"expert.id": k})


def run(cfg: Settings, overrides: list[str] | None = None) -> dict:
    """Every stage on ``cfg``. ``overrides``: those ``cfg`` was composed with, which the expert processes
    of ``pipeline.parallel`` > 1 are started with (the command line passes them)."""
    view = run_view(cfg)  # a run in a bucket: each stage pulls and pushes, here on this machine's working copy
    rd = view.local
    parallel = check_parallel(cfg.pipeline.parallel, "pipeline.parallel")
    start = time.perf_counter()
    for stage in BEFORE_EXPERTS:
        run_stage(stage, cfg)
    K = int(view.read(rd.cluster_report)["k"])
    if parallel == 1:
        for k in range(K):
            run_stage("train-expert", with_expert(cfg, k))
    else:
        _experts_side_by_side(cfg, view, K, parallel, overrides)
    for stage in AFTER_EXPERTS:
        run_stage(stage, cfg)
    evaluate = bool(cfg.pipeline.evaluate)
    metrics = run_stage("evaluate", cfg) if evaluate else None
    total = round(time.perf_counter() - start, 1)
    log.info("pipeline: all stages done in %.0fs -> %s", total, view.where)
    run_stage("report", cfg)
    log.info("%s", headline(rd, metrics, run_argument(cfg)))
    return dict(run_dir=view.where, wall_s=total)


def run_argument(cfg: Settings) -> str:
    """How a later command names this run: ``name=...`` where the run lives at its default place, else ``run_dir=``."""
    default = Path(str(cfg.paths.runs)) / str(cfg.name)
    if is_url(cfg.run_dir) or default.resolve() != Path(str(cfg.run_dir)).resolve():
        return f"run_dir={cfg.run_dir}"
    return f"name={cfg.name}"


def headline(rd: RunDir, metrics: dict | None, run: str) -> str:
    """What a user reads last: where the grid is and how good the samples are (or how to find out).

    ``run``: how the evaluate command names the run (``name=demo``, ``run_dir=...``: ``run_argument``).
    """
    lines = [f"samples: {rd.samples / 'grid.png'}"]
    if metrics is None:
        lines.append(f"quality: not measured here; `ddm evaluate {run}` writes FD and class accuracy")
        return "\n".join(lines)
    space, quality = next(iter(metrics["feature_spaces"].items()))
    strategy, row = next(iter(quality["strategies"].items()))
    accuracy = row.get("classifier_accuracy")
    lines.append(
        f"quality ({strategy}, {row['num_generated']} samples, {space}): FD {row['fd']:.4g}"
        + ("" if accuracy is None else f", the requested class {accuracy:.1%} of the time")
        + f" -> {rd.evaluation_metrics}"
    )
    return "\n".join(lines)


def _experts_side_by_side(cfg: Settings, view: RunView, K: int, parallel, overrides: list[str] | None) -> None:
    """The unfinished experts as processes of their own, ``parallel`` at a time (None: as the machine allows)."""
    redo, rd = bool(cfg.redo), view.local
    finished = [k for k in range(K) if not redo and view.job(rd.expert(k), rd.expert_record(k)).record() is not None]
    for k in finished:  # returns at once, after checking the record is of the current partitions
        run_stage("train-expert", with_expert(cfg, k))
    todo = [k for k in range(K) if k not in finished]
    if not todo:
        return
    if overrides is None:
        raise BadInput(
            f"pipeline.parallel={parallel or 'auto'}: each expert runs as its own `ddm train-expert` process, "
            f"which composes its config from overrides; pass the ones cfg was composed with: "
            f"pipeline.run(cfg, overrides=[...])"
        )
    plan = machine_plan(parallel, cfg.island, "pipeline.parallel", len(todo))
    train_here(local_jobs(cfg, rd, todo, False, overrides, where=view.where), plan, overrides)
