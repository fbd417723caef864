"""Typed, frozen settings: the config, checked once at the door, as the stages and the library read it.

The command line (``ddm.cli``) and ``ddm.config.settings`` compose the Hydra
config and turn it into a ``Settings`` with ``from_values``; from there on,
every stage and everything below takes ``Settings``, one of its groups, or
plain arguments, never the config object. Attribute paths are the config's
(``settings.sample.steps`` is ``sample.steps``); each value's default is
written once, in ``conf/``.

A value of the wrong type is refused at the door in one line naming the key;
a mandatory value nobody gave is refused where a stage reads it
(``MissingValue``). ``changed(settings, {"expert.id": 3})`` is a copy with
some values changed, checked the same way.
"""

from __future__ import annotations

import dataclasses

from ddm.settings.jobs import (
    Distill,
    Expert,
    Extend,
    Island,
    Logger,
    Pipeline,
    Plan,
    Router,
    Slurm,
    Submit,
    Training,
)
from ddm.settings.run import Cluster, Data, Embed, Flow, Model, Paths, Store, Text, Vae
from ddm.settings.sampling import Eval, Sample
from ddm.settings.values import UNSET, Group, MissingValue, build, changed, settings_fields

__all__ = [
    "UNSET",
    "Cluster",
    "Data",
    "Distill",
    "Embed",
    "Eval",
    "Expert",
    "Extend",
    "Flow",
    "Group",
    "Island",
    "Logger",
    "MissingValue",
    "Model",
    "Paths",
    "Store",
    "Pipeline",
    "Plan",
    "Router",
    "Sample",
    "Settings",
    "Slurm",
    "Submit",
    "Text",
    "Training",
    "Vae",
    "changed",
    "from_values",
    "settings_fields",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(Group):
    """Every setting of one ``ddm`` command (``conf/config.yaml`` and its groups)."""

    name: str
    run_dir: str
    seed: int
    redo: bool
    log_level: str
    debug: bool
    paths: Paths
    data: Data
    embed: Embed
    cluster: Cluster
    vae: Vae
    model: Model
    text: Text
    expert: Expert
    router: Router
    distill: Distill
    extend: Extend
    sample: Sample
    eval: Eval
    island: Island
    logger: Logger
    submit: Submit
    pipeline: Pipeline
    store: Store
    plan: Plan
    flow: Flow
    paper: dict | None = None  # the paper table's own settings (experiment files of the table only)


def from_values(values: dict) -> Settings:
    """``Settings`` from the composed config as plain values (``OmegaConf.to_container(cfg, resolve=True)``)."""
    return build(Settings, dict(values))
