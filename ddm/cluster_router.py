"""A router that needs no training: the run's own clusters route the samples.

``ClusterRouter`` is a drop-in ``router`` of ``ddm.ensemble.Ensemble``
(``r(x, t, y) -> [B, K]`` logits, ``num_outputs = K``) built from what the
cluster and partition stages wrote, plus the clustering encoder:

- at the first call of a trajectory (t = 1, pure noise) its logits are exactly
  ``log p(k | y)``: the share of class y's training images in cluster k (the
  ``class_counts`` of partitions/cluster-KK/manifest.json). The null label
  (``num_classes``, guidance's unconditional input), an unconditional run, text
  conditions and a class with no training image get the prior ``p(k)`` (the
  cluster sizes of clusters/report.json);
- at later calls it embeds ``x0_hat``, the clean image the ensemble's last
  velocity points at (``FlowPath.x0_from_velocity`` at the point where that
  velocity was produced; on the linear path under Euler this equals the one
  computed from the current ``x_t``), with the encoder the run clustered with,
  and adds the log-likelihood of that embedding under the clusters::

      logits_k = log p(k | y) + log mean_{c in cluster k} exp(-||e - c||^2 / tau)

  where c runs over the cluster's centroids: its one centroid (flat k-means) or
  the fine centroids mapped to it (two-stage k-means). The mean (not the sum)
  makes each cluster's term a density: a cluster with more fine centroids is
  not favoured for that, which would count the prior a second time. With one
  centroid per cluster the two are the same.

``Ensemble`` calls ``router.observe(x, t, y, v)`` after every call with the
velocity it returned; the router keeps ``x0_hat`` per row. A call with another
batch size (but twice it: separate guidance routing, whose null rows follow
the same trajectory), a time later than the last call's or t = 1 starts a new
trajectory from the prior (``reset()`` does so explicitly). ``every=n`` routes
on the encoder every n-th call of a trajectory (calls 1, 1 + n, ...) and reuses
the last likelihood in between, so the encoder runs n times less often.

The temperature ``tau``: ``fit_temperature`` finds the one that minimises the
negative log-likelihood of the true cluster of some images from their
embeddings. On clean images of the run that optimum is tau -> 0 (their cluster
is by definition the one of their nearest centroid, so nothing is ever
misclassified); fit it on the embeddings of denoised estimates instead
(``denoised_embeddings``: held-out images noised to sampling times and denoised
by the ensemble), e.g. ``CALIBRATION_PER_CLUSTER`` = 32 images per cluster.
Without a fitted tau, ``from_run`` uses the Gaussian one of the clustering's
own spread, ``2 * inertia / dim`` (``report_temperature``).

Which strategy: the x0 estimate comes from the experts the router chose, and an
expert's estimate lies in its own cluster, so the choice made at t = 1 tends to
stay. With ``sample.strategy=sample`` that is ancestral sampling: each sample
draws its cluster from ``p(k | y)`` at t = 1 and keeps its expert (exact for
exact experts; tests/test_cluster_router.py: the mixture's cluster shares come
out within 0.03, no sample ever changing expert). ``top1`` sends every sample of
a class to its most common cluster at t = 1 and keeps it there; ``full`` at t = 1
embeds the global mean, which sits nearest one cluster: on the test's
three-cluster mixture both put every sample in the largest cluster (the exact
router: 81% / 50% there).

FLOPs: ``ddm.eval.flops.model_forward_flops(EncoderAsModel(embed), shape,
conditional=False)`` counts the encoder's forward per image; ``routing_calls``
says on how many of a trajectory's calls it runs and ``router_flops_per_call``
averages the router's cost over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ddm.errors import BadInput, MissingInput
from ddm.flow import FlowPath

__all__ = [
    "CALIBRATION_PER_CLUSTER",
    "ClusterRouter",
    "EncoderAsModel",
    "ModelSpaceEmbedder",
    "class_composition",
    "denoised_embeddings",
    "fit_temperature",
    "report_temperature",
    "router_flops_per_call",
    "routing_calls",
    "run_embedder",
]

# Held-out images per cluster that fitting tau reads: the most any job reads from another island's partition.
CALIBRATION_PER_CLUSTER = 32


class ClusterRouter(nn.Module):
    """Cluster posterior from the class composition and the embedding of the ensemble's x0 estimate.

    Args:
        sizes: [K] images per cluster (the prior p(k)).
        centroids: [M, D] centroids in embedding space (K coarse ones, or the fine ones of a two-stage clustering).
        centroid_cluster: [M] the cluster of each centroid; None: centroid k is cluster k (M = K).
        embed: images in model space (what the experts generate, [B, ...]) -> embeddings [B, D], as the
            clustering embedded its images (``run_embedder`` builds the run's).
        path: the flow path the experts were trained on (gives x0 from a velocity).
        tau: the temperature of the distances, positive.
        class_counts: [C, K] images of class c in cluster k (None or C = 0: an unconditional run).
        every: route on the encoder every ``every`` calls of a trajectory (1: every call after the first).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        centroids,
        centroid_cluster=None,
        *,
        embed: Callable,
        path: FlowPath,
        tau: float,
        class_counts=None,
        every: int = 1,
    ):
        super().__init__()
        sizes = torch.as_tensor(np.asarray(sizes, dtype=np.float64))
        K = len(sizes)
        if K < 1 or bool((sizes < 0).any()) or float(sizes.sum()) <= 0:
            raise BadInput(f"cluster sizes {sizes.tolist()} must be non-negative with a positive total")
        centroids = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        if centroids.dim() != 2 or len(centroids) == 0:
            raise BadInput(f"centroids of shape {tuple(centroids.shape)} must be [M, D]")
        owner = (
            torch.arange(len(centroids))
            if centroid_cluster is None
            else torch.as_tensor(np.asarray(centroid_cluster, dtype=np.int64))
        )
        if owner.shape != (len(centroids),) or int(owner.min()) < 0 or int(owner.max()) >= K:
            raise BadInput(f"centroid_cluster must give each of the {len(centroids)} centroids a cluster in 0..{K - 1}")
        per_cluster = torch.bincount(owner, minlength=K)
        if bool((per_cluster == 0).any()):
            empty = (per_cluster == 0).nonzero().flatten().tolist()
            raise BadInput(f"clusters {empty} have no centroid: the centroids and the cluster sizes disagree")
        if not tau > 0 or not math.isfinite(float(tau)):
            raise BadInput(f"cluster router tau={tau} must be a positive number")
        every = int(every)
        if every < 1:
            raise BadInput(f"sample.route_every={every} must be at least 1")
        self.num_outputs, self.tau, self.every = K, float(tau), every
        self.embed, self.path = embed, path
        self.register_buffer("centroids", centroids, persistent=False)
        self.register_buffer("centroids_sq", centroids.pow(2).sum(1), persistent=False)
        # log of 1 / M_k where centroid c belongs to cluster k, -inf elsewhere: [K, M]
        member = nn.functional.one_hot(owner, K).T.bool()
        weight = torch.where(member, -per_cluster.double().log()[:, None], torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("log_member", weight.float(), persistent=False)
        table = class_composition(class_counts, sizes)
        self.num_classes = len(table) - 1
        self.register_buffer("log_composition", table.log().float(), persistent=False)
        self.encoder_calls = 0  # how often the encoder ran (all trajectories)
        self.reset()

    def extra_repr(self) -> str:
        return (
            f"K={self.num_outputs}, centroids={len(self.centroids)}, classes={self.num_classes}, "
            f"tau={self.tau:.4g}, every={self.every}"
        )

    # ---- the router interface ---------------------------------------------------------
    def reset(self) -> None:
        """Forget the trajectory: the next call routes by the prior (or class composition) alone."""
        self._x0 = None  # x0_hat per row of the trajectory, [B, ...]
        self._likelihood = None  # the last log-likelihood term [B, K]
        self._last_t = None
        self._calls = 0

    def prior_logits(self, y, n: int, device) -> torch.Tensor:
        """``log p(k | y)`` [n, K]: the class composition of each label, the prior for the null label or no label."""
        table = self.log_composition.to(device)
        if y is None or not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
            return table[-1].expand(n, -1)
        y = y.to(device=device, dtype=torch.long)
        null = torch.full_like(y, self.num_classes)
        return table[torch.where((y >= 0) & (y < self.num_classes), y, null)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        t_max = float(t.max()) if t.numel() else 1.0  # one host read per call (the ensemble makes one anyway)
        rows = self._continues(n, t_max)
        logits = self.prior_logits(y, n, x.device)
        if rows is not None:
            if self._likelihood is None or (self._calls - 1) % self.every == 0:
                self._likelihood = self.log_likelihood(self.embed(self._x0))
                self.encoder_calls += 1
            lik = self._likelihood.to(logits.device)
            logits = logits + (lik if rows == n else lik.repeat(n // rows, 1))
        self._calls += 1
        self._last_t = t_max
        return logits

    def observe(self, x: torch.Tensor, t: torch.Tensor, y, v: torch.Tensor) -> None:
        """Keep x0_hat of the ensemble's velocity ``v`` at ``(x, t)`` for the next call of this trajectory."""
        t = torch.as_tensor(t, device=x.device).float()
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        self._x0 = self.path.x0_from_velocity(x.detach().float(), v.detach().float(), t)

    def _continues(self, n: int, t_max: float) -> int | None:
        """The rows of the trajectory this call continues (n, or n / 2 under separate guidance routing, whose null
        rows share the samples' x_t); None, and the state forgotten, when it starts a new one."""
        x0 = self._x0
        same = (
            x0 is not None
            and self._last_t is not None
            and t_max < 1.0
            and t_max <= self._last_t + 1e-6
            and n in (len(x0), 2 * len(x0))
        )
        if not same:
            self.reset()
            return None
        return len(x0)

    # ---- the likelihood ---------------------------------------------------------------
    def log_likelihood(self, e) -> torch.Tensor:
        """``log mean_{c in k} exp(-||e - c||^2 / tau)`` [B, K] of embeddings ``e`` [B, D]."""
        e = torch.as_tensor(e).to(self.centroids.device, torch.float32)
        if e.dim() != 2 or e.shape[1] != self.centroids.shape[1]:
            raise BadInput(
                f"the encoder gave embeddings of shape {tuple(e.shape)} but the centroids are "
                f"{tuple(self.centroids.shape)}: embed with the encoder the run clustered with"
            )
        with torch.autocast(e.device.type, enabled=False):  # fp32 distances, whatever the sampler autocasts to
            sq = (e.pow(2).sum(1, keepdim=True) - 2 * e @ self.centroids.T + self.centroids_sq).clamp_min(0)
            return cluster_scores(-sq / self.tau, self.log_member)

    # ---- from a run --------------------------------------------------------------------
    @classmethod
    def from_run(
        cls,
        run_dir,
        embed: Callable,
        path: FlowPath,
        num_classes: int,
        tau: float | None = None,
        every: int = 1,
    ) -> ClusterRouter:
        """The router of a run's clusters/ and partitions/ (``num_classes``: the experts'; 0: unconditional).

        ``tau`` None: ``report_temperature`` of clusters/report.json.
        """
        from ddm.artifacts import RunDir

        rd = RunDir(run_dir)
        report = _read(rd.cluster_report, "run the cluster stage first (`ddm cluster`)")
        K = int(report["k"])
        if report.get("method") == "random":
            raise BadInput(
                f"{rd.cluster_report}: the clustering is a random partition, which has no centroids to route by; "
                f"use the trained router (sample.router=trained)"
            )
        fine = rd.fine_centroids.exists() or rd.fine_to_coarse.exists()
        if fine:
            centroids = _load_array(rd.fine_centroids, "run the cluster stage again (`ddm cluster redo=true`)")
            owner = _load_array(rd.fine_to_coarse, "run the cluster stage again (`ddm cluster redo=true`)")
        else:
            centroids = _load_array(rd.centroids, "run the cluster stage first (`ddm cluster`)")
            owner = None
        sizes = report.get("sizes") or []
        if len(sizes) != K:
            raise BadInput(f"{rd.cluster_report} gives {len(sizes)} sizes for k={K}: remake it with `ddm cluster`")
        counts = None
        if num_classes:
            counts = np.zeros((int(num_classes), K), dtype=np.int64)
            for k in range(K):
                manifest = _read(rd.partition_manifest(k), "run the partition stage first (`ddm partition`)")
                made_from = manifest.get("clustering_id")
                if made_from is not None and made_from != report.get("clustering_id"):
                    raise BadInput(
                        f"{rd.partition_manifest(k)} was made from clustering {made_from}, not the current "
                        f"{report.get('clustering_id')} of {rd.cluster_report}: run `ddm partition` again"
                    )
                if "class_counts" not in manifest:
                    raise MissingInput(
                        f"{rd.partition_manifest(k)} records no class_counts (written by an older ddm): "
                        f"run `ddm partition redo=true`"
                    )
                for label, n in manifest["class_counts"].items():
                    if 0 <= int(label) < num_classes:
                        counts[int(label), k] = int(n)
        if tau is None:
            tau = report_temperature(report, centroids.shape[1])
        return cls(sizes, centroids, owner, embed=embed, path=path, tau=tau, class_counts=counts, every=every)


def cluster_scores(scores: torch.Tensor, log_member: torch.Tensor) -> torch.Tensor:
    """Per cluster, ``logsumexp`` over its centroids of ``scores`` [B, M] plus ``log_member`` [K, M]: [B, K]."""
    return (scores[:, None, :] + log_member.to(scores)[None]).logsumexp(dim=-1)


def class_composition(class_counts, sizes) -> torch.Tensor:
    """``p(k | c)`` [C + 1, K] in float64: row c the share of class c's images in each cluster, the last row
    the prior (cluster sizes over the total); a class without images gets the prior too."""
    sizes = torch.as_tensor(np.asarray(sizes, dtype=np.float64))
    prior = sizes / sizes.sum()
    if class_counts is None or np.size(class_counts) == 0:
        return prior[None]
    counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    if counts.dim() != 2 or counts.shape[1] != len(sizes) or bool((counts < 0).any()):
        raise BadInput(f"class counts of shape {tuple(counts.shape)} must be [classes, {len(sizes)}], non-negative")
    total = counts.sum(1, keepdim=True)
    rows = torch.where(total > 0, counts / total.clamp_min(1), prior[None])
    return torch.cat([rows, prior[None]])


# ---- the temperature ----------------------------------------------------------------------------------------
def fit_temperature(embeddings, clusters, centroids, centroid_cluster=None, log_prior=None) -> float:
    """The tau minimising the mean NLL of each embedding's true cluster under the router's likelihood.

    ``embeddings`` [N, D] with their true ``clusters`` [N]; ``centroids`` [M, D] and ``centroid_cluster``
    [M] (None: one centroid per cluster) as ``ClusterRouter`` takes them; ``log_prior`` [K] added to the
    logits (None: a uniform prior, right for a held-out set with as many images of every cluster).
    Raises ``BadInput`` when the NLL keeps falling as tau goes to 0 (every embedding is nearest to its own
    cluster: clean images of the run are, by the clustering's rule) or to infinity (the embeddings say
    nothing about the cluster).
    """
    e, c = _host(embeddings).double(), _host(centroids).double()
    y = _host(clusters).long()
    owner = torch.arange(len(c)) if centroid_cluster is None else _host(centroid_cluster).long()
    K = int(owner.max()) + 1
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1] or y.shape != (len(e),) or len(e) == 0:
        raise BadInput(
            f"fit_temperature needs embeddings [N, D], clusters [N] and centroids [M, D]; got "
            f"{tuple(e.shape)}, {tuple(y.shape)} and {tuple(c.shape)}"
        )
    if int(y.min()) < 0 or int(y.max()) >= K:
        raise BadInput(f"cluster ids must be in 0..{K - 1} (the clusters of the centroids)")
    sq = torch.cdist(e, c).pow(2)
    per_cluster = torch.bincount(owner, minlength=K).double()
    member = nn.functional.one_hot(owner.long(), K).T.bool()
    log_member = torch.where(member, -per_cluster.log()[:, None], torch.tensor(-math.inf, dtype=torch.float64))
    prior = torch.zeros(K, dtype=torch.float64) if log_prior is None else _host(log_prior).double()

    def nll(log_tau: float) -> float:
        logits = cluster_scores(-sq / math.exp(log_tau), log_member) + prior
        return float((logits.logsumexp(1) - logits.gather(1, y[:, None]).squeeze(1)).mean())

    positive = sq[sq > 0]
    scale = float(positive.median()) if len(positive) else 1.0
    grid = np.linspace(math.log(scale) - 16.0, math.log(scale) + 8.0, 49)  # steps of 0.5 in log tau
    values = [nll(g) for g in grid]
    best = int(np.argmin(values))
    if best == 0:
        raise BadInput(
            "fit_temperature: the NLL keeps falling as tau goes to 0: every embedding is nearest to a centroid "
            "of its own cluster (clean images of the run are, by the clustering's rule); fit on the embeddings "
            "of denoised estimates (ddm.cluster_router.denoised_embeddings) instead"
        )
    if best == len(grid) - 1:
        raise BadInput(
            "fit_temperature: the NLL keeps falling as tau grows: these embeddings say nothing about their "
            "cluster (are they embedded with the run's encoder, and their clusters right?)"
        )
    lo, hi = grid[best - 1], grid[best + 1]
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(48):  # the bracket of width 1 in log tau shrinks below 1e-9
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def report_temperature(report: dict, dim: int) -> float:
    """``2 * inertia / dim``: the tau of isotropic Gaussians around the centroids with the clustering's spread.

    ``inertia`` is the mean squared distance of an image to its centroid (the fine one of a two-stage
    clustering: ``fine_inertia``), so ``inertia / dim`` is the variance per dimension.
    """
    inertia = report.get("fine_inertia") or report.get("inertia")
    if not inertia or inertia <= 0:
        raise BadInput(
            "clusters/report.json records no positive inertia to set the cluster router's tau from: "
            "give sample.route_tau (or fit it with ddm.cluster_router.fit_temperature)"
        )
    return 2.0 * float(inertia) / int(dim)


@torch.no_grad()
def denoised_embeddings(model, path: FlowPath, x0: torch.Tensor, t, embed: Callable, y=None, generator=None):
    """Embeddings [N, D] of the x0 estimates of images ``x0`` (model space) noised to times ``t`` and denoised by
    ``model`` (the ensemble; ``model(x, t, y) -> v``): what the router embeds while sampling, to fit tau on."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    t = t.expand(len(x0)) if t.dim() == 0 else t
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = path.interpolate(x0, eps, t)
    v = model(x_t, t, y)
    return torch.as_tensor(embed(path.x0_from_velocity(x_t, v.to(x_t.dtype), t)))


# ---- the run's encoder ----------------------------------------------------------------------------------------
class ModelSpaceEmbedder:
    """Images in model space [-1, 1] ``[B, C, H, W]`` (a latent run: latents, decoded first) -> embeddings
    ``[B, D]`` on the images' device, through the clustering encoder exactly as the embed stage fed it: 8-bit
    images (``ddm.images.to_uint8``), rows rounded to the stored dtype."""

    def __init__(self, encoder, decode: Callable | None = None, stored_dtype: str = "float32"):
        self.encoder, self.decode, self.stored_dtype = encoder, decode, np.dtype(stored_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ddm.images import to_uint8

        images = self.decode(x) if self.decode is not None else x
        rows = np.asarray(self.encoder(to_uint8(images)))
        return torch.from_numpy(rows.astype(self.stored_dtype).astype(np.float32)).to(x.device)


def run_embedder(run_dir, seed: int, decode: Callable | None = None) -> ModelSpaceEmbedder:
    """The run's clustering encoder (embeddings/manifest.json) as a ``ModelSpaceEmbedder``.

    ``seed``: the run's seed (random-init encoders are rebuilt from it, as the embed stage built them; the
    global random state is left as it was). ``decode``: a latent run's decoder (latents -> images in [-1, 1]).
    """
    import random

    from ddm.artifacts import RunDir
    from ddm.data.shards import load_manifest
    from ddm.data.sources import SourceMeta
    from ddm.embed import build_encoder, load_embeddings_manifest
    from ddm.seeds import seed_everything
    from ddm.settings import Embed
    from ddm.settings.values import build

    rd = RunDir(run_dir)
    manifest = load_embeddings_manifest(rd.embeddings)
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(int(seed))
        encoder = build_encoder(
            build(Embed, manifest["encoder_config"], "embed"), SourceMeta.from_manifest(load_manifest(rd.data))
        )
    random.setstate(states[0])
    np.random.set_state(states[1])
    stored = manifest.get("dtype") or manifest["encoder_config"].get("dtype") or "float32"
    return ModelSpaceEmbedder(encoder, decode, stored)


# ---- FLOPs ------------------------------------------------------------------------------------------------------
class EncoderAsModel(nn.Module):
    """An ``embed(x)`` called as ``model(x, t, y)``: what ``ddm.eval.flops.model_forward_flops`` counts.

    ``model_forward_flops(EncoderAsModel(router.embed), image_shape, conditional=False)`` is the encoder's forward
    FLOPs per image on model-space images (C, H, W); a latent run's ``ModelSpaceEmbedder`` counts its decoder too.
    (Counted there, not here: this module stays below ``ddm.eval``, so ``ddm.sampling`` may build the router.)
    """

    def __init__(self, embed: Callable):
        super().__init__()
        self.embed = embed

    def forward(self, x, t=None, y=None):
        return self.embed(x)


def routing_calls(calls: int, every: int = 1) -> int:
    """How many of a trajectory's ``calls`` model calls run the encoder: calls 1, 1 + every, ... (the first call,
    at t = 1, routes by the class composition alone)."""
    return 0 if calls <= 1 else (calls - 2) // int(every) + 1


def router_flops_per_call(encoder_flops: float, num_centroids: int, dim: int, calls: int, every: int = 1) -> float:
    """The cluster router's FLOPs per image and model call, averaged over a trajectory's ``calls``: the encoder
    plus the distances to ``num_centroids`` centroids of ``dim`` numbers (``2 * M * D``) on ``routing_calls`` of
    them. What ``ddm.eval.flops.sampling_flops_per_image`` takes as ``router_flops``; separate guidance routing
    embeds each sample once, its null row reusing it, so that formula's doubled router must not apply to it."""
    if calls <= 0:
        return 0.0
    return routing_calls(calls, every) * (float(encoder_flops) + 2.0 * num_centroids * dim) / calls


def _host(a) -> torch.Tensor:
    """An array, list or tensor (on any device) as a host tensor."""
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _read(path: Path, hint: str) -> dict:
    from ddm.io import read_json

    if not path.exists():
        raise MissingInput(f"the cluster router needs {path}, which does not exist: {hint}")
    return read_json(path)


def _load_array(path: Path, hint: str) -> np.ndarray:
    from ddm.io import load_npy

    if not path.exists():
        raise MissingInput(f"the cluster router needs {path}, which does not exist: {hint}")
    return np.asarray(load_npy(path))
