"""The fixed per-class expert: for class c, always the expert whose cluster holds most training images of c.

An oracle-like baseline for class-conditional runs, evaluated on the same
trained experts as the routed rows (``extra_rows.evaluate_extra_row``). Its
metrics are cached beside the evaluate stage's, in ``evaluation/class_expert.json``,
keyed by the evaluate stage's settings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ddm.artifacts import RunDir
from ddm.data.shards import load_manifest
from ddm.ensemble import Ensemble
from ddm.eval.flops import mean_expert_flops, sampling_flops_per_image
from ddm.eval.run.flop_section import sampler_flops_settings
from ddm.settings import Settings
from ddm.stages import evaluate

from .grid import CLASS_EXPERT


class ClassRouter(nn.Module):
    """A router that ignores x_t and t: label c goes to ``expert_of_class[c]`` (one-hot logits).

    Wrapped in an ``Ensemble`` with strategy ``top1`` it runs exactly that expert
    on its samples, with the ensemble's sparse execution and guidance. The null
    label (unconditional) goes to ``fallback``.
    """

    def __init__(self, expert_of_class: list[int], num_experts: int, fallback: int):
        super().__init__()
        self.num_outputs = int(num_experts)
        self.register_buffer("table", torch.tensor([*expert_of_class, fallback], dtype=torch.long))

    def forward(self, x, t, y=None):
        null = len(self.table) - 1
        y = torch.full((x.shape[0],), null, device=x.device) if y is None else y.clamp(0, null)
        chosen = nn.functional.one_hot(self.table[y], self.num_outputs).to(x.dtype)  # (N, K)
        return (chosen - 1.0) * 1e9  # 0 for the chosen expert, -1e9 elsewhere: a softmax of exactly one-hot


def expert_of_class(rd: RunDir, num_experts: int, num_classes: int) -> tuple[list[int], list[list[int]]]:
    """For each class, the cluster with most of its training images (from the partition manifests)."""
    counts = np.zeros((num_experts, num_classes), dtype=np.int64)
    for k in range(num_experts):
        for c, n in (load_manifest(rd.partition(k)).get("class_counts") or {}).items():
            if 0 <= int(c) < num_classes:
                counts[k, int(c)] = int(n)
    return counts.argmax(axis=0).tolist(), counts.tolist()


class ClassExpertContext(evaluate.EvaluationContext):
    """The evaluate stage's context with one more strategy, ``class_expert``, built on its loaded experts.

    So the held-out subset, the generated labels, the prior noise and the feature
    net are those of the other rows.
    """

    def __init__(self, cfg: Settings, rd: RunDir, settings: dict):
        super().__init__(cfg, rd, settings, redo=False)
        K = self.base.num_experts
        self.table, self.class_counts = expert_of_class(rd, K, self.num_classes)
        largest = int(np.argmax(np.sum(self.class_counts, axis=1)))
        self.class_router = ClassRouter(self.table, K, fallback=largest).to(self.device)

    def ensemble(self, strategy: str) -> Ensemble:
        if strategy != CLASS_EXPERT:
            return super().ensemble(strategy)
        experts = {int(k): m for k, m in self.base.experts.items()}
        return Ensemble(experts, self.class_router, strategy="top1", num_experts=self.base.num_experts).eval()

    def forward_per_call(self, strategy, experts_per_call=None):
        # one expert and no router network: the cost of a single model
        return super().forward_per_call(None if strategy == CLASS_EXPERT else strategy, experts_per_call)

    def sampling_flops(self, generated: dict) -> dict:
        """One expert per sample and no router network (``sampling_flops_per_image`` of top-1 at router 0)."""
        return sampling_flops_per_image(mean_expert_flops(self.forward), 0, "top1", **sampler_flops_settings(self))

    def row_info(self) -> dict:
        """What the row's result records beside its metrics: each class's expert and the counts behind it."""
        return dict(expert_of_class=self.table, class_counts=self.class_counts)

    def describe(self) -> str:
        return f"fixed per-class expert {self.table}"
