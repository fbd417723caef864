"""The table's results: one row per strategy of each run, the settings every row shares, wall times, and
the files they are written to (results.json, table.md and the two plots)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json, write_text
from ddm.job_names import ensemble_name, expert_id_of, is_training_job
from ddm.sampling.draw import DISTILLED
from ddm.settings import Settings

from .cluster_routed import is_cluster_routed
from .grid import SINGLE, Plan, Run
from .layout import clustering_dir, data_dir
from .plots import plot_sampling_flops, plot_train_flops
from .table import render_table


def rows_of(r: Run, metrics: dict, extra: dict[str, dict], root: Path) -> list[dict]:
    """One table row per strategy of run ``r``, from its metrics and its extra rows' (``evaluate_run``)."""
    name, space = next((n, s) for n, s in metrics["feature_spaces"].items() if n.startswith("classifier:"))
    fl = metrics["flops"]
    jobs = fl["train"]["jobs"]
    router = jobs.get("router", {}).get("flops") or 0
    experts = sum(j["flops"] for k, j in jobs.items() if expert_id_of(k) is not None)
    common = dict(
        config=r.config.name,
        k=r.config.k,
        partition=r.config.partition,
        budget=r.budget,
        expert_steps=r.expert_steps,
        expert_batch=r.expert_batch,
        router_steps=r.router_steps,
        train_flops=experts + router,
        train_flops_experts=experts,
        train_flops_router=router,
        router_share=router / (experts + router) if experts + router else None,
        feature_space=name,
        run_dir=os.path.relpath(r.folder, root),
    )
    if r.config.targets:  # a mixed-kind DDM: each expert's target
        common["expert_targets"] = list(r.config.targets)
    rows = []
    for s in r.rows:
        own = {}
        if s == DISTILLED:
            # its training FLOPs: the experts', then the student's and its teachers' forwards (no router)
            q, fm, sampling = space["strategies"][s], metrics["fm_loss"]["models"][s], fl["sampling"][s]
            d = fl["train"][s]
            own = dict(train_flops=d["total"], train_flops_router=0, router_share=None)
            own.update(train_flops_distill=None if d["total"] is None else d["student"] + d["teacher_forward"])
        elif s in extra:
            q, fm, sampling = extra[s]["quality"], extra[s]["fm_loss"], extra[s]["sampling"]
            if is_cluster_routed(s):  # no router is trained: the experts' FLOPs alone
                own = dict(
                    train_flops=experts, train_flops_router=0, router_share=None, router="clusters", router_steps=0
                )
            if extra[s]["feature_space"] != name:
                raise BadInput(
                    f"{r.folder}: the {s} row was measured in {extra[s]['feature_space']}, the other rows in {name}"
                )
        else:
            key = "top1" if s == SINGLE else s
            q, fm = space["strategies"][key], metrics["fm_loss"]["models"].get(ensemble_name(key), {})
            sampling = fl["sampling"]["single_model" if s == SINGLE else key]
        rows.append(
            dict(
                common,
                **own,
                strategy=s,
                sampling_flops_per_image=sampling["per_image"],
                # threshold, nucleus: the mean over the generated images (experts_from "usage"); else fixed
                experts_per_call=sampling.get("experts_per_call"),
                fd=q["fd"],
                precision=q["precision"],
                recall=q["recall"],
                classifier_accuracy=q.get("classifier_accuracy"),
                num_generated=q["num_generated"],
                fm_loss=fm.get("mean"),
            )
        )
    return rows


def run_wall_s(r: Run, metrics: dict, extra: dict[str, dict]) -> float:
    """Wall time spent on one run: its training jobs' timing files plus its evaluations."""
    rd = RunDir(r.folder)
    train = sum(t["wall_s"] for job, t in rd.all_timings().items() if is_training_job(job))
    evaluations = float(metrics.get("wall_s", 0)) + sum(float(m.get("wall_s", 0)) for m in extra.values())
    return round(train + evaluations, 1)


def prep_wall_s(cfg: Settings, plan: Plan) -> float:
    """Wall time of prepare, embed, and every configuration's cluster and partition stages."""
    folders = [data_dir(cfg)] + sorted({clustering_dir(cfg, c) for c in plan.configs})
    return round(sum(t["wall_s"] for f in folders for t in RunDir(f).all_timings().values()), 1)


