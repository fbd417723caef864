"""Stage ``cluster``: partition the dataset by meaning (or at random, as a baseline).

Reads embeddings/ (flat, two_stage) or only data/ shard keys (random); writes
clusters/: centroids.npy (flat, two_stage), fine_centroids.npy and
fine_to_coarse.npy (two_stage), assignments.npz (keys, cluster in dataset
order) and, last, report.json with sizes, inertia, the ``clustering_id`` and
the ``embeddings_id`` of the embeddings it was computed from (the partition
stage refuses a clustering of other embeddings than the run's).

Embeddings are read only once shown to be whole (each file's sha256, shapes,
keys) and to belong to the run's data (its keys and shard checksums). They stay
on disk, memory-mapped shard by shard (``ddm.cluster.rows``): k-means learns on
``cluster.train_sample`` rows drawn with the seed (null: all of them, in
float32), then assigns every row a block at a time, so a 10M x 1024 float16 set
needs the sample and one block in memory, not 40 GB of float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ddm.artifacts import RunDir
from ddm.cluster import clustering_id, save_assignments
from ddm.cluster.kmeans import (
    MAX_POINTS_PER_CENTROID,
    Clustering,
    check_k,
    effective_fine_k,
    faiss_gpus,
    flat_kmeans,
    random_partition,
    two_stage_kmeans,
)
from ddm.cluster.rows import Rows
from ddm.data.shards import iter_shard, load_manifest, shard_paths
from ddm.embed import check_embeddings_of_data, embeddings_id
from ddm.errors import BadInput, MissingInput
from ddm.io import atomic_path, load_npy, read_json, sha256_file, sha256_strings, write_json
from ddm.markdown import num
from ddm.settings import Cluster, Settings
from ddm.stages import StageResult
from ddm.stages.runner import check_made_with, done_already

log = logging.getLogger("ddm")

METHODS = ("two_stage", "flat", "random")
# Files a method may have written; a redo with another method removes the others' leftovers.
OUTPUTS = ("centroids.npy", "fine_centroids.npy", "fine_to_coarse.npy", "assignments.npz")


def run(cfg: Settings) -> dict:
    """Cluster the run's dataset into ``cluster.k`` parts; return the report (also clusters/report.json)."""
    run_dir = RunDir(cfg.run_dir)
    c = cfg.cluster
    if done_already(run_dir.cluster_report, cfg):
        report = read_json(run_dir.cluster_report)
        check_made_with("cluster", run_dir.clusters, _recorded_settings(report), made_with(c))
        log.info(
            "cluster: done already (%s K=%d id=%s); redo=true recomputes -> %s",
            report["method"],
            report["k"],
            report["clustering_id"],
            run_dir.clusters,
        )
        return StageResult(report, skipped=True)
    if c.method not in METHODS:
        raise BadInput(f"cluster.method={c.method!r} is not one of {list(METHODS)}")
    _set_threads(cfg.island.threads)

    data_manifest = load_manifest(run_dir.data)
    encoder, source = None, None
    if c.method == "random":
        keys = read_data_keys(run_dir.data, data_manifest)
        result = random_partition(len(keys), int(c.k), seed=int(c.seed))
    else:
        rows, keys, emb_manifest = load_embeddings(run_dir.embeddings, data_manifest)
        encoder, source = emb_manifest.get("encoder"), embeddings_id(emb_manifest)
        result = _kmeans(rows, c)
        del rows

    report = _write_outputs(run_dir, c, keys, result, encoder, source)
    log.info(
        "cluster: %s K=%d sizes=%s inertia=%s id=%s -> %s",
        report["method"],
        report["k"],
        report["sizes"],
        num(report["inertia"]),
        report["clustering_id"],
        run_dir.clusters,
    )
    return report


