"""``ClusterRouter``: the router of a run's clusters (see ``ddm.cluster_router``), and its construction from a run."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ddm.cluster_router.likelihood import class_composition, cluster_scores, report_temperature
from ddm.errors import BadInput, MissingInput
from ddm.flow import FlowPath


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
        self.register_buffer("centroid_cluster", owner, persistent=False)
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
