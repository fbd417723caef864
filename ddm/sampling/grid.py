"""What a sample grid shows: which classes (or prompts) its rows hold, and the labels of every sample drawn.

Plain PyTorch: the sample stage draws its grid and its evaluation samples with these, and so can a notebook.
A 1000-class run shows ``sample.grid_rows`` evenly spaced classes, not all of them: 10,000 grid images
before the first evaluation sample would cost more than the evaluation.
"""

from __future__ import annotations

import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json


def check_grid_rows(value) -> int | None:
    """``sample.grid_rows`` as an int >= 1, or None (no cap); a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"sample.grid_rows={value!r}: use a whole number >= 1 (the grid's rows) or null (every class)")
    return value


def grid_classes(num_classes: int, grid_rows: int | None) -> list[int]:
    """The classes (or prompts) of the grid's rows: every one when there are at most ``grid_rows``, else
    ``grid_rows`` evenly spaced over the range, from class 0.

    Evenly spaced, not the first ones: neighbouring ids are often alike (ImageNet's first 16 classes are fish
    and birds), while spacing them shows the whole range of classes and so the work of every expert.
    """
    rows = num_classes if grid_rows is None else min(num_classes, grid_rows)
    return [i * num_classes // rows for i in range(rows)]  # distinct and increasing since rows <= num_classes


LABEL_ORDERS = ("random", "cycle")  # the values of sample.label_order


def plan_labels(
    num_classes: int,
    per_class: int,
    num_samples: int,
    generator,
    grid_rows: int | None = None,
    order: str = "random",
) -> tuple[torch.Tensor | None, int]:
    """Labels of every sample to draw (grid first) and the grid size; None when unconditional.

    The grid has ``per_class`` samples of each of ``grid_classes(num_classes, grid_rows)``; an unconditional
    grid is ``per_class`` wide and ``per_class`` rows high, at most ``grid_rows``. The extra samples' labels
    are drawn from every class (``order="random"``), or are ``0, 1, ..., num_classes - 1, 0, ...`` in turn
    (``"cycle"``: as many of each class, or each prompt of a list once, in its order).
    """
    if order not in LABEL_ORDERS:
        raise BadInput(f"sample.label_order={order!r} is not one of {', '.join(LABEL_ORDERS)}")
    if num_classes == 0:
        rows = per_class if grid_rows is None else min(per_class, grid_rows)
        return None, rows * per_class
    grid = torch.tensor(grid_classes(num_classes, grid_rows), dtype=torch.long).repeat_interleave(per_class)
    if order == "cycle":
        extra = torch.arange(num_samples, dtype=torch.long) % num_classes
    else:
        extra = torch.randint(num_classes, (num_samples,), generator=generator)
    return torch.cat([grid, extra]), len(grid)


def class_names(rd: RunDir, num_classes: int) -> list[str]:
    """Names from the data manifest's ``class_names`` when present, else the class indices."""
    names = read_json(rd.data_manifest).get("class_names") if rd.data_manifest.exists() else None
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]
