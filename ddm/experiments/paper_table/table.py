"""table.md: the settings every row shares, top-1 DDMs against the monolith per budget, the routing strategies,
then every row with its training and sampling FLOPs."""

from __future__ import annotations

from ddm.ensemble import DATA_DEPENDENT
from ddm.markdown import fmt_flops, num
from ddm.markdown import table as md_table
from ddm.routing_schedule import is_strategy, parse_strategy
from ddm.sampling.draw import DISTILLED

from .cluster_routed import is_cluster_routed, routed_strategy
from .grid import CLASS_EXPERT, SEPARATE_CFG, SINGLE, ordered_rows
from .sweep_table import render_sweep

STRATEGY_LABELS = {
    SINGLE: "single model",
    "top1": "top-1",
    "full": "full ensemble",
    "sample": "sample one per step",
    SEPARATE_CFG: "top-1, null input routed separately",
    CLASS_EXPERT: "fixed per-class expert",
    DISTILLED: "distilled student",
}


def strategy_label(s: str, sampler: dict) -> str:
    """A strategy's name in the table and the plots' legends, with its option (``sampler``: the table's sampler)."""
    if s == "topk":
        return f"top-{sampler['top_k']}"
    if s == "threshold":
        return f"threshold p >= {num(sampler.get('threshold'), 'g')}"
    if s == "nucleus":
        return f"nucleus top-p {num(sampler.get('top_p'), 'g')}"
    if is_cluster_routed(s):
        return f"{strategy_label(routed_strategy(s), sampler)}, routed by the clusters (no router)"
    if s not in STRATEGY_LABELS and is_strategy(s) and not parse_strategy(s).single:
        schedule = parse_strategy(s)
        names = [strategy_label(p, sampler) for p in schedule.strategies]
        ends = [f"above t = {sw:g}" for sw in schedule.switches[:1]]
        ends += [f"to t = {sw:g}" for sw in schedule.switches[1:]] + ["below"]
        return ", ".join(f"{n} {e}" for n, e in zip(names, ends))
    return STRATEGY_LABELS.get(s, s)


def _guidance_routing(sampler: dict) -> str:
    if sampler.get("cfg_routing", "shared") == "separate":
        return "guidance's null input is routed on its own in every row (sample.cfg_routing=separate)."
    return (
        "guidance's null input goes to the experts of the conditional input (sample.cfg_routing=shared), "
        "except in the row that routes it separately."
    )


def _experts(r: dict) -> str:
    """`` (1.37 experts/call)``: the measured mean of a data-dependent strategy, or nothing."""
    e = r.get("experts_per_call")
    return f" ({e:.2f} experts/call)" if r["strategy"] in DATA_DEPENDENT and e is not None else ""


def _delta(x, ref) -> str:
    """`` (+12%)``: the change of ``x`` against ``ref``, or nothing when there is no reference."""
    if x is None or ref in (None, 0):
        return ""
    return f" ({100 * (x - ref) / ref:+.0f}%)"


def _pivot(rows: list[dict], budgets: list[int], configs: list[str], key: str, show_flops: bool) -> list[str]:
    """Budgets down, configurations across: the top-1 (monolith: single-model) value of ``key`` and its change."""
    by = {(r["config"], r["budget"]): r for r in rows if r["strategy"] in (SINGLE, "top1")}
    table = []
    for b in budgets:
        mono = by.get(("monolith", b), {}).get(key)
        cells = []
        for c in configs:
            r = by.get((c, b))
            if r is None:
                cells.append("-")
                continue
            cell = num(r[key]) + ("" if c == "monolith" else _delta(r[key], mono))
            cells.append(cell + (f"<br>{fmt_flops(r['train_flops'])}" if show_flops else ""))
        table.append([b] + cells)
    return md_table(["budget (steps)"] + configs, table)


def _strategy_cell(r: dict | None) -> str:
    """FD, FM loss and sampling FLOPs of one row, stacked in one cell."""
    if r is None:
        return "-"
    return f"{num(r['fd'])}<br>FM {num(r['fm_loss'])}<br>{fmt_flops(r['sampling_flops_per_image'])}{_experts(r)}"


def _mixed_note(rows: list[dict], settings: dict) -> list[str]:
    """What the mixed-kind DDM is, when the table has one."""
    mixed = next((r for r in rows if r.get("expert_targets")), None)
    if mixed is None:
        return []
    targets = ", ".join(f"expert {k}: {t}" for k, t in enumerate(mixed["expert_targets"]))
    return [
        f"`{mixed['config']}`: the clustered K={mixed['k']} DDM's experts trained again on the same clusters, with "
        f"the same seeds, network, batch and steps, but each regressing its own target ({targets}); eps and x0 "
        f"experts train on t in [{num(settings.get('mixed_t_eps'), 'g')}, 1 - that]. Their predictions are "
        f"converted to velocity, and the clustered K={mixed['k']} run's router and the same sampler serve them.",
        "",
    ]


