"""Stage ``pipeline``: every stage in order on one config; what ``make demo`` runs.

prepare -> embed -> cluster -> partition -> encode (latent runs) -> train-expert (k = 0..K-1) ->
train-router -> sample -> report. Each stage skips what is already complete,
so rerunning the pipeline after an interruption continues where it stopped.
Each runs through ``run_stage``, exactly as ``ddm <stage>`` would run it.
"""

from __future__ import annotations

import copy
import logging
import time

from omegaconf import open_dict

from ddm.artifacts import RunDir
from ddm.io import read_json
from ddm.stages.runner import run_stage

log = logging.getLogger("ddm")

BEFORE_EXPERTS = ("prepare", "embed", "cluster", "partition", "encode")
AFTER_EXPERTS = ("train-router", "sample")


def with_expert(cfg, k: int):
    """A copy of ``cfg`` for expert ``k``."""
    expert_cfg = copy.deepcopy(cfg)
    with open_dict(expert_cfg):
        expert_cfg.expert.id = k
    return expert_cfg


def run(cfg) -> dict:
    rd = RunDir(cfg.run_dir)
    start = time.perf_counter()
    for stage in BEFORE_EXPERTS:
        run_stage(stage, cfg)
    K = int(read_json(rd.cluster_report)["k"])
    for k in range(K):
        run_stage("train-expert", with_expert(cfg, k))
    for stage in AFTER_EXPERTS:
        run_stage(stage, cfg)
    total = round(time.perf_counter() - start, 1)
    log.info("pipeline: all stages done in %.0fs -> %s", total, rd.root)
    run_stage("report", cfg)
    return dict(run_dir=str(rd.root), wall_s=total)