def load_embeddings(folder: Path, data_manifest: dict) -> tuple[Rows, list[str], dict]:
    """(the [N, D] embeddings as memory-mapped shards, keys, manifest) of embeddings/, checked against the data
    manifest. ``rows[a:b]`` reads a block in float32 (``Rows``); ``rows[0:len(rows)]`` the whole matrix."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise MissingInput(
            f"no embeddings manifest at {path}: run the embed stage first "
            f"(or use cluster=random, which needs no embeddings)"
        )
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not {"num_samples", "dim", "shards"} <= manifest.keys():
        raise BadInput(
            f"{path} is not an embeddings manifest (no num_samples, dim or shards): rerun embed with redo=true"
        )
    check_embeddings_of_data(manifest, data_manifest, path)
    blocks: list[np.ndarray] = []
    keys: list[str] = []
    row, dim = 0, manifest["dim"]
    for shard in manifest["shards"]:
        emb_path, keys_path = Path(folder) / shard["embeddings"], Path(folder) / shard["keys"]
        # A file that is not the one the manifest vouched for (changed, truncated, copied from elsewhere).
        if "sha256" in shard and emb_path.exists() and sha256_file(emb_path) != shard["sha256"]:
            raise BadInput(
                f"{emb_path} does not match the checksum in {path}: it was changed or truncated; "
                f"rerun embed with redo=true"
            )
        emb = load_npy(emb_path, mmap_mode="r")
        if not keys_path.exists():
            raise MissingInput(f"{keys_path} listed in {path} is missing: rerun embed with redo=true")
        shard_keys = keys_path.read_text().splitlines()
        if (
            emb.ndim != 2
            or emb.shape[1] != dim
            or not np.issubdtype(emb.dtype, np.floating)
            or len(emb) != len(shard_keys)
            or row + len(emb) > manifest["num_samples"]
        ):
            raise BadInput(
                f"embeddings shard {shard['embeddings']} has shape {emb.shape} ({emb.dtype}) for "
                f"{len(shard_keys)} keys (manifest: {manifest['num_samples']} samples of dim "
                f"{manifest['dim']}): embeddings/ is inconsistent; rerun embed with redo=true"
            )
        blocks.append(emb)
        keys.extend(shard_keys)
        row += len(emb)
    # The files must agree with the manifest that vouched for them.
    if row != manifest["num_samples"] or sha256_strings(keys) != manifest.get("keys_sha256"):
        raise BadInput(
            f"the keys files in {folder} do not match its manifest's keys_sha256 / num_samples: "
            f"rerun embed with redo=true"
        )
    return Rows(blocks or [np.zeros((0, dim), np.float32)]), keys, manifest


def read_data_keys(folder: Path, data_manifest: dict) -> list[str]:
    """Sample keys of the data shard set in stored order (the random baseline needs nothing else)."""
    return [sample["key"] for path in shard_paths(folder, data_manifest) for sample in iter_shard(path)]


def _kmeans(rows: Rows, c: Cluster) -> Clustering:
    k, seed, niter, spherical = int(c.k), int(c.seed), int(c.niter), bool(c.spherical)
    check_k(k, len(rows))  # before effective_fine_k, so k > N gets the clearer message
    centroids = k if c.method == "flat" else effective_fine_k(int(c.fine_k), k, len(rows))
    if c.method != "flat" and centroids < int(c.fine_k):
        log.info(
            "cluster: note: cluster.fine_k=%d reduced to %d for N=%d samples (at most N // 4, so each "
            "fine centroid has a few samples)",
            int(c.fine_k),
            centroids,
            len(rows),
        )
    train = _training_rows(rows, c, centroids)
    log.info(
        "cluster: k-means on %d of %d rows (%s stored), every row assigned; faiss on %s",
        len(train),
        len(rows),
        rows.blocks[0].dtype,
        f"{faiss_gpus()} GPU(s)" if faiss_gpus() else "the CPU",
    )
    if c.method == "flat":
        return flat_kmeans(rows, k, niter=niter, seed=seed, spherical=spherical, train=train)
    return two_stage_kmeans(rows, k, fine_k=centroids, niter=niter, seed=seed, spherical=spherical, train=train)


def _training_rows(rows: Rows, c: Cluster, centroids: int) -> np.ndarray:
    """The float32 rows k-means learns from: ``cluster.train_sample`` of them drawn with the seed, or all."""
    size, enough = c.train_sample, MAX_POINTS_PER_CENTROID * centroids
    if size is not None and size < centroids:
        raise BadInput(
            f"cluster.train_sample={size} is fewer rows than the {centroids} centroids k-means learns from them: "
            f"give at least {centroids}, better {enough} ({MAX_POINTS_PER_CENTROID} per centroid, what faiss "
            f"trains on at most), or null for every row"
        )
    if size is None and len(rows) > enough:
        gb = len(rows) * rows.shape[1] * 4 / 1e9
        log.info(
            "cluster: note: cluster.train_sample=null reads all %d rows into memory as float32 (%.1f GB) though "
            "faiss trains on %d of them; cluster.train_sample=%d bounds it",
            len(rows),
            gb,
            enough,
            enough,
        )
    return rows.sample(size, int(c.seed))


def _write_outputs(
    run_dir: RunDir, c: Cluster, keys: list[str], result: Clustering, encoder: str | None, source: str | None = None
) -> dict:
    """Arrays first, report.json last: a clusters/ folder with a report is complete."""
    folder = run_dir.clusters
    folder.mkdir(parents=True, exist_ok=True)
    run_dir.cluster_report.unlink(missing_ok=True)
    for name in OUTPUTS:
        (folder / name).unlink(missing_ok=True)
    arrays = dict(
        centroids=result.centroids, fine_centroids=result.fine_centroids, fine_to_coarse=result.fine_to_coarse
    )
    for name, array in arrays.items():
        if array is not None:
            with atomic_path(folder / f"{name}.npy") as tmp:
                np.save(tmp, array)
    save_assignments(run_dir.assignments, keys, result.labels)

    k = int(c.k)
    report = dict(
        method=str(c.method),
        k=k,
        fine_k=result.fine_k,
        seed=int(c.seed),
        niter=None if c.method == "random" else int(c.niter),
        spherical=None if c.method == "random" else bool(c.spherical),
        train_sample=c.train_sample,
        faiss_gpus=None if c.method == "random" else faiss_gpus(),
        num_samples=len(keys),
        sizes=np.bincount(result.labels, minlength=k).tolist(),
        inertia=result.inertia,
        fine_inertia=result.fine_inertia,
        encoder=encoder,
        # the embeddings it was computed from (None: cluster=random, or embeddings that record no checksums)
        embeddings_id=source,
        keys_sha256=sha256_strings(keys),
        clustering_id=clustering_id(keys, result.labels),
        settings=made_with(c),  # a rerun with other settings is refused, not skipped
    )
    write_json(run_dir.cluster_report, report)
    return report


# The cluster settings the clustering depends on (the others shape the partitions: the partition stage's).
RESULT_KEYS = ("method", "k", "fine_k", "niter", "seed", "spherical", "train_sample")


def made_with(c: Cluster) -> dict:
    return {"cluster": {key: getattr(c, key) for key in RESULT_KEYS}}


def _recorded_settings(report: dict) -> dict | None:
    """What the report says it was made with; a grown run (``ddm extend``) grew K past cluster.k on purpose, so
    its settings are the ones it was first clustered with."""
    made = report.get("settings")
    if made is not None and report.get("extensions"):
        made = {"cluster": dict(made["cluster"], k=report["extensions"][0]["k_before"])}
    return made


def _set_threads(threads) -> None:
    if threads:
        import faiss

        faiss.omp_set_num_threads(int(threads))
