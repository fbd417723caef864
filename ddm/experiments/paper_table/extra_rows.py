"""Rows evaluated beside the evaluate stage, on the same trained experts, held-out images and prior noise.

Each is an ``EvaluationContext`` subclass that adds one strategy label (its
``ensemble`` and ``forward_per_call``, as the context's docstring describes),
plus ``sampling_flops`` and ``row_info`` for the row's result:

- ``class_expert`` (``ClassExpertContext``): the fixed per-class expert;
- ``top1_separate_cfg`` (``SeparateCfgContext``): top-1 with guidance's null input
  routed on its own (``sample.cfg_routing=separate``), against the top-1 row's
  shared routing. Its held-out FM loss is that of top-1 (the loss has no
  guidance); it is measured all the same, as a check;
- ``clusters-<strategy>`` (``ClusterRoutedContext``): the strategy with no trained
  router, routed by the run's clusters (``sample.router=clusters``); no FM loss.

A row's metrics are cached in ``evaluation/<label>.json``, keyed by the evaluate
stage's settings.
"""

from __future__ import annotations

import logging
import time

from ddm.artifacts import RunDir
from ddm.ensemble import experts_per_sample
from ddm.eval import feature_net as fnet
from ddm.eval.flops import mean_expert_flops, sampling_flops_per_image
from ddm.eval.run.flop_section import sampler_flops_settings
from ddm.io import read_json, write_json
from ddm.job_names import ROUTER_JOB, ensemble_name
from ddm.settings import Settings
from ddm.stages import evaluate

from .class_expert import ClassExpertContext
from .cluster_routed import ClusterRoutedContext, is_cluster_routed
from .grid import CLASS_EXPERT, SEPARATE_CFG
from .layout import derive

log = logging.getLogger("ddm")


class SeparateCfgContext(evaluate.EvaluationContext):
    """The evaluate stage's context with one more strategy: top-1 whose guidance routes the null input on its own."""

    def __init__(self, cfg: Settings, rd: RunDir, settings: dict):
        super().__init__(cfg, rd, settings, redo=False)  # the evaluate stage has made the held-out set

    def ensemble(self, strategy: str, cfg_routing: str | None = None):
        if strategy != SEPARATE_CFG:
            return super().ensemble(strategy, cfg_routing)
        return super().ensemble("top1", cfg_routing="separate")

    def forward_per_call(self, strategy, experts_per_call=None):
        # no guidance in one call: top-1's cost
        return super().forward_per_call("top1" if strategy == SEPARATE_CFG else strategy, experts_per_call)

    def sampling_flops(self, generated: dict) -> dict:
        """Top-1 with the router on both inputs of guidance and one expert for each."""
        usage, images = generated["usage"], generated["usage_images"]
        return sampling_flops_per_image(
            mean_expert_flops(self.forward),
            self.forward[ROUTER_JOB],
            "top1",
            **sampler_flops_settings(self),
            cfg_routing="separate",
            experts_per_call=experts_per_sample(usage, images),
            uncond_experts_per_call=experts_per_sample(usage, images, "uncond_counts"),
        )

    def row_info(self) -> dict:
        """What the row's result records beside its metrics: the strategy it builds on and its guidance routing."""
        return dict(base_strategy="top1", cfg_routing="separate")

    def describe(self) -> str:
        return "top-1, guidance's null input routed separately"


CONTEXTS = {CLASS_EXPERT: ClassExpertContext, SEPARATE_CFG: SeparateCfgContext}


def _context(label: str, cfg: Settings, rd: RunDir, settings: dict) -> evaluate.EvaluationContext:
    if is_cluster_routed(label):
        return ClusterRoutedContext(cfg, rd, settings, label)
    return CONTEXTS[label](cfg, rd, settings)


def row_cfg(cfg: Settings, label: str) -> Settings:
    """The settings a row is evaluated (and cached) under: a ``clusters-`` row's name the cluster router."""
    return derive(cfg, **{"sample.router": "clusters"}) if is_cluster_routed(label) else cfg


def evaluate_extra_row(cfg: Settings, label: str) -> dict:
    """FD, precision, recall, FM loss and sampling FLOPs of the extra row ``label`` of run ``cfg.run_dir``.

    Returns the cached result when the evaluate stage's settings are unchanged (and ``redo`` is not set).
    """
    rd = RunDir(cfg.run_dir)
    target = evaluate.evaluation_dir(rd) / f"{label}.json"
    cfg = row_cfg(cfg, label)
    settings = evaluate.settings_of(cfg)
    if target.exists() and not cfg.redo:
        cached = read_json(target)
        if evaluate.comparable_settings(cached.get("settings")) == settings:
            return cached
    start = time.perf_counter()
    ctx = _context(
        label, derive(cfg, **{"eval.fm_loss.strategies": [label], "eval.fm_loss.per_expert": False}), rd, settings
    )
    generated = ctx.generated(label)
    net, info = ctx.feature_net()
    classify = (lambda x: fnet.predict(net.net, x, ctx.batch)) if info["target"] == "class" else None
    quality = ctx.quality(lambda x: fnet.features(net.net, x, ctx.batch), {label: generated}, classify=classify)
    fm = ctx.fm_loss()["models"].get(ensemble_name(label), {})  # none for a cluster-routed row
    result = dict(
        settings=settings,
        feature_space=net.space,
        **ctx.row_info(),
        quality=quality["strategies"][label],
        fm_loss=fm,
        sampling=ctx.sampling_flops(generated),
        generated=generated["source"],
        wall_s=round(time.perf_counter() - start, 2),
    )
    write_json(target, result)
    log.info(
        "paper table: %s %s: FD %.4g (%s) -> %s",
        rd.root.name,
        ctx.describe(),
        result["quality"]["fd"],
        net.space,
        target,
    )
    return read_json(target)  # what a rerun returns: JSON types throughout
