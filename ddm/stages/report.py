"""Stage ``report``: ``report.md`` and a montage of real images per cluster, from the run's records.

Reads only records and manifests already written (plus a few images per
partition for the montage); it never trains or samples anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.io import read_json, write_text
from ddm.job_names import EXPERT_STAGE, expert_id_of
from ddm.markdown import num, table
from ddm.sampling.record import SamplesRecord
from ddm.settings import Settings
from ddm.stages import STAGES
from ddm.viz import save_grid

log = logging.getLogger("ddm")

MONTAGE = "montage.png"


def _read(path: Path):
    return read_json(path) if path.exists() else None


def cluster_montage(rd: RunDir, K: int, per_cluster: int = 12) -> Path | None:
    """The first training images of each cluster, one row per cluster: what each expert specialises in."""
    rows = []
    for k in range(K):
        if not rd.partition_manifest(k).exists():
            return None
        images = []
        # the shards on this machine: a run in a bucket pulls each cluster's first shard only for this
        shards = [path for path in shard_paths(rd.partition(k)) if Path(path).exists()]
        if not shards:
            return None
        for s in iter_samples(shards):
            images.append(s["image"])
            if len(images) == per_cluster:
                break
        blank = np.full_like(images[0], 255)
        rows.extend(images + [blank] * (per_cluster - len(images)))
    path = rd.root / MONTAGE
    save_grid(np.stack(rows), per_cluster, path, row_labels=[f"cluster {k}" for k in range(K)])
    return path


def _stage_order(name: str) -> tuple:
    order = list(STAGES)
    # prepare-part-0003, encode-cluster-02: a part of a stage run by many jobs
    base = EXPERT_STAGE if expert_id_of(name) is not None else name.split("-part-")[0].split("-cluster-")[0]
    return (order.index(base) if base in order else len(order), name)


def _class_mix(manifest: dict, names) -> str:
    counts = manifest.get("class_counts") or {}
    total = sum(counts.values()) or 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]

    def label(c) -> str:
        return names[int(c)] if names and 0 <= int(c) < len(names) else str(c)

    return ", ".join(f"{label(c)} {100 * n / total:.0f}%" for c, n in top)


def label_prior_accuracy(rd: RunDir, K: int) -> float | None:
    """Accuracy of guessing the cluster from the class label alone, sum_y max_k n(k, y) / N.

    At t = 1 a class-conditional router sees only noise and the label, so this
    (not the cluster-size prior) is what its accuracy should fall to.
    """
    best: dict[str, int] = {}
    total = 0
    for k in range(K):
        if not rd.partition_manifest(k).exists():
            return None
        counts = load_manifest(rd.partition(k)).get("class_counts") or {}
        for y, n in counts.items():
            best[y] = max(best.get(y, 0), n)
            total += n
    return sum(best.values()) / total if total else None


def _clusters_section(rd: RunDir, clusters: dict, names) -> list[str]:
    K = int(clusters["k"])
    lines = [
        "## Clusters",
        "",
        f"Method `{clusters['method']}`, K = {K}, embeddings `{clusters.get('encoder', '-')}`, "
        f"clustering id `{clusters['clustering_id']}`, inertia {num(clusters.get('inertia'), '.4f')}.",
        "",
    ]
    total = sum(clusters["sizes"])
    rows = []
    for k, n in enumerate(clusters["sizes"]):
        has_partition = rd.partition_manifest(k).exists()
        mix = _class_mix(load_manifest(rd.partition(k)), names) if has_partition else ""
        rows.append([k, n, f"{100 * n / total:.1f}%", mix])
    lines += table(["cluster", "samples", "share", "main classes"], rows)
    if (rd.root / MONTAGE).exists():
        lines += [f"Real training images per cluster: ![montage]({MONTAGE})", ""]
    return lines


def _experts_section(rd: RunDir, K: int) -> list[str]:
    rows = []
    for k in range(K):
        rec = _read(rd.expert_record(k))
        if rec is None:
            rows.append([k, "missing", "", "", "", "", "", "", "", ""])
            continue
        size = rec.get("model_size") or (rec.get("config") or {}).get("model", {}).get("size")
        rows.append(
            [
                k,
                size or "?",
                rec.get("target", "velocity"),  # records written before the field: velocity
                rec["steps"],
                rec["batch_size"],
                rec["samples_seen"],
                num(rec["final_loss"], ".4f"),
                f"{rec['params']:,}",
                f"{rec['train_flops']:.3g}",
                rec["wall_s"],
            ]
        )
    header = [
        "expert",
        "network",
        "target",
        "steps",
        "batch",
        "samples seen",
        "final loss",
        "params",
        "train FLOPs",
        "wall s",
    ]
    return ["## Experts", "", *table(header, rows)]


def _router_section(rd: RunDir, router: dict) -> list[str]:
    label_acc = label_prior_accuracy(rd, int(router["num_experts"]))
    by_label = (
        f"; the class label alone, which is all a conditional router has at t = 1, scores {label_acc:.3f}"
        if label_acc is not None
        else ""
    )
    lines = [
        "## Router",
        "",
        f"{router['steps']} steps, batch {router['batch_size']}, {router['params']:,} parameters, "
        f"final loss {num(router['final_loss'], '.4f')}. Accuracy on {router['eval_samples']} held-out "
        f"samples (weighted to the cluster sizes; the prior alone scores "
        f"{router['accuracy_by_t'][0]['prior_accuracy']:.3f}{by_label}):",
        "",
    ]
    rows = [
        [
            f"{r['t_lo']:.1f}-{r['t_hi']:.1f}",
            f"{r['accuracy']:.3f}",
            f"{r['entropy']:.3f}",
            f"{r['calibration_gap']:.3f}",
        ]
        for r in router["accuracy_by_t"]
    ]
    return lines + table(["t", "accuracy", "entropy (nats)", "calibration gap"], rows)


def _samples_section(made: SamplesRecord) -> list[str]:
    distilled = made.model == "distilled"  # one student, no router: no routing settings, no usage
    given = dict(made.settings, model=made.model)
    # the option of the strategy in use only (top_k of topk, threshold, top_p of nucleus)
    option = {"topk": "top_k", "threshold": "threshold", "nucleus": "top_p"}.get(given.get("strategy"))
    if distilled:
        keys = ("model", "solver", "steps", "cfg_scale", "seed")
    else:
        keys = ("strategy", option, "experts", "solver", "steps", "cfg_scale", "cfg_routing", "seed")
    settings = ", ".join(f"{k}={given[k]}" for k in keys if k in given)
    lines = ["## Samples", "", f"Settings: {settings}.", "", "One row per class: ![samples](samples/grid.png)", ""]
    return lines if distilled else [*lines, "Expert usage against t: ![usage](samples/usage.png)", ""]


def _timings_section(timings: dict) -> list[str]:
    rows = [
        [name, t["wall_s"], t["peak_rss_gib"], t.get("workers_peak_rss_gib", "-")]
        for name, t in sorted(timings.items(), key=lambda kv: _stage_order(kv[0]))
    ]
    lines = [
        "## Wall time and memory per stage",
        "",
        *table(["stage", "wall s", "peak RSS GiB", "loader workers peak GiB"], rows),
    ]
    total = sum(t["wall_s"] for t in timings.values())
    # experts trained side by side (pipeline.parallel, the local launcher) overlap: the run took less than the sum
    return lines + [f"Sum of the stages' wall times: {total:.0f} s (excluding this report; parallel experts overlap)."]


def build_report(rd: RunDir) -> str:
    lines = [f"# Run `{rd.root.name}`", ""]
    data = _read(rd.data_manifest) or {}
    clusters, router = _read(rd.cluster_report), _read(rd.router_record)
    samples = SamplesRecord.read(rd.samples_record) if rd.samples_record.exists() else None
    timings = rd.all_timings()
    if data:
        lines += [
            f"Data: {data.get('num_samples')} samples from `{data.get('source')}` "
            f"({data.get('image_size')}px, {data.get('channels')} channel(s), "
            f"{data.get('num_classes')} classes) in {len(data.get('shards', []))} shards.",
            "",
        ]
    if clusters:
        lines += _clusters_section(rd, clusters, data.get("class_names"))
        lines += _experts_section(rd, int(clusters["k"]))
    if router:
        lines += _router_section(rd, router)
    if samples:
        lines += _samples_section(samples)
    if timings:
        lines += _timings_section(timings)
    return "\n".join(lines) + "\n"


def run(cfg: Settings) -> dict:
    rd = RunDir(cfg.run_dir)
    clusters = _read(rd.cluster_report)
    if clusters:
        cluster_montage(rd, int(clusters["k"]))
    write_text(rd.report, build_report(rd))
    log.info("report: %s", rd.report)
    return dict(report=str(rd.report))
