"""A run's FLOPs from its networks and job records: training FLOPs per job, sampling FLOPs per strategy.

Counting and the sampling formula live in ``ddm.eval.flops``; this module puts
them together with the training jobs' ``record.json`` files: ``flops_summary``
is the ``flops`` section of the evaluate stage's metrics.json, and
``distilled_training`` the whole cost of a distilled student.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ddm.ensemble import DATA_DEPENDENT, experts_per_sample
from ddm.eval.flops import expert_flops, sampling_flops_per_image
from ddm.job_names import ROUTER_JOB


def training_flops(record: dict, forward_flops: int | None = None) -> tuple[int | None, bool]:
    """Training FLOPs of a job from its ``record.json``: ``(flops, estimated)``.

    Uses the record's ``train_flops`` when present; otherwise 3 x forward FLOPs
    per sample x ``samples_seen`` (``estimated=True``), with the record's
    ``forward_flops_per_sample`` or the measured ``forward_flops``.
    """
    if record.get("train_flops") is not None:
        return int(record["train_flops"]), False
    fwd = record.get("forward_flops_per_sample") or forward_flops
    seen = record.get("samples_seen")
    if fwd is None or seen is None:
        return None, True
    return int(3 * int(fwd) * int(seen)), True


COUNTER = "torch.utils.flop_counter (2 FLOPs per multiply-add)"


def _measured_experts(records: Sequence[dict], num_images: int) -> dict:
    """``sampling_flops_per_image``'s measured counts from usage records of ``num_images`` images."""
    return dict(
        experts_per_call=experts_per_sample(records, num_images),
        uncond_experts_per_call=experts_per_sample(records, num_images, "uncond_counts"),
    )


def training_summary(forward: Mapping[str, int], records: Mapping[str, dict]) -> dict:
    """Training FLOPs of every job and in total, from their records (``{}`` for a job without one).

    ``records`` maps job names (``expert-KK``, ``router``) to ``record.json``
    contents. Returns ``{jobs: {<job>: {flops, estimated, samples_seen}}, total,
    router_share}``; ``total`` is None unless every job's FLOPs are known.
    """
    jobs = {}
    for name, record in records.items():
        flops, estimated = training_flops(record, forward[name])
        jobs[name] = dict(flops=flops, estimated=estimated, samples_seen=record.get("samples_seen"))
    known = [j["flops"] for j in jobs.values() if j["flops"] is not None]
    total = sum(known) if len(known) == len(jobs) else None
    router = jobs.get(ROUTER_JOB, {}).get("flops")
    return dict(jobs=jobs, total=total, router_share=router / total if total and router is not None else None)


def flops_summary(
    forward: Mapping[str, int],
    records: Mapping[str, dict],
    strategies: Sequence[str],
    *,
    steps: int,
    solver: str,
    cfg_scale: float,
    conditional: bool,
    num_experts: int,
    top_k: int,
    measured: Mapping[str, int] | None = None,
    measured_images: int = 0,
    cfg_routing: str = "shared",
    cfg_interval: Sequence[float] | None = None,
    usage: Mapping[str, tuple[Sequence[dict], int]] | None = None,
    measured_usage: Mapping[str, Sequence[dict]] | None = None,
    router_once: bool = False,
) -> dict:
    """The ``flops`` section of the evaluate stage's metrics.json.

    Args:
        forward: ``forward_flops`` of the run's networks.
        records: ``record.json`` of every training job, see ``training_summary``.
        strategies: the routing strategies evaluated; ``single_model`` is added,
            a monolith of one expert's size (no router).
        steps, solver, cfg_scale, conditional, num_experts, top_k, cfg_routing, cfg_interval: the sampling
            settings; ``router_once``: the router runs once per call under separate guidance routing too (the
            cluster router).
        measured: counted FLOPs per image of a real sampling call, per strategy
            (``measured_sampling_flops`` on ``measured_images`` images); none when empty.
        usage: ``{strategy: (usage records, images)}`` of the generated images: the
            measured experts per call of ``threshold`` and ``nucleus``.
        measured_usage: ``{strategy: usage records}`` of the counted call: for those
            strategies, ``measured_formula_per_image`` is the formula at that call's
            own experts per call, which the counted FLOPs must equal.

    Returns::

        forward_per_sample  {"expert-KK" | "router": FLOPs}
        train               {jobs: {"expert-KK" | "router": {flops, estimated, samples_seen}}, total, router_share}
        sampling            {<strategy> | "single_model": {per_image, per_call, calls, experts_per_call,
                             cfg_factor, router_per_call, expert_forward, experts_from, per_image_max,
                             measured_per_image, measured_images, [per_image_min: experts of different
                             sizes]}}; under separate guidance routing also cfg_routing,
                             uncond_experts_per_call; threshold and nucleus with measured_usage also
                             measured_formula_per_image
        counter             how the FLOPs were counted
    """
    each = expert_flops(forward)
    common = dict(
        steps=int(steps),
        solver=solver,
        cfg_scale=float(cfg_scale),
        conditional=conditional,
        num_experts=int(num_experts),
        top_k=int(top_k),
        cfg_routing=cfg_routing,
        cfg_interval=cfg_interval,
        router_once=router_once,
    )
    sampling = {}
    for s in strategies:
        row = sampling_flops_per_image(
            each, forward[ROUTER_JOB], s, **common, **_measured_experts(*(usage or {}).get(s, ((), 0)))
        )
        if measured:
            row.update(measured_per_image=measured[s], measured_images=int(measured_images))
            if s in DATA_DEPENDENT and measured_usage and s in measured_usage:
                at = _measured_experts(measured_usage[s], int(measured_images))
                row["measured_formula_per_image"] = sampling_flops_per_image(
                    each, forward[ROUTER_JOB], s, **common, **at
                )["per_image"]
        sampling[s] = row
    sampling["single_model"] = sampling_flops_per_image(each, 0, None, **common)
    return dict(
        forward_per_sample=dict(forward), train=training_summary(forward, records), sampling=sampling, counter=COUNTER
    )


def distilled_training(train: Mapping, record: Mapping) -> dict:
    """Training FLOPs of a distilled model, from the stage's ``train`` summary and ``distilled/record.json``.

    The student exists only after its teachers did, so its cost is all of it: the experts' training
    (as ``train`` counts it; the router is not needed to sample the student and is left out), the
    student's own training (3 x its forward per sample seen) and the teachers' forwards during
    distillation (one expert forward per sample seen). Returns ``{experts, student, teacher_forward,
    total, samples_seen}``; ``total`` is None unless every part is known.
    """
    experts = [j["flops"] for name, j in train["jobs"].items() if name != ROUTER_JOB]
    known = None if not experts or any(f is None for f in experts) else int(sum(experts))
    student, teacher = record.get("train_flops"), record.get("teacher_flops")
    parts = (known, student, teacher)
    return dict(
        experts=known,
        student=student,
        teacher_forward=teacher,
        total=None if any(p is None for p in parts) else int(sum(parts)),
        samples_seen=record.get("samples_seen"),
    )