def render_table(results: dict) -> str:
    """table.md: settings, the comparison at equal FLOPs per budget, strategies, then every row."""
    s, rows = results["settings"], results["rows"]
    budgets = sorted({r["budget"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    space = rows[0]["feature_space"] if rows else "-"
    sampler = s["sampler"]
    lines = [
        f"# Paper table: {s['name']}",
        "",
        f"Data: `{s['data']}` ({s['num_train_images']} training images); experts `{s['model']}`, router "
        f"`{s['router']}`; monolith batch {s['monolith_batch']}, each of K experts at batch "
        f"{s['monolith_batch']} / K for the same steps.",
        "",
        f"Sampler, the same for every row: {sampler['solver']}, {sampler['steps']} steps, guidance scale "
        f"{sampler['cfg_scale']}, {s['num_samples']} generated images per row against {s['num_real']} "
        f"held-out images, seed {s['seed']}.",
        "",
        f"Routing options: top-k k = {sampler.get('top_k')}, threshold {sampler.get('threshold')}, nucleus "
        f"top-p {sampler.get('top_p')}; {_guidance_routing(sampler)} Threshold and nucleus run as many experts "
        "as the router's confidence asks for: their sampling FLOPs are at the mean experts per model call of "
        "their generated images (stated in their cells).",
        "",
        f"FD, precision and recall are measured in `{space}`: the penultimate features of a small classifier "
        f"trained on the training split (held-out accuracy {num(s.get('feature_net_accuracy'), '.3f')}); "
        f"not Inception FID. Training images score FD {num(s.get('reference_fd'))} against the same held-out "
        f"images (the floor at this sample size). FM loss: held-out flow-matching loss "
        f"({s['fm_loss_images']} images x {s['fm_loss_t']} values of t).",
        "",
        f"Training FLOPs = 3 x forward x samples seen, experts plus router. {s['flops_note']}",
        "",
    ]
    if any(r["strategy"] == DISTILLED for r in rows):
        lines += [
            "A distilled student's training FLOPs are its experts' training, then its own (3 x forward x samples) "
            "and its teachers' forwards (one expert forward per sample); it needs no router.",
            "",
        ]
    lines += _mixed_note(rows, s)

    lines += [
        "## Top-1 DDM against the monolith",
        "",
        "FD (lower is better) and its change against the monolith of the same budget; each run's training "
        "FLOPs below it.",
        "",
    ]
    lines += _pivot(rows, budgets, configs, "fd", show_flops=True)
    lines += ["Held-out flow-matching loss (lower is better) of the same models:", ""]
    lines += _pivot(rows, budgets, configs, "fm_loss", show_flops=False)

    by = {(r["config"], r["budget"], r["strategy"]): r for r in rows}
    full = sorted({r["budget"] for r in rows if r["strategy"] not in (SINGLE, "top1")})
    for b in full:
        present = [r["strategy"] for r in rows if r["budget"] == b and r["strategy"] != SINGLE]
        strategies = ordered_rows(present)  # one fixed column order
        lines += [
            f"## Routing strategies at {b} steps",
            "",
            "FD, held-out FM loss, then sampling FLOPs per image. The monolith: "
            + ", ".join(
                f"FD {num(r['fd'])}, FM loss {num(r['fm_loss'])} at {fmt_flops(r['sampling_flops_per_image'])}/image"
                for r in rows
                if r["budget"] == b and r["strategy"] == SINGLE
            )
            + ".",
            "",
        ]
        table = []
        for c in configs:
            if c == "monolith":
                continue
            table.append([c] + [_strategy_cell(by.get((c, b, st))) for st in strategies])
        lines += md_table(["configuration"] + [strategy_label(st, sampler) for st in strategies], table)

    lines += render_sweep(results.get("cfg_sweep") or [])
    lines += ["## Every row", ""]
    header = [
        "configuration",
        "K",
        "partition",
        "budget (steps)",
        "expert steps x batch",
        "router steps",
        "strategy",
        "training FLOPs (router share)",
        "sampling FLOPs/image",
        "FD",
        "precision",
        "recall",
        "class acc.",
        "FM loss",
    ]
    table = [
        [
            r["config"],
            r["k"],
            r["partition"],
            r["budget"],
            f"{r['expert_steps']} x {r['expert_batch']}",
            r["router_steps"] or "-",
            strategy_label(r["strategy"], sampler),
            f"{fmt_flops(r['train_flops'])} ({num(100 * r['router_share'] if r['router_share'] else 0, '.1f')}%)",
            fmt_flops(r["sampling_flops_per_image"]) + _experts(r),
            num(r["fd"]),
            num(r["precision"], ".3f"),
            num(r["recall"], ".3f"),
            num(r["classifier_accuracy"], ".3f"),
            num(r["fm_loss"]),
        ]
        for r in rows
    ]
    lines += md_table(header, table)
    lines += [
        f"Notes: {' '.join(s['notes'])}" if s["notes"] else "",
        "",
        "![training FLOPs](train_flops.png)",
        "",
        "![sampling FLOPs](sampling_flops.png)",
        "",
        f"Hardware: {s['hardware']}. Wall time of the work in the table: {results['wall_s_work']:.0f} s "
        f"(data preparation and clustering {results.get('wall_s_prep', 0):.0f} s, then training and evaluation "
        f"summed over runs; timings.json has the last invocation's).",
        "",
    ]
    return "\n".join(lines)
