"""One module per stage of a run; each exposes ``run(cfg) -> dict``.

Contract of a stage:
- it reads only the artefacts of earlier stages it needs (paths from
  ``ddm.artifacts.RunDir``) and writes its own atomically;
- it returns at once with the existing summary when its final artefact exists,
  unless ``redo`` is true; then it returns ``StageResult(summary, skipped=True)``,
  so the runner keeps the timing of the run that did the work;
- it logs one line with what it produced.

Stages are run by ``ddm.stages.runner.run_stage``, which seeds, times and
records them the same way whether they run alone or inside ``pipeline``.
"""

from __future__ import annotations

from typing import NamedTuple


class StageResult(dict):
    """A stage's summary (a dict, as stages always returned) that also says whether the stage only found its
    results already there (``skipped``): the runner then keeps the timing of the run that did the work."""

    def __init__(self, summary: dict, skipped: bool = False):
        super().__init__(summary)
        self.skipped = bool(skipped)


class Stage(NamedTuple):
    module: str  # the module under ddm.stages
    summary: str  # one line for `ddm --help`
    timed: bool  # its wall time and memory go to the run's timings
    groups: tuple[str, ...] = ()  # the config groups it reads (`ddm <stage> --help` shows them)


# In the order data flows through a run.
STAGES: dict[str, Stage] = {
    "prepare": Stage("prepare", "write the dataset as webdataset shards with a manifest", True, ("data", "paths")),
    "embed": Stage(
        "embed", "embed every image for clustering (pixels, open_clip, torchvision, dinov2)", True, ("embed", "data")
    ),
    "cluster": Stage(
        "cluster", "k-means the embeddings into K clusters (two-stage, flat or random)", True, ("cluster",)
    ),
    "partition": Stage("partition", "write one shard set per cluster", True, ("cluster",)),
    "encode": Stage("encode", "encode every partition with the VAE (latent runs; vae=none: nothing)", True, ("vae",)),
    "train-expert": Stage(
        "train_expert",
        "train expert expert.id on its own partition, in isolation",
        True,
        ("expert", "model", "island", "logger"),
    ),
    "train-router": Stage(
        "train_router", "train the router that predicts a noisy sample's cluster", True, ("router", "island", "logger")
    ),
    "fit-route-tau": Stage(
        "fit_route_tau",
        "fit the temperature of the router of the run's clusters (sample.router=clusters sample.route_tau=fitted)",
        True,
        ("sample", "eval"),
    ),
    "distill": Stage(
        "distill",
        "train one student to match each sample's own expert (optional; sample.model=distilled samples it)",
        True,
        ("distill", "island", "logger"),
    ),
    "extend": Stage(
        "extend",
        "grow a finished run by new images: a new cluster or the nearest ones; untouched experts stay as they are",
        True,
        ("extend", "expert", "router", "island", "logger"),
    ),
    "sample": Stage(
        "sample", "sample a labelled grid from the experts and the router (or the distilled model)", True, ("sample",)
    ),
    "evaluate": Stage(
        "evaluate", "FD, precision/recall, held-out FM loss, router diagnostics, FLOPs", True, ("eval", "sample")
    ),
    "report": Stage("report", "write report.md and a montage of each cluster", True, ()),
    "pipeline": Stage(
        "pipeline",
        "every stage from prepare to report, in order (what `make demo` runs)",
        False,
        ("data", "embed", "cluster", "model", "expert", "router", "sample", "island", "logger"),
    ),
    "submit": Stage(
        "submit",
        "start the unfinished experts and the router: on SLURM, or here (submit.launcher=local)",
        False,
        ("island", "expert", "router"),
    ),
    "plan": Stage(
        "plan",
        "print what a config would train: sizes, FLOPs, memory per GPU, GPU-days (runs nothing)",
        False,
        ("model", "expert", "router", "island", "vae", "text"),
    ),
    "status": Stage("status", "show where each job of a run stands (files and SLURM queue)", False, ()),
}
