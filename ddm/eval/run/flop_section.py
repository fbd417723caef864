"""metrics.json ``flops`` of an evaluation: forward, training and sampling FLOPs, counted and measured.

A distilled row (``ddm.distill.evaluation``) adds ``forward_per_sample.distilled``,
``sampling.distilled`` (one model, no router) and ``train.distilled`` (``ddm.eval.flops_summary.distilled_training``).
"""

from __future__ import annotations

from ddm.cluster_router import ClusterRouter
from ddm.ensemble import DATA_DEPENDENT
from ddm.eval import flops as flop_count
from ddm.eval import flops_summary as run_flops
from ddm.io import read_json
from ddm.job_names import ROUTER_JOB, expert_job
from ddm.sampling.draw import DISTILLED


def sampler_flops_settings(ctx) -> dict:
    """The sampler's keywords of ``sampling_flops_per_image`` for an ``EvaluationContext`` (steps, solver, guidance,
    the experts in use, top-k; not ``cfg_routing``, which a row may route otherwise)."""
    sc = ctx.sc
    return dict(
        steps=int(sc["steps"]),
        solver=sc["solver"],
        cfg_scale=float(sc["cfg_scale"]),
        conditional=ctx.conditional,
        num_experts=len(ctx.info.experts),
        top_k=int(sc["top_k"]),
        cfg_interval=sc.get("cfg_interval"),
    )


def flops_section(ctx, generated: dict | None = None) -> dict:
    """metrics.json ``flops`` of an ``EvaluationContext``: see ``ddm.eval.flops_summary.flops_summary``.

    ``generated``: ``{strategy: ctx.generated(strategy)}``; their usage records give
    the experts per call of the data-dependent strategies (``threshold``, ``nucleus``).
    """
    rd, sc, n_measure = ctx.rd, ctx.sc, int(ctx.ec.flops.measure_images)
    records = {expert_job(k): rd.expert_record(k) for k in ctx.info.experts}
    records[ROUTER_JOB] = rd.router_record
    records = {job: read_json(p) if p.exists() else {} for job, p in records.items()}
    measured, measured_usage = None, {}
    if n_measure > 0:
        y = ctx.labels_for_model(ctx.subset(n_measure))
        measured = {}
        for s in ctx.strategies:
            measured_usage[s] = []
            measured[s] = flop_count.measured_sampling_flops(
                ctx.ensemble(s),
                ctx.path,
                ctx.shape,
                y,
                int(sc["steps"]),
                sc["solver"],
                float(sc["cfg_scale"]),
                seed=ctx.seed,
                usage=measured_usage[s],
                cfg_interval=sc.get("cfg_interval"),
            )
        n_measure = len(y) if y is not None else 2  # an unconditional call samples 2 images
    usage = {
        s: (g["usage"], g["usage_images"]) for s, g in (generated or {}).items() if s in DATA_DEPENDENT and g["usage"]
    }
    # a single model (single_model, distilled) has no router: cfg_routing has no effect on it
    common = dict(sampler_flops_settings(ctx), cfg_routing=sc["cfg_routing"])
    routed = [s for s in ctx.strategies if s != DISTILLED]
    summary = run_flops.flops_summary(
        ctx.forward,
        records,
        routed,
        **common,
        measured=measured,
        measured_images=n_measure,
        usage=usage,
        measured_usage=measured_usage,
        router_once=isinstance(ctx.base.router, ClusterRouter),  # embeds each sample once, null rows too
    )
    if DISTILLED in ctx.strategies:
        summary["forward_per_sample"][DISTILLED] = ctx.student_forward
        row = flop_count.sampling_flops_per_image(ctx.student_forward, 0, None, **common)
        if measured:
            row.update(measured_per_image=measured[DISTILLED], measured_images=n_measure)
        summary["sampling"][DISTILLED] = row
        summary["train"][DISTILLED] = run_flops.distilled_training(summary["train"], read_json(rd.distilled_record))
    return summary
