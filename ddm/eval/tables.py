"""``evaluation/report.md`` from the evaluate stage's metrics: markdown tables, one per feature space.

Every table that compares models or strategies has a FLOPs column, so no
comparison is read without its cost.
"""

from __future__ import annotations

# fmt_flops is re-exported: reports of several runs import it from here.
from ddm.markdown import fmt_flops, num, table

__all__ = ["SAMPLING_LABELS", "fmt_flops", "render_report"]

SAMPLING_LABELS = {
    "single_model": "one expert-sized model, no router (monolith of the same size)",
    "distilled": "the distilled student (one model, no router)",
}


def _experts_cell(r: dict) -> str:
    """Experts per call: the fixed count, a measured mean, or a bound; ``cond + uncond`` under separate routing."""
    how = {"usage": " (mean)", "bound": " (at most)"}.get(r.get("experts_from"), "")
    cell = num(r["experts_per_call"], ".3g")
    if r.get("cfg_routing") == "separate":
        cell = f"{cell} + {num(r['uncond_experts_per_call'], '.3g')} (null input routed separately)"
    return cell + how


def _what(space: dict) -> str:
    """The feature space in words."""
    if space.get("kind") == "classifier":
        return (
            f"a classifier trained on the training split ({space['target']} labels, {space['feature_dim']}-d "
            f"features, held-out accuracy {num(space.get('test_accuracy'), '.3f')})"
        )
    if space.get("kind") == "dinov2":
        return (
            f"DINOv2 {space.get('model')} from {space.get('file')} ({space.get('feature_dim')}-d CLS token of "
            f"images resized to {space.get('image_size')} px, as Stein et al. 2023)"
        )
    return f"{space.get('kind')} from {space.get('file')}"


def _heldout_warning(heldout: dict | None) -> list[str]:
    """A plain statement, next to the FD, when the held-out images are a slice of the training images."""
    if not heldout or heldout.get("mode") != "slice":
        return []
    return [
        f"**These held-out images are training images**: {heldout.get('note')}. The FD above measures how close "
        "the samples are to the training set, not the FID papers report; for that, pass the papers' reference "
        "with `eval.reference` (ADM's reference batch .npz, or a folder of the reference images).",
        "",
    ]


def _is_cell(r: dict | None) -> str:
    """``mean ± std`` of an Inception Score record."""
    return "-" if not r else f"{num(r['mean'], '.3f')} ± {num(r['std'], '.3f')}"


def _quality(name: str, space: dict, sampling: dict, heldout: dict | None = None) -> list[str]:
    lines = [
        f"## Sample quality in `{name}`",
        "",
        f"Feature space: {_what(space)}. Compared with "
        f"{space['num_real']} held-out images. FD: Fréchet distance; precision/recall: k-NN manifolds.",
        "",
    ]
    sfid, is_ = bool(space.get("sfid")), bool(space.get("inception_score"))
    notes = ["sFID: FD of ADM's spatial features (mixed_6/conv, 7 channels, 17 x 17) against the held-out images'."]
    scores = [r["inception_score"] for r in space["strategies"].values() if r.get("inception_score")]
    splits = scores[0]["splits"] if scores else 10
    notes = (notes if sfid else []) + ([f"IS: Inception Score, mean ± std over {splits} splits."] if is_ else [])
    lines += [" ".join(notes), ""] if notes else []

    def extra(r: dict) -> list[str]:
        return ([num(r.get("sfid"))] if sfid else []) + ([_is_cell(r.get("inception_score"))] if is_ else [])

    rows = []
    for s, r in space["strategies"].items():
        rows.append(
            [
                s,
                r["num_generated"],
                num(r["fd"]),
                *extra(r),
                num(r["precision"], ".3f"),
                num(r["recall"], ".3f"),
                num(r.get("classifier_accuracy"), ".3f"),
                fmt_flops(sampling.get(s, {}).get("per_image")),
            ]
        )
    ref = space["reference_training_images"]
    rows.append(
        [
            "training images (reference)",
            ref["num_images"],
            num(ref["fd"]),
            *extra(ref),
            num(ref["precision"], ".3f"),
            num(ref["recall"], ".3f"),
            "-",
            "-",
        ]
    )
    header = ["strategy", "images", "FD", *(["sFID"] if sfid else []), *(["IS"] if is_ else [])]
    lines += table(header + ["precision", "recall", "class accuracy", "sampling FLOPs/image"], rows)
    lines += _heldout_warning(heldout)
    lines += _reference_lines(space, sampling)
    per_class = {s: r.get("per_class") or {} for s, r in space["strategies"].items()}
    classes = sorted({c for pc in per_class.values() for c in pc}, key=int)
    if classes:
        lines += [f"Per class, FD in `{name}` (and the class accuracy, where a classifier ran):", ""]
        header = ["class"] + [f"{s} FD ({fmt_flops(sampling.get(s, {}).get('per_image'))}/image)" for s in per_class]
        lines += table(header, [[c] + [_class_cell(per_class[s].get(c, {})) for s in per_class] for c in classes])
    return lines


