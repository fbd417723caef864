"""Running one stage: dispatch, seed, time, record. The command line, the pipeline and the paper table all call it.

A stage run through ``run_stage`` behaves the same wherever it is called from:
the global random state is seeded from ``cfg.seed`` first, and its wall time
and peak memory are written to ``RunDir.timing(job)`` unless it only found its
results already there (then the earlier timing, of the run that did the work,
stays).
"""

from __future__ import annotations

import importlib

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import write_json
from ddm.job_names import stage_job
from ddm.seeds import seed_everything
from ddm.stages import STAGES
from ddm.timing import measured


def done_already(marker, cfg) -> bool:
    """True when a stage's final artefact exists and no redo was asked for."""
    return marker.exists() and not cfg.redo


def stage_module(stage: str):
    """The module of a stage by its command-line name."""
    if stage not in STAGES:
        raise BadInput(f"unknown stage {stage!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"ddm.stages.{STAGES[stage].module}")


def record_timing(rd: RunDir, job: str, timing: dict) -> None:
    """Write one job's timing to its own file (see ``RunDir.timing``)."""
    write_json(rd.timing(job), dict(job=job, **timing))


def run_stage(stage: str, cfg, job: str | None = None, **kwargs):
    """Run ``stage`` on ``cfg``, seeded from ``cfg.seed``; record its timing as ``job`` when it did work.

    ``job`` defaults to the stage name (``train-expert-KK`` for an expert).
    Keyword arguments go to the stage's ``run``.
    """
    module = stage_module(stage)
    seed_everything(int(cfg.seed))
    if not STAGES[stage].timed:
        return module.run(cfg, **kwargs)
    with measured({}) as timing:
        result = module.run(cfg, **kwargs)
    if not getattr(result, "skipped", False):
        record_timing(RunDir(cfg.run_dir), job or stage_job(stage, cfg), timing)
    return result
