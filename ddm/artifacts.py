"""The layout of a run directory: every stage reads and writes only these paths.

Data flows one way::

    data/         shards of the whole dataset + manifest.json
    embeddings/   one float32 .npy per data shard (rows aligned with the shard's
                  samples) + keys-NNNNNN.txt + manifest.json
    clusters/     centroids.npy, assignments.npz (keys, cluster), report.json
    partitions/   cluster-KK/ shards holding exactly that cluster's samples,
                  each with its own manifest.json
    latents/      cluster-KK/ the same samples as VAE latents (``npy``, float16),
                  same keys and order, + manifest.json naming the VAE (latent runs only)
    experts/      expert-KK/ checkpoints, logs, expert.pt (EMA weights), record.json
    router/       checkpoints, logs, router.pt, record.json
    distilled/    (optional, `ddm distill`) checkpoints, logs, expert.pt (one student of the
                  experts, EMA weights, loadable as an expert), record.json
    history/      <clustering id>/ what `ddm extend` retired when the run grew: the router, a
                  distilled student and the experts of clusters that received images
    samples/      grid.png, samples.npz, usage.json, usage.png, record.json
    report.md
    timings/      wall time and peak memory per stage (experts: experts/expert-KK/timing.json)

Shard format (webdataset tar): each sample has a stable key ``<source>-<split>-<index>``
(no dots), an 8-bit PNG image under ``png``, the class label as text under
``cls`` (``-1`` when the source has no labels) and, where the source has one, a
caption under ``txt``.

A ``manifest.json`` names its shards (relative paths), the sample count and a
sha256 per shard; it is written last, so a folder with a manifest is complete.

A run directory may also be a URL (``s3://bucket/run``, ``is_url``): its stages then run on a local working
copy of it (``ddm.store``), laid out as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ddm.io import read_json
from ddm.job_names import expert_id_of, expert_job


def is_url(location) -> bool:
    """True for ``s3://...``, ``gs://...``, ``memory://...``: a run directory in an object store, not a path."""
    text = str(location)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1 and scheme != "file"  # a Windows drive letter is one character


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    # -- stage 1: prepared shards of the whole dataset
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_manifest(self) -> Path:
        return self.data / "manifest.json"

    # -- stage 2: embeddings
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def embeddings_manifest(self) -> Path:
        return self.embeddings / "manifest.json"

    # -- stage 3: clustering
    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def assignments(self) -> Path:
        return self.clusters / "assignments.npz"

    @property
    def cluster_report(self) -> Path:
        return self.clusters / "report.json"

    @property
    def centroids(self) -> Path:
        """The K coarse centroids (flat and two-stage k-means)."""
        return self.clusters / "centroids.npy"

    @property
    def fine_centroids(self) -> Path:
        """Two-stage k-means: the fine centroids, and below the coarse cluster of each."""
        return self.clusters / "fine_centroids.npy"

    @property
    def fine_to_coarse(self) -> Path:
        return self.clusters / "fine_to_coarse.npy"

    @property
    def partitions_index(self) -> Path:
        """The partition stage's index of all K partitions (written after every partition)."""
        return self.partitions / "manifest.json"

    # -- stage 3b: per-cluster shard sets
    @property
    def partitions(self) -> Path:
        return self.root / "partitions"

    def partition(self, k: int) -> Path:
        return self.partitions / f"cluster-{k:02d}"

    def partition_manifest(self, k: int) -> Path:
        return self.partition(k) / "manifest.json"

    # -- stage 3b (latent runs): the partitions encoded by the VAE
    @property
    def latents(self) -> Path:
        return self.root / "latents"

    def latent(self, k: int) -> Path:
        """Cluster ``k``'s samples as latents: what its expert trains on in a latent run."""
        return self.latents / f"cluster-{k:02d}"

    # -- stage 4: experts
    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def expert(self, k: int) -> Path:
        return self.experts / expert_job(k)

    def expert_weights(self, k: int) -> Path:
        return self.expert(k) / "expert.pt"

    def expert_record(self, k: int) -> Path:
        return self.expert(k) / "record.json"

    # -- stage 5: router
    @property
    def router(self) -> Path:
        return self.root / "router"

    @property
    def router_weights(self) -> Path:
        return self.router / "router.pt"

    @property
    def router_record(self) -> Path:
        return self.router / "record.json"

    # -- optional: one student distilled from the experts (``ddm distill``)
    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    @property
    def distilled_weights(self) -> Path:
        return self.distilled / "expert.pt"

    @property
    def distilled_record(self) -> Path:
        return self.distilled / "record.json"

    # -- optional: the cluster router's fitted temperature (``ddm fit-route-tau``, ``sample.route_tau=fitted``)
    @property
    def route_tau(self) -> Path:
        return self.router / "route_tau.json"

    # -- stage 6: samples
    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def samples_record(self) -> Path:
        return self.samples / "record.json"

    # -- evaluate
    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def evaluation_metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    # -- summary
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def timing(self, job: str) -> Path:
        """Wall time and peak memory of one job. An expert's lives in its own folder, so that
        experts running at once on different islands never write the same file."""
        expert_id = expert_id_of(job)
        if expert_id is not None:
            return self.expert(expert_id) / "timing.json"
        return self.root / "timings" / f"{job}.json"

    def all_timings(self) -> dict[str, dict]:
        """Every recorded job timing of the run, by job name."""
        files = sorted((self.root / "timings").glob("*.json")) + sorted(self.experts.glob("expert-*/timing.json"))
        return {read_json(f)["job"]: read_json(f) for f in files}
