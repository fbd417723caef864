"""Stage ``extend``: grow a finished run by new images without retraining the experts they do not concern.

The new images are a prepared shard set (``ddm prepare`` with any data source,
into another run: ``extend.shards=<that run>/data``). In order, each step
skipping what an earlier, interrupted ``extend`` already did:

1. data/: the new shards are checked and appended (``ddm.grow.append``);
2. embeddings/: the new shards alone are embedded, with the encoder the run
   recorded (whatever ``embed=`` says now);
3. clusters/: the new samples become cluster K (``extend.mode=new_cluster``) or
   go to their nearest cluster (``assign``); the clustering gets a new id whose
   ``parent`` is the old one (``ddm.grow.clusters``, ``ddm.lineage``);
4. partitions/: only the clusters that received samples are written (again);
5. what the growth made stale moves to ``history/<old clustering id>/``: the
   router, a distilled student, and the experts of clusters that received
   samples. The other experts are not touched: their ``expert.pt`` stays byte
   for byte, and stays valid under the new clustering;
6. (latent runs) ``ddm encode`` encodes the partitions that changed;
7. with ``extend.train=true``, the new or changed experts train here (an
   expert whose cluster received samples fine-tunes from its own weights,
   ``expert.init=auto``), then the router with K outputs. With ``false`` the
   commands that do it are printed (``ddm submit`` starts them on SLURM).

Writes an ``extensions`` entry in data/manifest.json and clusters/report.json;
returns the latter's, with the router's held-out accuracy before and after.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments, save_assignments
from ddm.cluster.shard_split import write_partitions
from ddm.data.ingest import resolve_workers
from ddm.data.shards import load_manifest
from ddm.errors import BadInput, MissingInput
from ddm.grow.append import append_shards, appended, check_new_images, load_new, new_shards_manifest
from ddm.grow.clusters import check_mode, grown_centroids, grown_report, new_labels
from ddm.io import atomic_path, load_npy, read_json, write_json
from ddm.job_names import expert_job
from ddm.latent.run_latents import vae_spec
from ddm.launch.lock import check_free
from ddm.lineage import cluster_ids
from ddm.settings import Settings, changed
from ddm.stages import StageResult
from ddm.stages.runner import run_stage, stage_module

log = logging.getLogger("ddm")

CENTROID_FILES = ("centroids", "fine_centroids", "fine_to_coarse")


def run(cfg: Settings) -> dict:
    """Grow the run by ``extend.shards``; return the clustering report's new extension entry (see the docstring)."""
    rd = RunDir(cfg.run_dir)
    ex = cfg.extend
    if not ex.shards:
        raise BadInput(
            "extend.shards is not set: give the data/ folder of the new images, prepared with "
            "`ddm prepare name=<new> data=... ` (any source; data.classes keeps some classes)"
        )
    if not rd.cluster_report.exists() or not rd.partitions_index.exists():
        raise MissingInput(
            f"{rd.root} has no finished clustering and partitions (clusters/report.json, partitions/manifest.json): "
            f"a run grows once it exists; run `ddm pipeline` (or prepare ... partition) first"
        )
    report = read_json(rd.cluster_report)
    mode = check_mode(str(ex.mode), report["method"])
    new_dir = Path(str(ex.shards)).expanduser().resolve()
    new = load_new(new_dir)
    data = load_manifest(rd.data)

    entry = appended(data, new)
    if entry is None:
        run_keys = load_assignments(rd.assignments).keys.tolist()
        check_new_images(new, data, new_dir, run_keys)
        # the encoder the new images must be embedded with, kept where a resumed extend finds it
        encoder = read_json(rd.embeddings_manifest)["encoder_config"]
        data = append_shards(rd.data, data, new_dir, new, run_keys, encoder_config=encoder)
        entry = appended(data, new)
        log.info("extend: %d new images appended to %s (%s)", new["num_samples"], rd.data, ", ".join(entry["shards"]))
    _embed_new(cfg, rd, data, entry)
    fresh = report["keys_sha256"] != data["keys_sha256"]
    if fresh:
        report = _grow_clustering(rd, report, data, entry, mode, str(new_dir))
    grown = report["extensions"][-1]
    added_already = not fresh and read_json(rd.partitions_index).get("clustering_id") == report["clustering_id"]
    if added_already:
        log.info("extend: %s was added already (clustering %s)", new_dir, report["clustering_id"])
    _write_partitions(cfg, rd, report, data, entry, grown)
    before = _retire(rd, report, grown)
    if vae_spec(cfg) is not None:
        run_stage("encode", cfg)
    after = _train(cfg, rd, grown) if bool(ex.train) else _print_next(rd, grown)
    result = dict(grown, router_accuracy_before=before, router_accuracy_after=after, k=int(report["k"]))
    _log_result(result)
    return StageResult(result, skipped=added_already)