def _reference_lines(space: dict, sampling: dict) -> list[str]:
    """FID against the published statistics of ``eval.reference``, named by file and sha256, when there are any."""
    ref = space.get("reference")
    if not ref:
        return []
    spatial = any(r.get("sfid_reference") is not None for r in space["strategies"].values())

    def cells(r: dict) -> list[str]:
        return [num(r.get("fd_reference"))] + ([num(r.get("sfid_reference"))] if spatial else [])

    rows = [
        [s, r["num_generated"], *cells(r), fmt_flops(sampling.get(s, {}).get("per_image"))]
        for s, r in space["strategies"].items()
    ]
    train = space["reference_training_images"]
    rows.append(["training images (reference)", train["num_images"], *cells(train), "-"])
    if ref.get("kind") == "images":
        what = (
            f"the statistics of the {num(ref.get('num_images'), 'd')} images "
            f"({'x'.join(str(v) for v in ref.get('image_size') or [])} px, {ref.get('source')}) under "
            f"`{ref['file']}` (content sha256 {ref['sha256'][:12]}, "
            f"{'read from' if ref.get('cached') else 'cached in'} {ref.get('cache_file')})"
        )
    else:
        size = ref.get("image_size")
        count = ref.get("num_images")
        what = (
            f"the reference statistics `{ref['file']}` (sha256 {ref['sha256'][:12]}, "
            f"{ref['dim']}-d, recorded space {ref.get('feature_space') or 'not recorded'}, "
            f"{'of ' + num(count, 'd') + ' images' if count else 'image count not recorded'}, "
            f"{'x'.join(str(v) for v in size) + ' px' if size else 'image size not recorded'})"
        )
    header = ["strategy", "images", "FID vs reference", *(["sFID vs reference"] if spatial else [])]
    return [
        f"FID against {what}:",
        "",
        *table(header + ["sampling FLOPs/image"], rows),
    ]


def _class_cell(row: dict) -> str:
    """One class's FD, and its classifier accuracy when there is one: ``12.3 (0.91)``."""
    acc = row.get("classifier_accuracy")
    return num(row.get("fd")) + ("" if acc is None else f" ({acc:.2f})")


def _formula(r: dict) -> str:
    """A sampling row's formula FLOPs, with the cheapest-priciest range when the experts differ in size."""
    out = fmt_flops(r["per_image"])
    if "per_image_min" in r:
        out += f" ({fmt_flops(r['per_image_min'])}-{fmt_flops(r['per_image_max'])})"
    return out


def _experts_line(run: dict) -> list[str]:
    """One line naming each expert's size and target, when they are not all one kind of velocity DiT."""
    models = run.get("expert_models") or {}
    sizes, targets = {m.get("size") for m in models.values()}, {m.get("target") for m in models.values()}
    if len(sizes) <= 1 and targets <= {"velocity"}:
        return []
    named = ", ".join(f"{k}: {m.get('size')} predicting {m.get('target')}" for k, m in models.items())
    return [f"Experts of different kinds ({named}); every prediction is converted to the velocity.", ""]


