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

from ddm.cluster_router.cost import EncoderAsModel, router_flops_per_call, routing_calls
from ddm.cluster_router.embedder import ModelSpaceEmbedder, run_embedder
from ddm.cluster_router.likelihood import class_composition, cluster_scores, report_temperature
from ddm.cluster_router.router import ClusterRouter
from ddm.cluster_router.temperature import CALIBRATION_PER_CLUSTER, denoised_embeddings, fit_temperature

__all__ = [
    "CALIBRATION_PER_CLUSTER",
    "ClusterRouter",
    "EncoderAsModel",
    "ModelSpaceEmbedder",
    "class_composition",
    "cluster_scores",
    "denoised_embeddings",
    "fit_temperature",
    "report_temperature",
    "router_flops_per_call",
    "routing_calls",
    "run_embedder",
]
