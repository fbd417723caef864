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
from ddm.settings import Settings
from ddm.stages import STAGES, StageResult
from ddm.store.objects import is_url
from ddm.store.working_copy import run_on_copy
from ddm.timing import measured

# Stages that take a run in a bucket by its URL, not on a working copy (ddm/store/): status and submit read it
# where it is (ddm.store.job_folders); the pipeline runs each of its stages, which go to the bucket themselves.
READ_THE_BUCKET = ("status", "submit", "pipeline")


def done_already(marker, cfg: Settings) -> bool:
    """True when a stage's final artefact exists and no redo was asked for."""
    return marker.exists() and not cfg.redo


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_made_with(stage: str, where, recorded: dict | None, wanted: dict) -> None:
    """Refuse to reuse a result that was made from other settings than ``wanted`` (dotted keys: values).

    A stage records the settings its result depends on beside it; a rerun with the same ones skips, a rerun
    with others stops here, naming what differs, instead of keeping the old result under the new settings.
    A result recorded before settings were (``recorded`` None) says nothing and is kept.
    """
    if recorded is None:
        return
    made, asked = _flat(recorded), _flat(wanted)
    differ = [
        f"{key} {made.get(key)!r} there, {asked.get(key)!r} now"
        for key in sorted(set(made) | set(asked))
        if made.get(key) != asked.get(key)
    ]
    if differ:
        raise BadInput(
            f"{where} was made with other settings ({'; '.join(differ)}): give the settings it was made with, "
            f"or `ddm {stage} redo=true` to make it again (and the stages after it)"
        )


def stage_module(stage: str):
    """The module of a stage by its command-line name."""
    if stage not in STAGES:
        raise BadInput(f"unknown stage {stage!r}; the stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"ddm.stages.{STAGES[stage].module}")


def record_timing(rd: RunDir, job: str, timing: dict) -> None:
    """Write one job's timing to its own file (see ``RunDir.timing``)."""
    write_json(rd.timing(job), dict(job=job, **timing))


def run_stage(stage: str, cfg: Settings, job: str | None = None, **kwargs):
    """Run ``stage`` on the settings ``cfg``, seeded from ``cfg.seed``; record its timing as ``job`` when it did work.

    ``job`` defaults to the stage name (``train-expert-KK`` for an expert).
    Keyword arguments go to the stage's ``run``.
    """
    if not isinstance(cfg, Settings):
        raise TypeError(
            f"run_stage takes ddm.settings.Settings, not {type(cfg).__name__}: "
            f"make them with ddm.config.settings([...overrides]) or ddm.config.to_settings(cfg)"
        )
    if is_url(cfg.run_dir) and stage not in READ_THE_BUCKET:  # a run in a bucket: on a local working copy

        def timing_key(local_cfg):
            rd = RunDir(local_cfg.run_dir)
            return rd.timing(job or stage_job(stage, local_cfg)).relative_to(rd.root).as_posix()

        return run_on_copy(cfg, stage, lambda local_cfg: run_stage(stage, local_cfg, job, **kwargs), timing_key)
    module = stage_module(stage)
    seed_everything(int(cfg.seed))
    if not STAGES[stage].timed:
        return module.run(cfg, **kwargs)
    with measured({}) as timing:
        result = module.run(cfg, **kwargs)
    if isinstance(result, dict) and not isinstance(result, StageResult):
        result = StageResult(result)  # a stage that did its work returns its summary as it is
    if not getattr(result, "skipped", False):
        record_timing(RunDir(cfg.run_dir), job or stage_job(stage, cfg), timing)
    return result
