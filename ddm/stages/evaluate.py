"""Stage ``evaluate``: sample quality, held-out flow-matching loss, router diagnostics and FLOPs of a run.

Reads the run's experts and router, ``samples/`` (reused when it holds enough
images made with the settings asked for; otherwise images are sampled here) and
the training data; writes, in ``<run>/evaluation/``::

    heldout/                held-out real images as shards + manifest (ddm.eval.run.heldout)
    samples-<strategy>.npz  images sampled by this stage (when samples/ had too few)
    report.md               one table per feature space; every comparison states its FLOPs (ddm.eval.tables)
    metrics.json            written last (the stage's "done" marker)

Each section of metrics.json is described where it is built::

    settings         settings_of (below): what a rerun compares to skip
    run, heldout     EvaluationContext.run_info, EvaluationContext.heldout_info
    feature_spaces   feature_spaces (below), with ddm.eval.quality.sample_quality
    generated, usage generated_summary (below)
    clip_score       text runs: {strategy: {mean, num_images}}, 100 x cos(image, prompt) (ddm.eval.clip_score)
    fm_loss          EvaluationContext.fm_loss, with ddm.eval.fm_loss.fm_loss_summary
    router           EvaluationContext.router
    flops            ddm.eval.run.flop_section, with ddm.eval.flops_summary.flops_summary
    wall_s           seconds the evaluation took

With ``sample.model=distilled`` the run's distilled student is evaluated in place of the
ensemble, and ``eval.strategies`` may list ``distilled`` beside routing strategies
(``ddm.distill.evaluation``).

Feature spaces: ``classifier:<checksum>``, a small CNN trained on the training
split and cached by content (ddm.eval.feature_net), always; ``inception:<sha>``
when ``eval.inception_weights`` names a local file, with the Inception Score and sFID where the file gives
them, and the FID against the reference that ``eval.reference`` names (ADM's reference batches, clean-fid's
stats files, or a folder of images or shards whose statistics are computed once and cached);
``dinov2:<sha>`` when ``eval.dinov2_weights`` names a local DINOv2 file. Each space is its own entry
and its own table: numbers from different spaces are never mixed.

A rerun with the same settings and networks returns the existing metrics; other
settings (or ``redo=true``) evaluate again. ``redo`` rebuilds the held-out shards
but reuses a cached feature net: its cache is keyed by content, so it is the same net.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ddm.artifacts import RunDir
from ddm.devices import resolve_device
from ddm.distill.evaluation import DistilledContext, wants_distilled
from ddm.errors import MissingConfig
from ddm.eval.router_diag import usage_per_step
from ddm.eval.run import evaluation_dir
from ddm.eval.run.context import EvaluationContext
from ddm.eval.run.feature_spaces import (
    classifier_functions,
    data_image_size,
    inception_extras,
    load_dinov2,
    load_inception,
    load_reference_stats,
)
from ddm.eval.run.flop_section import flops_section
from ddm.eval.tables import render_report
from ddm.io import read_json, sha256_file, write_json, write_text
from ddm.job_names import is_expert
from ddm.markdown import num
from ddm.sampling.checkpoints import models_identity
from ddm.sampling.draw import requested_settings
from ddm.settings import Settings
from ddm.stages import StageResult

__all__ = [
    "EvaluationContext",
    "comparable_settings",
    "evaluation_dir",
    "feature_spaces",
    "generated_summary",
    "run",
    "settings_of",
]

log = logging.getLogger("ddm")


def settings_of(cfg: Settings) -> dict:
    """metrics.json ``settings``: what the metrics depend on, the skip check of a rerun.

    ``{eval: the eval config, sample: the sampling settings (ddm.stages.sample),
    networks: {<file under the run>: size} of router.pt, every expert.pt and, with a distilled
    row, distilled/expert.pt}``
    """
    if cfg.eval is None:
        raise MissingConfig(
            "the config has no `eval` group: add `- eval: default` to the defaults of "
            "conf/config.yaml or pass +eval=default on the command line"
        )
    return dict(
        eval=_eval_settings(cfg.eval),
        sample=requested_settings(cfg.sample),
        networks=_network_files(RunDir(cfg.run_dir), distilled=wants_distilled(cfg)),
    )


def _eval_settings(ec) -> dict:
    """The eval config; ``reference`` only when set (metrics from before the option still match), then with the
    file's sha256 (a folder's: the digest of its images' bytes), so a new reference at the same path is evaluated
    again. Options added later are left out at their defaults for the same reason: ``dinov2_*`` without
    DINOv2 weights, ``inception_score``/``sfid`` without an Inception file, and ``reference_cache`` (where
    statistics are kept, not what they are)."""
    out = ec.to_dict()
    out.pop("reference_cache", None)
    if out.get("dinov2_weights") is None:
        out.pop("dinov2_weights", None)
        out.pop("dinov2_model", None)
    if out.get("inception_weights") is None:
        out.pop("inception_score", None)
        out.pop("sfid", None)
    ref = out.get("reference")
    if ref is None:
        out.pop("reference", None)
    elif Path(ref).expanduser().is_file():
        out["reference_sha256"] = sha256_file(Path(ref).expanduser())
    elif Path(ref).expanduser().is_dir():
        from ddm.eval.reference_images import find_image_set

        out["reference_sha256"] = find_image_set(ref).digest()
    return out


def _network_files(rd: RunDir, distilled: bool = False) -> dict:
    """The size of router.pt, every expert.pt and (``distilled``) the distilled model. A retrained network is
    evaluated again by its record's ``weights_sha256`` (``models_identity``); no modification time is recorded,
    since a copy of the run (another machine's, pulled from a bucket) has the same networks at other times."""
    files = sorted(rd.experts.glob("expert-*/expert.pt")) + [rd.router_weights]
    files += [rd.distilled_weights] if distilled else []
    return {str(p.relative_to(rd.root)): p.stat().st_size for p in files if p.exists()}


def comparable_settings(settings: dict | None) -> dict | None:
    """metrics.json's settings as they compare now: networks recorded as [size, mtime] (before) count by size."""
    if not isinstance(settings, dict) or not isinstance(settings.get("networks"), dict):
        return settings
    sizes = {k: v[0] if isinstance(v, list) else v for k, v in settings["networks"].items()}
    return dict(settings, networks=sizes)


def run(cfg: Settings) -> dict:
    """Evaluate the run at ``cfg.run_dir`` as ``cfg.eval`` says; return the metrics."""
    rd = RunDir(cfg.run_dir)
    redo = cfg.redo
    out = evaluation_dir(rd)
    settings = settings_of(cfg)
    if (rd.evaluation_metrics).exists() and not redo:
        metrics = read_json(rd.evaluation_metrics)
        if comparable_settings(metrics.get("settings")) == settings and metrics.get("models") == models_identity(rd):
            log.info("evaluate: done already -> %s", rd.evaluation_metrics)
            return StageResult(metrics, skipped=True)

    start = time.perf_counter()
    # fail on a missing file before any slow work; on eval.device, where the evaluation's other networks run
    device = resolve_device(cfg.eval.device, "eval.device")
    inception = load_inception(cfg.eval, device)
    extras = inception_extras(cfg.eval, inception)  # sFID or IS asked of a file without them fails here
    dinov2 = load_dinov2(cfg.eval, device)
    # a file of another feature space or image size fails here; a folder's statistics are computed (or read) here
    reference = load_reference_stats(cfg.eval, inception, data_image_size(rd) if cfg.eval.reference else None)
    # sample.model=distilled (or `distilled` in eval.strategies): the distilled student is a row too
    ctx = (DistilledContext if wants_distilled(cfg) else EvaluationContext)(cfg, rd, settings, redo)
    metrics = dict(
        stage="evaluate",
        settings=settings,
        models=models_identity(rd),  # a retrained model makes these figures stale
        run=ctx.run_info(),
        heldout=ctx.heldout_info(),
    )
    generated = {s: ctx.generated(s) for s in ctx.strategies}
    metrics["flops"] = flops_section(ctx, generated)  # threshold, nucleus: at the experts these images used
    metrics["feature_spaces"] = feature_spaces(ctx, generated, inception, reference, extras, dinov2)
    metrics.update(generated_summary(generated))
    if ctx.text:
        metrics["clip_score"] = ctx.heldout_text.clip_score(generated, ctx.batch)
    metrics["fm_loss"] = ctx.fm_loss()
    metrics["router"] = ctx.router()
    metrics["wall_s"] = round(time.perf_counter() - start, 2)

    write_text(out / "report.md", render_report(metrics))
    write_json(rd.evaluation_metrics, metrics)
    metrics = read_json(rd.evaluation_metrics)  # what a rerun returns: JSON types (string keys) throughout
    _log_summary(metrics, ctx.strategies[0], out)
    return metrics


def feature_spaces(
    ctx: EvaluationContext, generated: dict, inception, reference=None, extras: dict | None = None, dinov2=None
) -> dict:
    """metrics.json ``feature_spaces``: sample quality in each feature space, keyed by its name, classifier first.

    ``classifier:<checksum[:12]>``: the classifier's description
    (``ddm.eval.run.feature_spaces.classifier_info``) plus ``sample_quality``.
    ``inception:<sha[:12]>``: ``{kind, file, sha256, sfid, inception_score}`` (the last two: whether they are
    measured, ``extras`` of ``inception_extras``) plus ``sample_quality``, whose rows then hold ``sfid`` and
    ``inception_score``; with ``eval.reference`` also ``reference: {kind, file, sha256, feature_space, dim,
    num_images, image_size, spatial, ...}`` (``ddm.eval.reference``) and each row's ``fd_reference`` (and
    ``sfid_reference`` with spatial statistics), the FID against the reference.
    ``dinov2:<sha[:12]>``: ``{kind: dinov2, model, file, sha256, feature_dim, image_size}`` plus
    ``sample_quality`` (``ddm.eval.dinov2_space``).
    """
    net, info = ctx.feature_net()
    extract, classify = classifier_functions(net, info["target"], ctx.batch)
    spaces = {net.space: dict(info, **ctx.quality(extract, generated, classify=classify))}
    if inception is not None:
        batch = int(ctx.ec.inception_batch_size)
        extras = extras or dict(spatial=False, probs=False)
        spaces[inception.space] = dict(
            kind=inception.kind,
            file=str(inception.path),
            sha256=inception.sha256,
            sfid=extras["spatial"],
            inception_score=extras["probs"],
            **({} if reference is None else dict(reference=reference.describe())),
            **ctx.quality(lambda x: inception.outputs(x, batch, **extras), generated, reference_stats=reference),
        )
    if dinov2 is not None:
        spaces[dinov2.space] = dict(
            kind="dinov2",
            model=dinov2.model,
            file=str(dinov2.path),
            sha256=dinov2.sha256,
            feature_dim=dinov2.dim,
            image_size=dinov2.image_size,
            **ctx.quality(lambda x: dinov2(x, ctx.batch), generated),
        )
    return spaces


def generated_summary(generated: dict) -> dict:
    """metrics.json ``generated`` and ``usage``.

    ``generated``: ``{<strategy>: {num_images, source}}``, where ``source`` is the
    file under the run the images came from. ``usage``: ``{<strategy>: [{step, t,
    selected: [K], weight: [K]}]}`` per solver evaluation (``ddm.eval.router_diag.usage_per_step``),
    for strategies whose sampling recorded it.
    """
    return dict(
        generated={s: dict(num_images=len(g["images"]), source=g["source"]) for s, g in generated.items()},
        usage={s: usage_per_step(g["usage"], g["usage_images"]) for s, g in generated.items() if g["usage"]},
    )


def _log_summary(metrics: dict, strategy: str, out) -> None:
    name, space = next(iter(metrics["feature_spaces"].items()))
    first = space["strategies"][strategy]
    ensembles = ", ".join(f"{k} {v['mean']:.4f}" for k, v in metrics["fm_loss"]["models"].items() if not is_expert(k))
    log.info(
        "evaluate: %s FD %.4g, precision %s, recall %s, the requested class %s of the time "
        "(%s, %d images, feature net test acc %s), FM loss %s, %.0fs -> %s",
        strategy,
        first["fd"],
        num(first["precision"], ".3f"),
        num(first["recall"], ".3f"),
        num(first.get("classifier_accuracy"), ".3f"),
        name,
        first["num_generated"],
        num(space["test_accuracy"], ".3f"),
        ensembles,
        metrics["wall_s"],
        out,
    )