def _embed_new(cfg: Settings, rd: RunDir, data: dict, entry: dict) -> None:
    """Embed the appended shards with the encoder the run's embeddings were made with (the extension records it)."""
    if rd.embeddings_manifest.exists() and read_json(rd.embeddings_manifest)["keys_sha256"] == data["keys_sha256"]:
        return
    recorded = entry.get("encoder_config")
    if recorded is None:
        raise MissingInput(f"{rd.data}/manifest.json does not say which encoder embeds the new images: embed again")
    own = changed(cfg, {"embed": recorded, "redo": False})
    rd.embeddings_manifest.unlink(missing_ok=True)  # the stage writes it again, for every key
    stage_module("embed").run(own)  # within extend's own run: not seeded or timed as a stage of its own


def _new_embeddings(rd: RunDir, entry: dict) -> np.ndarray:
    """The embeddings of one extension's shards, in stored order."""
    manifest = read_json(rd.embeddings_manifest)
    names = set(entry["shards"])
    rows = [load_npy(rd.embeddings / s["embeddings"]) for s in manifest["shards"] if s["data_shard"] in names]
    return np.concatenate(rows).astype(np.float32)


def _grow_clustering(rd: RunDir, report: dict, data: dict, entry: dict, mode: str, source: str) -> dict:
    """Step 3: labels for the new samples, the grown centroids and assignments, the new report (written last)."""
    old = load_assignments(rd.assignments, num_clusters=int(report["k"]))
    if old.clustering_id != report["clustering_id"]:
        raise BadInput(f"{rd.assignments} does not match {rd.cluster_report}: rerun `ddm cluster redo=true`")
    emb = _new_embeddings(rd, entry)
    folder = rd.clusters
    centroids = {n: load_npy(folder / f"{n}.npy") if (folder / f"{n}.npy").exists() else None for n in CENTROID_FILES}
    spherical = bool(report.get("spherical"))
    labels = new_labels(mode, int(report["k"]), emb, centroids, spherical)
    keys = [*old.keys.tolist(), *_keys_of(rd, entry)]
    cluster = np.concatenate([old.cluster, labels]).astype(np.int32)
    if len(keys) != len(cluster):
        raise BadInput(f"{len(keys)} keys but {len(cluster)} labels after growth: embed the new shards again")
    grown = grown_report(report, keys, cluster, dict(mode=mode, source=source, **_about(entry)), data["keys_sha256"])

    rd.cluster_report.unlink()  # until the new report is written, clusters/ is not complete
    if mode == "new_cluster":
        for name, array in grown_centroids(centroids, emb, int(report["k"]), spherical).items():
            if array is not None:
                with atomic_path(folder / f"{name}.npy") as tmp:
                    np.save(tmp, array)
    save_assignments(rd.assignments, keys, cluster)
    write_json(rd.cluster_report, grown)
    log.info(
        "extend: clustering %s -> %s (K=%d -> %d); clusters that received images: %s",
        report["clustering_id"],
        grown["clustering_id"],
        report["k"],
        grown["k"],
        grown["extensions"][-1]["clusters"],
    )
    return grown


def _about(entry: dict) -> dict:
    return dict(num_samples=entry["num_samples"], keys_sha256=entry["keys_sha256"], classes=entry.get("classes"))


def _keys_of(rd: RunDir, entry: dict) -> list[str]:
    """The new samples' keys in stored order, from the embedding stage's keys files of their shards."""
    manifest = read_json(rd.embeddings_manifest)
    names = set(entry["shards"])
    return [
        key
        for s in manifest["shards"]
        if s["data_shard"] in names
        for key in (rd.embeddings / s["keys"]).read_text().splitlines()
    ]


