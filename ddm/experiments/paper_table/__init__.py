"""The small-scale paper table: DDM against a monolith at equal training FLOPs.

What it compares (the grid lives under ``paper:`` in ``conf/experiment/paper_*.yaml``):

- a **monolith**: one expert-sized model trained on all the data at batch B (a K = 1 run);
- **DDMs** with K clustered experts, each at batch B / K for the same steps (so the
  experts together spend the monolith's FLOPs, as in the paper), and, as the
  paper's baseline, K experts on a **random** partition;
- each configuration at several **training budgets** (steps), so the curves show a trend;
- **routing strategies** on the same trained experts and router (no retraining):
  ``top1``, ``topk``, ``full``, ``sample``, ``threshold`` and ``nucleus`` (at the
  table's ``sample.threshold`` and ``sample.top_p``), ``top1_separate_cfg``: top-1
  with guidance's null input routed on its own (``sample.cfg_routing=separate``),
  and ``class_expert``: for class c, always the expert whose cluster holds most
  training images of c (an oracle-like baseline for class-conditional runs);
- ``distilled`` in the strategies: each DDM's experts distilled into one student (``ddm distill``);
- a **mixed-kind DDM** (``paper.mixed_targets``): the clustered DDM of one K retrained with a
  prediction target per expert (velocity, eps, x0), with the clustered run's router, at the largest budget;
- one sampler (solver, steps, guidance scale, number of samples, seed) for every row, and a **guidance
  sweep** (``paper.cfg_scales``) of every configuration's top-1 at the largest budget, sampling only.

Equal FLOPs: the router's training FLOPs count on the DDM side. With
``paper.monolith_matches_router`` the monolith trains the extra steps that cost
the router's FLOPs (of the largest K), so it never spends less than a DDM; every
row states its own FLOPs either way.

Every step is a stage run through ``ddm.stages.runner.run_stage`` and so skips
work that is done; the fixed per-class expert's metrics are cached beside the
evaluate stage's. Rerunning continues an interrupted table; ``table.md``,
``results.json`` and the plots are rewritten only when their content changes.

The modules, in the order the work flows:

- ``plan``: the grid (``Config``, ``Run``, ``Plan``) and the FLOP-matched steps;
- ``layout``: the table's folders and the config each stage of a run sees;
- ``estimate``: the wall-time estimate from a few timed steps;
- ``runs``: data, clustering, training and evaluation of each run (the K = 1 constant router);
- ``class_expert``: the fixed per-class expert baseline;
- ``mixed``: the mixed-kind DDM (``paper.mixed_targets``): its experts' targets and job overrides;
- ``extra_rows``: the rows evaluated beside the evaluate stage (class_expert, top1_separate_cfg);
- ``sweep_options``, ``guidance_sweep``, ``sweep_table``: the guidance sweep at the largest budget
  (``paper.cfg_scales``): its scales, its sampling and its section of table.md;
- ``results``: the rows of a run, the shared settings, the files written;
- ``table`` and ``plots``: table.md and the two plots.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from ddm.io import write_json
from ddm.settings import Settings

from . import estimate  # the module: its function of the same name would hide it
from .grid import CLASS_EXPERT, SEPARATE_CFG, SINGLE, Config, Plan, Run, describe, make_plan, paper_grid
from .guidance_sweep import sweep_run
from .results import prep_wall_s, rows_of, run_wall_s, settings_summary, write_outputs
from .runs import evaluate_run, prepare_clustering, prepare_data, train_run

__all__ = ["CLASS_EXPERT", "SEPARATE_CFG", "SINGLE", "Config", "Plan", "Run", "describe", "make_plan", "run"]

log = logging.getLogger("ddm")


def run(cfg: Settings) -> dict:
    """Train and evaluate the grid of ``cfg.paper``; write table.md, results.json and plots into ``cfg.run_dir``.

    Prints the plan and an estimate of the time left first. ``paper.dry_run=true``
    stops after that. Returns the output paths, the rows and the wall time.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)  # island.threads is for this table's work, not for the caller's process


def _run(cfg: Settings) -> dict:
    if cfg.island.threads:
        # before the estimate and the in-process evaluation, not only inside the training jobs: on a shared
        # machine, more threads than free cores slow every step several times over
        torch.set_num_threads(int(cfg.island.threads))
    plan = make_plan(cfg)
    root = Path(cfg.run_dir)
    log.info("paper table -> %s\n%s", root, describe(plan))
    est = estimate.estimate(cfg, plan) if paper_grid(cfg).get("estimate", True) else None
    if est:
        log.info(
            "paper table: estimated time left %.0f min (training %.0f, evaluation %.0f, data %.0f, feature "
            "net %.0f s; from timed steps: expert %s s/step by batch, router %s s/step)",
            est["total_s"] / 60,
            est["train_s"],
            est["eval_s"],
            est["data_s"],
            est["feature_net_s"],
            est["expert_step_s"],
            est["router_step_s"],
        )
    if paper_grid(cfg).get("dry_run", False):
        return dict(plan=describe(plan), estimate=est)

    start = time.perf_counter()
    prepare_data(cfg, plan)
    for config in plan.configs:
        if not config.targets:  # a mixed-kind DDM shares the clustered DDM's clustering
            prepare_clustering(cfg, config)
    rows, per_run, sweeps, first = [], {}, [], None
    prep_s = prep_wall_s(cfg, plan)
    for i, r in enumerate(plan.runs):
        log.info("paper table: [%d/%d] %s", i + 1, len(plan.runs), r.name)
        train_run(cfg, r)
        metrics, extra = evaluate_run(cfg, r)
        sweep = sweep_run(cfg, r, metrics)
        first = first or metrics
        rows += rows_of(r, metrics, extra, root)
        sweeps += [sweep] if sweep else []
        wall = run_wall_s(r, metrics, extra) + (sweep["wall_s"] if sweep else 0)
        per_run[r.name] = dict(wall_s=round(wall, 1), run_dir=os.path.relpath(r.folder, root))
    results = dict(
        settings=settings_summary(cfg, plan, first),
        rows=rows,
        cfg_sweep=[{k: v for k, v in sw.items() if k != "key"} for sw in sweeps],
        runs=per_run,
        wall_s_prep=prep_s,
        wall_s_work=round(prep_s + sum(v["wall_s"] for v in per_run.values()), 1),
    )
    outputs = write_outputs(cfg, results)
    wall = round(time.perf_counter() - start, 1)
    write_json(
        root / "timings.json",
        dict(last_invocation_wall_s=wall, estimate=est, work_wall_s=results["wall_s_work"], runs=per_run),
    )
    log.info("paper table: %d rows in %.0f s -> %s", len(rows), wall, outputs["table"])
    return dict(outputs, rows=rows, wall_s=wall, estimate=est)
