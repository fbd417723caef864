"""Pictures of a run: image grids (samples, real images per cluster) and expert-usage plots.

Everything renders off-screen (PIL, matplotlib's Agg canvas) and is written
atomically, so it works on headless cluster nodes and never leaves half a file.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddm.errors import BadInput
from ddm.io import atomic_path

# Small images (28 px) are upscaled to at least this many pixels per cell.
MIN_CELL_PX = 64


def mosaic(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, H, W] or [N, H, W, C] into rows of ``nrow``; empty cells are padding."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise BadInput(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w = images.shape[:3]
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, *images.shape[3:]), pad_value, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return out


def save_grid(
    images: np.ndarray,
    nrow: int,
    path: str | os.PathLike,
    row_labels: Sequence[str] | None = None,
    scale: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """Write a PNG grid of uint8 images (``nrow`` per row), upscaled with nearest neighbours.

    Args:
        images: uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, C]`` (C = 3 or 4).
        nrow: images per row.
        path: the PNG to write (atomically).
        row_labels: optional text drawn left of each row (e.g. class names, cluster ids).
        scale: integer upscaling factor; default: enough for cells of at least 64 px.
    Returns the written picture as an array.
    """
    images = np.asarray(images)
    h = images.shape[1] if images.ndim >= 3 else 1
    scale = scale or max(1, math.ceil(MIN_CELL_PX / h))
    grid = mosaic(images, nrow, pad=pad)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: pixels stay crisp
    picture = Image.fromarray(grid)
    if row_labels:
        picture = _with_row_labels(picture, list(row_labels), cell=(h + pad) * scale, top=pad * scale)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return np.asarray(picture)


def _with_row_labels(picture: Image.Image, labels: list[str], cell: int, top: int) -> Image.Image:
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(picture)
    margin = int(max(draw.textlength(str(s), font=font) for s in labels)) + 12
    white = 255 if picture.mode == "L" else (255,) * len(picture.getbands())
    canvas = Image.new(picture.mode, (picture.width + margin, picture.height), white)
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    black = 0 if picture.mode == "L" else (0,) * len(picture.getbands())
    for r, label in enumerate(labels):
        draw.text((6, top + r * cell + cell // 2), str(label), fill=black, font=font, anchor="lm")
    return canvas


def usage_by_t(usage: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge usage records that share a t: ``(t [T] descending, counts [T, K], mean weight [T, K])``.

    Heun evaluates the model twice at interior grid times; both visits are merged.
    """
    counts, weights, n = defaultdict(lambda: 0), defaultdict(lambda: 0), defaultdict(int)
    for rec in usage:
        t = round(float(rec["t"]), 6)
        counts[t] = counts[t] + np.asarray(rec["counts"], float)
        weights[t] = weights[t] + np.asarray(rec.get("weights", rec["counts"]), float)
        n[t] += 1
    ts = sorted(counts, reverse=True)
    return (np.array(ts), np.stack([counts[t] for t in ts]), np.stack([weights[t] / n[t] for t in ts]))


def plot_usage(usage: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Stacked area of each expert's share of the routing weight against t (noise on the left)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not usage:
        raise BadInput("no usage records to plot: sample with an Ensemble first")
    ts, _, weights = usage_by_t(usage)
    share = weights / np.clip(weights.sum(axis=1, keepdims=True), 1e-12, None)
    fig = Figure(figsize=(6, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stackplot(ts, share.T, labels=[f"expert {k}" for k in range(share.shape[1])])
    ax.set_xlim(1, 0)  # sampling runs from noise (t=1) to data (t=0)
    ax.set_ylim(0, 1)
    ax.set_xlabel("t (1 = noise, 0 = data)")
    ax.set_ylabel("share of routing weight")
    ax.set_title(title or "expert usage during sampling")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_accuracy_by_t(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> np.ndarray:
    """The router's accuracy in each bucket of t (rows of ``router_diagnostics``) against t, beside the prior's.

    Writes the PNG (atomically) and returns the picture, uint8 [H, W, 3].
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise BadInput("no accuracy rows to plot: the router diagnostics need at least one t bucket")
    mid = [(r["t_lo"] + r["t_hi"]) / 2 for r in rows]
    fig = Figure(figsize=(5, 3.2), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(mid, [r["accuracy"] for r in rows], "o-", label="router")
    ax.plot(mid, [r["prior_accuracy"] for r in rows], "--", color="grey", label="prior (always the largest cluster)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("held-out top-1 accuracy")
    ax.set_title(title or "router accuracy by t")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    with atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return picture