def settings_summary(cfg: Settings, plan: Plan, first: dict) -> dict:
    """What every row shares: data, networks, sampler, evaluation sizes, seeds, FLOP accounting, hardware."""
    p, sc, ec = cfg.paper, cfg.sample, cfg.eval  # cfg.paper: a plain mapping
    space = next(v for n, v in first["feature_spaces"].items() if n.startswith("classifier:"))
    extra = ", ".join(f"{b}: +{e}" for b, e in plan.monolith_extra_steps.items())
    flops_note = (
        f"The monolith trains extra steps that cost the router's training FLOPs (budget: extra steps "
        f"{extra}), so at each budget it spends at least as much as every DDM."
        if p["monolith_matches_router"]
        else "The monolith trains exactly the budget's steps: a DDM spends its router's FLOPs on top."
    )
    return dict(
        name=str(cfg.name),
        data=str(cfg.data.source),
        num_train_images=_train_images(cfg),
        model=str(cfg.model.size),
        router=str(cfg.router.size),
        monolith_batch=int(p["monolith_batch"]),
        budgets=sorted(int(b) for b in p["budgets"]),
        router_steps_ratio=float(p["router_steps_ratio"]),
        router_batch=int(cfg.router.batch_size),
        ks=list(p["ks"]),
        random_ks=list(p["random_ks"]),
        clustering=str(p["clustering"]),
        strategies=[str(s) for s in p["strategies"]],
        strategies_at=str(p["strategies_at"]),
        mixed_targets=[str(t) for t in (p.get("mixed_targets") or [])],
        mixed_t_eps=float(p.get("mixed_t_eps", 5e-3)),
        cfg_scales=[float(s) for s in (p.get("cfg_scales") or [])],
        sampler=dict(
            solver=str(sc.solver),
            steps=int(sc.steps),
            cfg_scale=float(sc.cfg_scale),
            cfg_interval=None if sc.cfg_interval is None else [float(v) for v in sc.cfg_interval],
            top_k=int(sc.top_k),
            threshold=float(sc.threshold),
            top_p=float(sc.top_p),
            cfg_routing=str(sc.cfg_routing),
            temperature=float(sc.temperature),
        ),
        num_samples=int(ec.num_samples),
        num_real=space["num_real"],
        fm_loss_images=int(ec.fm_loss.num_samples),
        fm_loss_t=len(ec.fm_loss.t_grid),
        seed=int(cfg.seed),
        eval_seed=int(ec.seed),
        feature_net_accuracy=space.get("test_accuracy"),
        reference_fd=space["reference_training_images"]["fd"],
        flops_note=flops_note,
        expert_forward_flops=plan.expert_forward,
        router_forward_flops={str(k): v for k, v in plan.router_forward.items()},
        monolith_extra_steps={str(b): e for b, e in plan.monolith_extra_steps.items()},
        hardware=hardware_line(plan),
        notes=plan.notes,
    )


def _train_images(cfg: Settings) -> int | None:
    path = RunDir(data_dir(cfg)).data_manifest
    return int(read_json(path)["num_samples"]) if path.exists() else None


def hardware_line(plan: Plan) -> str:
    """The machine, with the torch threads and GPUs the training jobs recorded (not those of this process)."""
    recorded = [
        read_json(RunDir(r.folder).expert_record(k)).get("hardware") or {}
        for r in plan.runs
        for k in range(r.config.k)
        if RunDir(r.folder).expert_record(k).exists()
    ]
    threads = sorted({h.get("cpu_threads") for h in recorded if h.get("cpu_threads")})
    gpus = sorted({h["gpu"] for h in recorded if h.get("gpu")})
    cpu = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, training with {'/'.join(map(str, threads)) or '?'} torch thread(s)"
    )
    return f"{', '.join(gpus)} GPU, {cpu}" if gpus else f"no GPU, {cpu}"


def write_outputs(cfg: Settings, results: dict) -> dict:
    """table.md, results.json and the two plots in the table's folder (rewritten only on a change)."""
    root = Path(cfg.run_dir)
    changed = _write_if_changed(root / "results.json", _json_text(results))
    _write_if_changed(root / "table.md", render_table(results))
    plots = dict(train=root / "train_flops.png", sampling=root / "sampling_flops.png")
    if changed or not all(p.exists() for p in plots.values()):
        plot_train_flops(results["rows"], plots["train"])
        plot_sampling_flops(results["rows"], plots["sampling"], results["settings"]["sampler"])
    return dict(
        table=str(root / "table.md"),
        results=str(root / "results.json"),
        **{f"plot_{k}": str(v) for k, v in plots.items()},
    )


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it; True when written (a rerun leaves mtimes alone)."""
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
