"""The table's two plots: each metric against training FLOPs (one line per configuration), and FD and FM loss
against sampling FLOPs per image at the largest budget (colour: configuration, marker: strategy)."""

from __future__ import annotations

from pathlib import Path

from ddm.io import atomic_path
from ddm.markdown import fmt_flops
from ddm.sampling.draw import DISTILLED

from .grid import CLASS_EXPERT, SEPARATE_CFG, SINGLE, ordered_rows
from .table import strategy_label

METRICS = (
    ("fd", "FD, classifier space (lower is better)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("fm_loss", "held-out FM loss (lower is better)"),
)
# The marker of each strategy in the sampling-FLOPs plot.
MARKERS = {
    SINGLE: "*",
    "top1": "o",
    "topk": "s",
    "full": "D",
    "sample": "v",
    "threshold": "^",
    "nucleus": "<",
    SEPARATE_CFG: "X",
    CLASS_EXPERT: "P",
    DISTILLED: "h",
}


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display is needed), imported when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def config_colours(configs: list[str]) -> dict[str, str]:
    """One colour per configuration, the same in both plots: the monolith black, the others matplotlib's cycle."""
    others = [c for c in configs if c != "monolith"]
    return {c: ("black" if c == "monolith" else f"C{others.index(c)}") for c in configs}


def flops_ticks(values, max_ticks: int = 8) -> list[float]:
    """The x ticks of a log FLOPs axis: the points' own values, dropping any too close to the last kept.

    Matplotlib's log ticks label a narrow range (3.1-3.4 GFLOPs) with overlapping minor labels, or not at all.
    "Too close" is an eighth of the range in log space (at least 3%), so labels never overlap.
    """
    values = sorted(set(values))
    if not values:
        return []
    min_ratio = max(1.03, (values[-1] / values[0]) ** (1 / max_ticks))
    ticks: list[float] = []
    for v in values:
        if not ticks or v / ticks[-1] >= min_ratio:
            ticks.append(v)
    return ticks


def _flops_axis(ax, values, label: str) -> None:
    """A log x axis labelled at the plotted FLOP counts, in readable units, with no minor labels."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ticks = flops_ticks(values)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [fmt_flops(v).replace("FLOPs", "") for v in ticks])  # "3.14 G", "12.8 T"
    if len(ticks) == 1:  # a lone point: widen the view so the axis does not collapse
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    ax.set_xlabel(label)


def plot_train_flops(rows: list[dict], path: Path) -> None:
    """Each metric against training FLOPs, one line per configuration (top-1 rows; the monolith's single model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    colours = config_colours(configs)
    for ax, (key, label) in zip(axes, METRICS):
        for c in configs:
            pts = sorted(
                (r["train_flops"], r[key])
                for r in rows
                if r["config"] == c and r["strategy"] in (SINGLE, "top1") and r[key] is not None
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="o",
                    label=c,
                    color=colours[c],
                    lw=2 if c == "monolith" else 1.5,
                    ls="--" if c.startswith("random") else "-",
                )
        _flops_axis(ax, [r["train_flops"] for r in rows if r["train_flops"]], "training FLOPs (experts + router)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_sampling_flops(rows: list[dict], path: Path, sampler: dict) -> None:
    """FD and FM loss against sampling FLOPs per image at the largest budget.

    Colour: the configuration; marker: the strategy. ``sampler``: the table's sampler settings (strategy labels).
    """
    plt = _pyplot()
    budget = max(r["budget"] for r in rows)
    rows = [r for r in rows if r["budget"] == budget]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    colours = config_colours(configs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (METRICS[0], METRICS[3])):
        for r in rows:
            if r[key] is not None:
                ax.scatter(
                    r["sampling_flops_per_image"],
                    r[key],
                    color=colours[r["config"]],
                    marker=MARKERS.get(r["strategy"], "o"),
                    s=90 if r["strategy"] == SINGLE else 45,
                )
        _flops_axis(
            ax,
            [r["sampling_flops_per_image"] for r in rows if r["sampling_flops_per_image"]],
            "sampling FLOPs per image",
        )
        ax.set_title(f"{label} at {budget} steps")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[c], marker="o", ls="", label=c) for c in configs]
    present = [r["strategy"] for r in rows]
    strategies = ([SINGLE] if SINGLE in present else []) + ordered_rows(s for s in present if s != SINGLE)
    handles += [
        Line2D([], [], color="grey", marker=MARKERS.get(s, "o"), ls="", label=strategy_label(s, sampler))
        for s in strategies
    ]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Write the figure atomically (a half-written PNG never stands for a plot) and free it."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