def render_report(m: dict) -> str:
    run, h, fl = m["run"], m["heldout"], m["flops"]
    lines = [
        f"# Evaluation of {run['run_dir']}",
        "",
        f"K = {run['num_experts']} experts (clustering {run['clustering_id']}), images "
        f"{'x'.join(str(s) for s in run['image_shape'])}, {run['num_classes']} classes.",
        "",
        f"Held-out set ({h['mode']}): {h['num_images']} images; {h['note']}.",
        "",
        *_experts_line(run),
    ]
    sampling = fl["sampling"]
    for name, space in m["feature_spaces"].items():
        lines += _quality(name, space, sampling, h)

    fm = m["fm_loss"]
    lines += [
        "## Held-out flow-matching loss",
        "",
        f"{fm['num_samples']} held-out images, fixed noise (seed {fm['seed']}); {fm['note']}.",
        "",
    ]
    header = ["model", "forward FLOPs/call", "mean"] + [f"t={t:g}" for t in fm["t_grid"]]
    lines += table(
        header,
        [
            [name, fmt_flops(r["forward_flops_per_call"]), num(r["mean"])] + [num(p["loss"]) for p in r["per_t"]]
            for name, r in fm["models"].items()
        ],
    )

    rt = m["router"]
    lines += ["## Router by t", ""]
    if "skipped" in rt:
        lines += [f"Skipped: {rt['skipped']}.", ""]
    else:
        lines += [
            f"{rt['num_images']} held-out images, clusters from {rt['cluster_labels']}; router forward "
            f"{fmt_flops(rt['forward_flops_per_sample'])}/sample.",
            "",
        ]
        lines += table(
            ["t", "accuracy", "entropy", "confidence", "ECE", "NLL", "prior accuracy"],
            [
                [
                    f"{b['t_lo']:.1f}-{b['t_hi']:.1f}",
                    num(b["accuracy"], ".3f"),
                    num(b["entropy"], ".3f"),
                    num(b["confidence"], ".3f"),
                    num(b["ece"], ".3f"),
                    num(b["nll"], ".3f"),
                    num(b["prior_accuracy"], ".3f"),
                ]
                for b in rt["buckets"]
            ],
        )

    for s, steps in m.get("usage", {}).items():
        lines += [f"## Expert usage per sampling step ({s})", ""]
        k = len(steps[0]["weight"]) if steps else 0
        lines += [
            "Mean routing weight of each expert at each solver evaluation (images each expert ran on, "
            "as a fraction, in brackets).",
            "",
        ]
        lines += table(
            ["step", "t"] + [f"expert {i}" for i in range(k)],
            [
                [r["step"], f"{r['t']:.3f}"] + [f"{w:.2f} ({s:.2f})" for w, s in zip(r["weight"], r["selected"])]
                for r in steps
            ],
        )

    lines += ["## FLOPs", "", f"Counted with {fl['counter']}.", ""]
    train = fl["train"]
    lines += table(
        ["network", "forward FLOPs/sample", "training FLOPs", "samples seen"],
        [
            [
                name,
                fmt_flops(fl["forward_per_sample"].get(name)),
                fmt_flops(j["flops"]) + (" (estimated: 3 x forward x samples)" if j["estimated"] else ""),
                num(j["samples_seen"], "d"),
            ]
            for name, j in train["jobs"].items()
        ]
        + [["total", "-", fmt_flops(train["total"]), "-"]],
    )
    if train.get("router_share") is not None:
        lines += [f"The router is {100 * train['router_share']:.1f}% of training FLOPs.", ""]
    if train.get("distilled"):
        d = train["distilled"]
        lines += [
            f"The distilled model cost {fmt_flops(d['total'])} to train in all: the experts' "
            f"{fmt_flops(d['experts'])}, then the student's {fmt_flops(d['student'])} and its teachers' forwards "
            f"{fmt_flops(d['teacher_forward'])} ({num(d['samples_seen'], 'd')} samples; no router).",
            "",
        ]
    lines += table(
        [
            "strategy",
            "model calls",
            "experts/call",
            "guidance factor",
            "FLOPs/image (formula)",
            "FLOPs/image (measured)",
        ],
        [
            [
                SAMPLING_LABELS.get(s, s),
                r["calls"],
                _experts_cell(r),
                r["cfg_factor"],
                _formula(r),
                fmt_flops(r.get("measured_per_image")),
            ]
            for s, r in sampling.items()
        ],
    )
    if any(r.get("experts_from") in ("usage", "bound") for r in sampling.values()):
        lines += [
            "threshold and nucleus run as many experts as the router's confidence asks for: their experts/call "
            "is the mean over the generated images and solver evaluations (or, without usage records, the "
            "upper bound K). The measured column counts its own few images, whose mean may differ "
            "(`measured_formula_per_image` in metrics.json is the formula at that mean).",
            "",
        ]
    if any("per_image_min" in r for r in sampling.values()):
        lines += [
            "The experts differ in size: the formula counts the mean expert (uniform routing), in brackets the "
            "cheapest and the priciest routing; the measured column is the routing that happened.",
            "",
        ]
    lines += [f"Evaluation took {m['wall_s']:.1f} s.", ""]
    return "\n".join(lines)
