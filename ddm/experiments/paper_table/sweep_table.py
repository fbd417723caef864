"""table.md's guidance-sweep section: FD and class accuracy per scale, and each configuration at its own best
scale beside the table's shared one, each against the monolith at the same choice."""

from __future__ import annotations

from ddm.markdown import fmt_flops, num
from ddm.markdown import table as md_table


def _delta(x, ref) -> str:
    return "" if x is None or ref in (None, 0) else f" ({100 * (x - ref) / ref:+.0f}%)"


def _at(sweep: dict, scale: float) -> dict:
    return next(row for row in sweep["scales"] if row["cfg_scale"] == scale)


def render_sweep(sweeps: list[dict]) -> list[str]:
    """The section's lines (none without a sweep)."""
    if not sweeps:
        return []
    scales = sorted({row["cfg_scale"] for sw in sweeps for row in sw["scales"]})
    shared = sweeps[0]["shared_scale"]
    mono = next((sw for sw in sweeps if sw["config"] == "monolith"), None)
    lines = [
        f"## Guidance sweep at {sweeps[0]['budget']} steps",
        "",
        "Top-1 of each DDM and the monolith's one model, sampled at each guidance scale with the same labels and "
        f"noise (the table's scale is {num(shared, 'g')}; sampling only, no retraining). Each cell: FD, then the "
        "share of images the feature net classifies as the class asked for. At scale 1 (no guidance) each model "
        "call runs the experts once; at the other scales twice (conditional and null input).",
        "",
    ]
    table = []
    for sw in sweeps:
        cells = []
        for s in scales:
            row = next((r for r in sw["scales"] if r["cfg_scale"] == s), None)
            cells.append("-" if row is None else f"{num(row['fd'])}<br>acc {num(row['classifier_accuracy'], '.3f')}")
        table.append([sw["config"]] + cells)
    lines += md_table(["configuration"] + [f"scale {num(s, 'g')}" for s in scales], table)
    lines += [
        "Each configuration at its own best scale (lowest FD) and at the shared one; in brackets the change "
        "against the monolith at its own best scale, and at the shared scale:",
        "",
    ]
    mono_best = _at(mono, mono["best_scale"])["fd"] if mono else None
    mono_shared = _at(mono, shared)["fd"] if mono else None
    table = []
    for sw in sweeps:
        best, at_shared = _at(sw, sw["best_scale"]), _at(sw, shared)
        own = sw["config"] == "monolith"
        table.append(
            [
                sw["config"],
                num(sw["best_scale"], "g"),
                num(best["fd"]) + ("" if own else _delta(best["fd"], mono_best)),
                num(best["classifier_accuracy"], ".3f"),
                fmt_flops(best["sampling_flops_per_image"]),
                num(at_shared["fd"]) + ("" if own else _delta(at_shared["fd"], mono_shared)),
            ]
        )
    header = ["configuration", "best scale", "FD at best", "class acc. at best", "sampling FLOPs/image at best"]
    lines += md_table(header + [f"FD at {num(shared, 'g')}"], table)
    return lines
