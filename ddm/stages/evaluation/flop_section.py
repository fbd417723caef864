"""metrics.json ``flops`` of an evaluation: forward, training and sampling FLOPs, counted and measured.

A distilled row (``ddm.stages.evaluation.distilled``) adds ``forward_per_sample.distilled``,
``sampling.distilled`` (one model, no router) and ``train.distilled`` (``ddm.eval.flops.distilled_training``).
"""

from __future__ import annotations

from ddm.eval import flops as flop_count
from ddm.io import read_json
from ddm.jobs import ROUTER_JOB, expert_job
from ddm.sampling.distilled import DISTILLED


def flops_section(ctx) -> dict:
    """metrics.json ``flops`` of an ``EvaluationContext``: see ``ddm.eval.flops.flops_summary``."""
    rd, sc, n_measure = ctx.rd, ctx.sc, int(ctx.ec.flops.measure_images)
    records = {expert_job(k): rd.expert_record(k) for k in ctx.info["experts"]}
    records[ROUTER_JOB] = rd.router_record
    records = {job: read_json(p) if p.exists() else {} for job, p in records.items()}
    measured = None
    if n_measure > 0:
        y = ctx.labels_for_model(ctx.subset(n_measure))
        measured = {
            s: flop_count.measured_sampling_flops(
                ctx.ensemble(s),
                ctx.path,
                ctx.shape,
                y,
                int(sc["steps"]),
                sc["solver"],
                float(sc["cfg_scale"]),
                seed=ctx.seed,
            )
            for s in ctx.strategies
        }
    common = dict(
        steps=int(sc["steps"]),
        solver=sc["solver"],
        cfg_scale=float(sc["cfg_scale"]),
        conditional=ctx.conditional,
        num_experts=len(ctx.info["experts"]),
        top_k=int(sc["top_k"]),
    )
    routed = [s for s in ctx.strategies if s != DISTILLED]
    summary = flop_count.flops_summary(
        ctx.forward, records, routed, **common, measured=measured, measured_images=n_measure
    )
    if DISTILLED in ctx.strategies:
        summary["forward_per_sample"][DISTILLED] = ctx.student_forward
        row = flop_count.sampling_flops_per_image(ctx.student_forward, 0, None, **common)
        if measured:
            row.update(measured_per_image=measured[DISTILLED], measured_images=n_measure)
        summary["sampling"][DISTILLED] = row
        summary["train"][DISTILLED] = flop_count.distilled_training(summary["train"], read_json(rd.distilled_record))
    return summary
