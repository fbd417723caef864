"""The router's held-out accuracy by t every few steps: what people look at while the router trains.

Every ``every`` optimizer steps (``router.preview_every``) the router's current
weights (it keeps no EMA: ``RouterModule.export_net`` is the trained network)
classify one fixed held-out batch, drawn once when the job is built from the
held-out shards the final record is measured on, at fixed noise and a fixed t
in each bucket (``router_diagnostics`` draws them from its own seeded
generator, so a preview changes no training draw). The figures are those of
the record's ``accuracy_by_t`` (``heldout_diagnostics``, the same seed): on the
same samples and weights they are equal. They go to the logger as scalars
(``preview/accuracy``: the mean over the buckets, i.e. over t uniform on
[0, 1]; ``preview/accuracy_t<mid>`` per bucket, named by its midpoint), and a
plot of accuracy against t to ``<job>/previews/step-NNNNNNN.png`` and, where the
logger shows images, to it (as the expert's preview grid). Every rank
classifies (a sharded router's forward pass gathers shards on all ranks);
global rank 0 logs and writes. Only a preview step waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ddm.eval.router_diag import heldout_diagnostics
from ddm.train.preview import EveryNSteps, island_autocast, show_image
from ddm.viz import plot_accuracy_by_t


def bucket_name(row: dict) -> str:
    """``accuracy_t0.05``: a bucket's scalar, named by the midpoint of its t range."""
    return f"accuracy_t{(row['t_lo'] + row['t_hi']) / 2:.3g}"


def preview_metrics(rows: list[dict]) -> dict[str, float]:
    """The scalars a preview logs: accuracy over all of t (buckets are equal) and in each bucket."""
    metrics = {"preview/accuracy": sum(r["accuracy"] for r in rows) / len(rows)}
    metrics.update({f"preview/{bucket_name(r)}": r["accuracy"] for r in rows})
    return metrics


class RouterPreview(EveryNSteps):
    """Held-out accuracy by t of ``pl_module.export_net`` on ``x0`` (clusters ``k``) every ``every`` steps.

    ``condition(pl_module)`` gives what the router is conditioned on for ``x0``
    (labels, a ``TextCondition`` from the module's own text encoder, or None);
    it is called at the first preview, when the module is on its device, and
    kept. ``prior``, ``buckets`` and ``seed`` are those of the final record.
    """

    def __init__(
        self,
        every: int,
        folder: Path,
        x0: torch.Tensor,
        k: torch.Tensor,
        condition: Callable,
        prior: torch.Tensor,
        buckets: int,
        seed: int,
    ):
        super().__init__(every)
        self.folder, self.x0, self.k, self.condition = Path(folder), x0, k, condition
        self.prior, self.buckets, self.seed = prior, int(buckets), int(seed)
        self._y: tuple | None = None  # (condition,) once made

    @torch.no_grad()
    def rows(self, pl_module) -> list[dict]:
        """``heldout_diagnostics`` of the module's current weights on the fixed batch, in eval mode."""
        if self._y is None:
            self._y = (self.condition(pl_module),)
        net = pl_module.export_net
        was_training = net.training
        net.eval()
        try:
            dtype = island_autocast(pl_module)  # an FSDP island under bf16-mixed gathers bf16 weights
            with torch.autocast(pl_module.device.type, dtype=dtype, enabled=dtype is not None):
                return heldout_diagnostics(
                    net,
                    pl_module.path,
                    self.x0,
                    self._y[0],
                    self.k,
                    self.prior,
                    self.buckets,
                    self.seed,
                    pl_module.device,
                )
        finally:
            net.train(was_training)

    def write(self, trainer, pl_module, step: int) -> Path | None:
        rows = self.rows(pl_module)  # every rank: a sharded router needs all of them
        if not trainer.is_global_zero:
            return None
        logger = trainer.logger
        if logger is not None:
            logger.log_metrics(preview_metrics(rows), step=step)
        path = self.folder / f"step-{step:07d}.png"
        picture = plot_accuracy_by_t(rows, path, title=f"router held-out accuracy, step {step} (n={len(self.k)})")
        show_image(logger, picture, step)
        return path
