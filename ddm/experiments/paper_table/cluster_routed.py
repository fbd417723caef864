"""Rows routed by the run's clusters with no trained router (``sample.router=clusters``, ``ddm.cluster_router``).

A row ``clusters-<strategy>`` (``clusters-sample``, ``clusters-sample:0.5:top1``) samples the run's trained
experts under ``<strategy>`` with the cluster router in place of ``router/router.pt``: the same held-out images,
generated labels, prior noise and feature net as the other rows. Its training FLOPs are the experts' alone
(no router is trained); its sampling FLOPs count the clustering encoder and the centroid distances per call.
The held-out FM loss is not measured for it (the cluster router follows sampling trajectories, which the
loss's batches are not), so the row's FM loss is empty.
"""

from __future__ import annotations

from ddm.artifacts import RunDir
from ddm.eval.flops import mean_expert_flops, sampling_flops_per_image
from ddm.eval.run.flop_section import sampler_flops_settings
from ddm.job_names import ROUTER_JOB
from ddm.routing_schedule import check_strategy, is_strategy
from ddm.settings import Settings
from ddm.stages import evaluate

CLUSTERS_PREFIX = "clusters-"


def is_cluster_routed(label: str) -> bool:
    """True for a row label ``clusters-<strategy or schedule>``."""
    return str(label).startswith(CLUSTERS_PREFIX) and is_strategy(str(label)[len(CLUSTERS_PREFIX) :])


def routed_strategy(label: str) -> str:
    """The strategy (or schedule) of a ``clusters-`` row, in its one spelling."""
    return check_strategy(str(label)[len(CLUSTERS_PREFIX) :], key="paper.strategies")


def cluster_routed_label(label: str) -> str:
    """``clusters-<strategy>`` with the strategy in its one spelling (the label results are kept under)."""
    return CLUSTERS_PREFIX + routed_strategy(label)


class ClusterRoutedContext(evaluate.EvaluationContext):
    """The evaluate stage's context with the cluster router (its ``cfg`` has ``sample.router=clusters``)."""

    def __init__(self, cfg: Settings, rd: RunDir, settings: dict, label: str):
        super().__init__(cfg, rd, settings, redo=False)  # the evaluate stage has made the held-out set
        self.label, self.strategy = label, routed_strategy(label)

    def ensemble(self, strategy: str, cfg_routing: str | None = None):
        return super().ensemble(self.strategy if strategy == self.label else strategy, cfg_routing)

    def forward_per_call(self, strategy, experts_per_call=None):
        return super().forward_per_call(self.strategy if strategy == self.label else strategy, experts_per_call)

    def sampling_flops(self, generated: dict) -> dict:
        """The strategy's experts per call, the cluster router's encoder and distances as the router's cost."""
        return sampling_flops_per_image(
            mean_expert_flops(self.forward),
            self.forward[ROUTER_JOB],
            self.strategy,
            **sampler_flops_settings(self),
            cfg_routing=self.sc["cfg_routing"],
            router_once=True,  # under separate guidance routing the null rows reuse the samples' embedding
        )

    def row_info(self) -> dict:
        router = self.base.router
        return dict(router="clusters", base_strategy=self.strategy, route_tau=router.tau, route_every=router.every)

    def describe(self) -> str:
        return f"{self.strategy} routed by the clusters (no trained router)"
