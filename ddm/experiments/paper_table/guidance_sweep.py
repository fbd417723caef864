"""The guidance sweep: each configuration's top-1 (the monolith: its one model) sampled at every scale of
``paper.cfg_scales`` at the largest budget, so that no comparison rests on a scale that suits one side.

Sampling only, on the trained models: the held-out images, generated labels, prior
noise and feature net are those of the evaluate stage's rows. At the table's own
``sample.cfg_scale`` the images are those of the top-1 row itself, so its figures are
taken from the evaluate stage's metrics; every other scale is sampled into
``evaluation/cfg-sweep/top1-cfg<scale>.npz``. The result (FD, precision, recall,
class accuracy and sampling FLOPs per scale) is cached in ``evaluation/cfg_sweep.json``,
keyed by the evaluate stage's settings and the scales.
"""

from __future__ import annotations

import logging
import time

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.eval import feature_net as fnet
from ddm.eval.flops import mean_expert_flops, sampling_flops_per_image
from ddm.eval.run.generated import labels_to_sample, sample_now
from ddm.io import read_json, write_json
from ddm.job_names import ROUTER_JOB
from ddm.settings import Settings
from ddm.stages import evaluate

from .grid import Run
from .layout import run_cfg

log = logging.getLogger("ddm")

SWEEP_FILE = "cfg_sweep.json"
QUALITY_KEYS = ("fd", "precision", "recall", "classifier_accuracy", "num_generated")


def sweep_run(cfg: Settings, r: Run, metrics: dict) -> dict | None:
    """The sweep of run ``r`` (None when it has none): ``{config, budget, shared_scale, feature_space, scales:
    [{cfg_scale, fd, precision, recall, classifier_accuracy, num_generated, sampling_flops_per_image, source}],
    best_scale, wall_s}``."""
    if not r.cfg_sweep:
        return None
    rcfg = run_cfg(cfg, r)
    rd = RunDir(r.folder)
    target = evaluate.evaluation_dir(rd) / SWEEP_FILE
    key = dict(settings=evaluate.settings_of(rcfg), scales=list(r.cfg_sweep))
    if target.exists() and not rcfg.redo:
        cached = read_json(target)
        made = cached.get("key") or {}
        if dict(made, settings=evaluate.comparable_settings(made.get("settings"))) == key:
            return cached
    start = time.perf_counter()
    ctx = evaluate.EvaluationContext(rcfg, rd, key["settings"], redo=False)  # the stage made the held-out set
    net, info = ctx.feature_net()
    space = metrics["feature_spaces"].get(net.space)
    if space is None:
        raise BadInput(f"{rd.root}: the guidance sweep's feature space {net.space} is not the evaluation's")
    classify = (lambda x: fnet.predict(net.net, x, ctx.batch)) if info["target"] == "class" else None

    def extract(x):
        return fnet.features(net.net, x, ctx.batch)

    shared = float(ctx.sc["cfg_scale"])
    labels = labels_to_sample(ctx.real_y, ctx.data_classes, int(ctx.ec.num_samples), ctx.seed)
    rows = []
    for s in r.cfg_sweep:
        if s == shared:  # the top-1 row's own images, at the table's scale
            q, source = space["strategies"]["top1"], "the top-1 row (evaluation/metrics.json)"
        else:
            out = evaluate.evaluation_dir(rd) / "cfg-sweep" / f"top1-cfg{s:g}.npz"
            generated = sample_now(
                ctx.ensemble("top1"),
                ctx.path,
                ctx.shape,
                labels,
                int(ctx.ec.num_samples),
                int(rcfg.sample.batch_size),
                dict(ctx.sc, cfg_scale=s),
                ctx.seed,
                ctx.device,
                out,
                rd.root,
            )
            q = ctx.quality(extract, {"top1": generated}, classify=classify)["strategies"]["top1"]
            source = generated["source"]
        rows.append(
            dict(
                cfg_scale=s,
                **{k: q.get(k) for k in QUALITY_KEYS},
                sampling_flops_per_image=_sampling_flops(ctx, r, s),
                source=source,
            )
        )
        log.info("paper table: %s guidance %g: FD %.4g", r.name, s, q["fd"])
    result = dict(
        key=key,
        config=r.config.name,
        budget=r.budget,
        shared_scale=shared,
        feature_space=net.space,
        scales=rows,
        best_scale=best_scale(rows),
        wall_s=round(time.perf_counter() - start, 2),
    )
    write_json(target, result)
    return read_json(target)


def best_scale(rows: list[dict]) -> float:
    """The scale of the lowest FD (ties to the smaller scale)."""
    return min(rows, key=lambda row: (row["fd"], row["cfg_scale"]))["cfg_scale"]


def _sampling_flops(ctx, r: Run, scale: float) -> float:
    """Sampling FLOPs per image of top-1 at ``scale`` (the monolith: one model, no router)."""
    sc = ctx.sc
    return sampling_flops_per_image(
        mean_expert_flops(ctx.forward),
        ctx.forward[ROUTER_JOB] if r.config.k > 1 else 0,
        "top1" if r.config.k > 1 else None,
        steps=int(sc["steps"]),
        solver=sc["solver"],
        cfg_scale=scale,
        conditional=ctx.conditional,
        num_experts=r.config.k,
        top_k=int(sc["top_k"]),
        cfg_interval=sc.get("cfg_interval"),
    )["per_image"]
