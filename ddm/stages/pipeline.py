"""Stage ``pipeline``: every stage in order on one config; what ``make demo`` runs.

prepare -> embed -> cluster -> partition -> train-expert (k = 0..K-1) ->
train-router -> sample -> report. Each stage skips what is already complete,
so rerunning the pipeline after an interruption continues where it stopped.
Wall time and peak memory of each stage go to ``RunDir.timing(job)``.
"""
from __future__ import annotations

import copy
import logging
import time

from omegaconf import open_dict

from ddm.artifacts import RunDir
from ddm.io import read_json, write_json
from ddm.stages import seed_everything, timed

log = logging.getLogger("ddm")

BEFORE_EXPERTS = ("prepare", "embed", "cluster", "partition")
AFTER_EXPERTS = ("train-router", "sample")


def record_timing(rd: RunDir, name: str, timing: dict) -> None:
    """Write one job's timing to its own file (see ``RunDir.timing``)."""
    write_json(rd.timing(name), dict(job=name, **timing))


def run_timed(stage: str, cfg, name: str | None = None):
    """One stage, seeded and timed, its timing written into cfg.run_dir (a skipped stage keeps its earlier one)."""
    from ddm.cli import run_stage  # the same dispatch as the command line

    name = name or stage
    seed_everything(int(cfg.seed))
    sink: dict = {}
    with timed(name, sink):
        result = run_stage(stage, cfg)
    if name in sink:
        record_timing(RunDir(cfg.run_dir), name, sink[name])
    return result


def run(cfg) -> dict:
    rd = RunDir(cfg.run_dir)
    start = time.perf_counter()
    for stage in BEFORE_EXPERTS:
        run_timed(stage, cfg)
    K = int(read_json(rd.cluster_report)["k"])
    for k in range(K):
        expert_cfg = copy.deepcopy(cfg)
        with open_dict(expert_cfg):
            expert_cfg.expert.id = k
        run_timed("train-expert", expert_cfg, name=f"train-expert-{k:02d}")
    for stage in AFTER_EXPERTS:
        run_timed(stage, cfg)
    total = round(time.perf_counter() - start, 1)
    log.info("pipeline: all stages done in %.0fs -> %s", total, rd.root)
    run_timed("report", cfg)
    return dict(run_dir=str(rd.root), wall_s=total)