def _write_partitions(cfg: Settings, rd: RunDir, report: dict, data: dict, entry: dict, grown: dict) -> None:
    """Step 4: write the partitions of the clusters that received samples; keep the others; the index last."""
    index = read_json(rd.partitions_index)
    if index.get("clustering_id") == report["clustering_id"]:
        return
    K, touched, cid = int(report["k"]), list(grown["clusters"]), report["clustering_id"]
    rd.partitions_index.unlink()
    for k in touched:
        if rd.partition(k).exists():
            shutil.rmtree(rd.partition(k))
    a = load_assignments(rd.assignments, num_clusters=K)
    folders = [rd.partition(k) for k in range(K)]
    common = dict(
        min_shards=int(cfg.cluster.min_shards_per_partition),
        target_size=int(cfg.cluster.partition_shard_size),
        seed=int(cfg.seed),
        only=touched,
        extra=_previous_experts(rd, grown, int(index["num_clusters"])),
        workers=resolve_workers(cfg.data.workers),
    )
    if all(k >= int(index["num_clusters"]) for k in touched):  # new clusters only: read the new shards alone
        n = int(entry["num_samples"])
        write_partitions(rd.data, new_shards_manifest(data, entry), a.keys[-n:], a.cluster[-n:], folders, cid, **common)
    else:
        write_partitions(rd.data, data, a.keys, a.cluster, folders, cid, **common)
    manifests = [load_manifest(rd.partition(k)) for k in range(K)]
    write_json(
        rd.partitions_index,
        dict(
            index,
            clustering_id=cid,
            num_clusters=K,
            sizes=[m["num_samples"] for m in manifests],
            num_shards=[len(m["shards"]) for m in manifests],
            clusters=[f.name for f in folders],
            cluster_ids=cluster_ids(dict(report, num_clusters=K)),
            lineage=report.get("lineage") or {},
            parent=report.get("parent"),
        ),
    )
    log.info("extend: partitions %s written under clustering %s, the others kept", touched, cid)


def _previous_experts(rd: RunDir, grown: dict, old_k: int) -> dict[int, dict]:
    """Per kept cluster that received samples: the partition field naming its expert of the parent clustering.

    The expert is moved to history/<parent>/ by step 5; its training (``expert.init=auto``) starts from it.
    """
    history = rd.root / "history" / grown["parent"]
    out = {}
    for k in (k for k in grown["clusters"] if k < old_k):
        for record in (rd.expert_record(k), history / expert_job(k) / "record.json"):
            made = read_json(record) if record.exists() else {}
            if made.get("weights_sha256") and made.get("clustering_id") != grown["clustering_id"]:
                weights = (history / expert_job(k) / "expert.pt").relative_to(rd.root)
                out[k] = dict(
                    previous_expert=dict(
                        path=str(weights), sha256=made["weights_sha256"], clustering_id=made["clustering_id"]
                    )
                )
                break
    return out


def _retire(rd: RunDir, report: dict, grown: dict) -> float | None:
    """Step 5: move what the growth made stale under history/<parent>/; return the old router's mean accuracy."""
    history = rd.root / "history" / grown["parent"]
    stale = [(rd.router, history / "router"), (rd.distilled, history / "distilled")]
    stale += [(rd.expert(k), history / expert_job(k)) for k in grown["clusters"]]
    for folder, to in stale:
        record = folder / "record.json"
        if not folder.exists() or (
            record.exists() and read_json(record).get("clustering_id") == report["clustering_id"]
        ):
            continue
        check_free(folder, "extend")  # never move the folder of a job that still runs
        to.parent.mkdir(parents=True, exist_ok=True)
        if to.exists():
            shutil.rmtree(to)
        folder.rename(to)
        log.info("extend: %s belongs to clustering %s: moved to %s", folder.name, grown["parent"], to)
    return mean_accuracy(history / "router" / "record.json")


def mean_accuracy(record_path: Path) -> float | None:
    """The router's held-out accuracy averaged over its t buckets (None when there is no record)."""
    if not record_path.exists():
        return None
    by_t = read_json(record_path).get("accuracy_by_t") or []
    return float(np.mean([r["accuracy"] for r in by_t])) if by_t else None


def _train(cfg: Settings, rd: RunDir, grown: dict) -> float | None:
    """Step 7: train the new and changed experts (each from its own weights where it had some), then the router."""
    steps = cfg.extend.finetune_steps
    for k in grown["clusters"]:
        job = {"expert.id": k, "redo": False}
        if steps is not None and (rd.partition_manifest(k).exists() and _has_previous(rd, k)):
            job["expert.steps"] = int(steps)
        run_stage("train-expert", changed(cfg, job))
    run_stage("train-router", changed(cfg, {"redo": False}))
    return mean_accuracy(rd.router_record)


def _has_previous(rd: RunDir, k: int) -> bool:
    return bool(read_json(rd.partition_manifest(k)).get("previous_expert"))


def _print_next(rd: RunDir, grown: dict) -> None:
    ids = ",".join(str(k) for k in grown["clusters"])
    log.info(
        "extend: train what changed, here or on the islands: `ddm submit run_dir=%s submit.experts=[%s]` "
        "(or `ddm train-expert expert.id=N` for N in %s, then `ddm train-router`)",
        rd.root,
        ids,
        ids,
    )


def _log_result(result: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    log.info(
        "extend: K=%d; router held-out accuracy %s before, %s after",
        result["k"],
        pct(result["router_accuracy_before"]),
        pct(result["router_accuracy_after"]),
    )
