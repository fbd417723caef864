"""The distilled student in the evaluation: one more row, ``distilled``, beside the routing strategies.

``sample.model=distilled`` evaluates the student in place of the ensemble (its row alone, unless
``eval.strategies`` lists routing strategies too); ``eval.strategies`` may also name ``distilled``
beside them, to compare both in one report. The row's images, held-out set, labels, prior
noise and feature net are those of the other rows (``DistilledContext`` extends the
stage's ``EvaluationContext``, as the paper table's fixed per-class expert does), and:

- its FM loss is ``fm_loss.models.distilled`` (same images, t and noise as the others);
- its sampling FLOPs are a single model's (``flops.sampling.distilled``, no router);
- its training FLOPs are ``flops.train.distilled``: the experts' training, the student's
  training and the teachers' forwards (``ddm.eval.flops_summary.distilled_training``).

The student is refused when missing or distilled from other experts (``load_distilled``).
"""

from __future__ import annotations

import functools

from ddm.distill.student import check_student_guidance, load_distilled
from ddm.errors import BadInput
from ddm.eval import flops as flop_count
from ddm.eval.run.context import EvaluationContext
from ddm.sampling.draw import DISTILLED
from ddm.settings import Settings


def wants_distilled(cfg: Settings) -> bool:
    """The evaluation has a distilled row: ``sample.model=distilled`` or ``distilled`` in ``eval.strategies``."""
    listed = [str(s) for s in (cfg.eval.strategies or [])]
    return str(cfg.sample.model or "ensemble") == DISTILLED or DISTILLED in listed


class DistilledContext(EvaluationContext):
    """The evaluate stage's context with the run's distilled student as the strategy ``distilled``."""

    def __init__(self, cfg: Settings, rd, settings: dict, redo: bool):
        super().__init__(cfg, rd, settings, redo)
        self.student, path, self.student_info = load_distilled(rd.root, device=self.device)
        self._check_same_task(path)
        check_student_guidance(self.student_info, self.sc["cfg_scale"])
        if not self.ec.strategies:  # sample.model=distilled: the student in place of sample.strategy
            self.strategies = [DISTILLED]

    def _check_same_task(self, path) -> None:
        s, i = self.student_info, self.info
        mine = (s.num_classes, s.image_size, s.in_channels, path.schedule, s.clustering_id)
        theirs = (i.num_classes, i.image_size, i.in_channels, i.flow.get("schedule"), i.clustering_id)
        if mine != theirs:
            raise BadInput(
                f"the distilled model (classes, image size, channels, flow schedule, clustering {mine}) does not "
                f"fit the run's ensemble ({theirs}): distill it again with `ddm distill redo=true`"
            )

    def ensemble(self, strategy: str, cfg_routing: str | None = None):
        # the student has no router: guidance routing does not apply to it
        return self.student if strategy == DISTILLED else super().ensemble(strategy, cfg_routing)

    @functools.cached_property
    def student_forward(self) -> int:
        """Measured forward FLOPs per sample of the student."""
        return flop_count.model_forward_flops(self.student, self.shape, self.conditional)

    def forward_per_call(self, strategy: str | None, experts_per_call: float | None = None) -> int:
        if strategy == DISTILLED:
            return self.student_forward
        return super().forward_per_call(strategy, experts_per_call)

    def fm_loss(self) -> dict:
        """The stage's ``fm_loss`` with ``models.distilled`` too: the same images, t grid and noise for every model.

        ``distilled`` in ``eval.fm_loss.strategies`` is that row (not an ensemble's); it is measured either way.
        """
        routed = [str(s) for s in self.ec.fm_loss.strategies if str(s) != DISTILLED]
        return self.fm_loss_of(routed, {DISTILLED: (self.student, self.student_forward)})
