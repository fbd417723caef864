"""Markdown tables and number formats shared by every report ddm writes."""

from __future__ import annotations


def num(x, spec: str = ".4g") -> str:
    """A number in ``spec``, or ``-`` for a missing value."""
    return "-" if x is None else format(x, spec)


def fmt_flops(x) -> str:
    """A FLOP count with a readable unit: 3.32 MFLOPs, 6.37 GFLOPs, 72.9 EFLOPs."""
    if x is None:
        return "-"
    for unit, scale in (
        ("EFLOPs", 1e18),
        ("PFLOPs", 1e15),
        ("TFLOPs", 1e12),
        ("GFLOPs", 1e9),
        ("MFLOPs", 1e6),
        ("kFLOPs", 1e3),
    ):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOPs"


def table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table, followed by a blank line."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]
