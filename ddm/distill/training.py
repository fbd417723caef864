"""The distillation LightningModule: one student regressing the velocity of each sample's own expert.

For a training sample of cluster k (the tag ``ddm.data.loader.mixed_stream`` gives it), drawn
along the shared ``FlowPath`` to (x_t, t), the student's target is the top-1 teacher's velocity::

    target = (1 - w) * v_k(x_t, t, y') + w * (alpha'(t) x0 + sigma'(t) eps)       w = data_weight

where ``v_k`` is expert k's network (its exported EMA weights, frozen, no gradient) and ``y'``
the labels after the student's own label dropout: a dropped sample's target is its expert's
unconditional velocity (the expert called with the null label), which is what the student's
unconditional branch must learn for guidance. Cluster k is the expert the paper's top-1
router would pick for a clean sample of cluster k.

The teachers run as the ensemble runs its experts: the batch is grouped by k and each expert
runs once, on its own samples only, so a step costs one teacher forward per sample. They stay
outside the module's state dict (checkpoints hold the student, its EMA and the optimizer only)
and move to the module's device when the fit starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ddm.flow import PathSample, velocity_mse
from ddm.images import batch_to_model_space_on_device
from ddm.models.dit import DiT
from ddm.train.ema import check_same_layout, ema_decay_at, make_ema, update_ema
from ddm.train.modules import ADAMW_BETAS, _Base, adamw_betas


def _select(y, idx: torch.Tensor):
    return None if y is None else y.index_select(0, idx)


@torch.no_grad()
def teacher_velocity(teachers: Sequence | Mapping, x_t: torch.Tensor, t: torch.Tensor, y, k: torch.Tensor):
    """Each sample's own expert's velocity at (x_t, t, y): expert ``k[i]`` for sample ``i``.

    ``teachers[j]`` is expert j (a sequence indexed by id, or a mapping id -> module). The
    batch is grouped by ``k`` and each expert runs once, on its samples only (an expert with
    none does not run); one host sync per call reads the group sizes. ``y`` holds labels
    (``num_classes`` is the null label), a ``TextCondition`` or None.
    """
    ids = range(len(teachers)) if not isinstance(teachers, Mapping) else sorted(teachers)
    size = max(ids, default=-1) + 1
    counts = torch.bincount(k, minlength=size).tolist()
    missing = [j for j, n in enumerate(counts) if n and j not in ids]
    if missing:
        raise ValueError(f"samples of clusters {missing} but no teacher for them (teachers: {list(ids)})")
    out = torch.empty_like(x_t)
    for j in ids:
        if counts[j] == 0:
            continue
        if counts[j] == len(k):  # the whole batch is one cluster's: no gather
            return teachers[j](x_t, t, y).to(out.dtype)
        idx = (k == j).nonzero().squeeze(1)
        v = teachers[j](x_t.index_select(0, idx), t.index_select(0, idx), _select(y, idx))
        out.index_copy_(0, idx, v.to(out.dtype))
    return out


def distill_target(teachers, point: PathSample, y, k: torch.Tensor, data_weight: float = 0.0) -> torch.Tensor:
    """The student's regression target at ``point`` (see the module docstring); no gradient flows into it.

    ``y`` is what the student is given too (labels after dropout). ``data_weight`` 1 needs no teacher.
    """
    w = float(data_weight)
    if w == 1.0:
        return point.target
    v = teacher_velocity(teachers, point.x_t, point.t, y, k)
    return v if w == 0.0 else w * point.target + (1.0 - w) * v


class DistillModule(_Base):
    """One student DiT trained on every partition to match the top-1 teacher; exports the EMA of its weights.

    ``teachers`` (expert id -> network) are frozen and not saved; ``model`` is the student's
    ``DiT`` arguments. The rest as ``ExpertModule``.
    """

    def __init__(
        self,
        model: dict,
        flow: dict,
        teachers: Sequence[nn.Module] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        label_dropout: float = 0.1,
        ema_decay: float = 0.999,
        data_weight: float = 0.0,
        nan_check_every: int = 10,
        compile: bool = False,
        text: dict | None = None,
        betas: tuple[float, float] = ADAMW_BETAS,
    ):
        super().__init__("distill", flow, nan_check_every)
        adamw_betas(betas)
        if not 0.0 <= float(data_weight) <= 1.0:
            raise ValueError(f"distill.data_weight={data_weight} must be in [0, 1]")
        self.save_hyperparameters(ignore=["teachers"])
        self.net = DiT(**model)
        self.ema = make_ema(self.net)
        # a plain list, not a ModuleList: outside the state dict, the optimizer and DDP/FSDP wrapping
        self._teachers = [t.eval().requires_grad_(False) for t in (teachers or [])]

    @property
    def teachers(self) -> list[nn.Module]:
        return self._teachers

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dtype = next(self.ema.parameters()).dtype  # a true-precision island converted the student: so do they
        for teacher in self._teachers:
            teacher.to(device=self.device, dtype=dtype)

    def training_step(self, batch, batch_idx):
        x0, k = batch_to_model_space_on_device(batch[0]), batch[2].to(self.device)
        y = self.conditioning(batch[1], batch[3] if len(batch) > 3 else None)
        point = self.path.noised(x0)  # (t, eps) first, then the label dropout, as an expert draws them
        y = self.drop_labels(y)
        target = distill_target(self._teachers, point, y, k, self.hparams.data_weight)
        loss = velocity_mse(self.net(point.x_t, point.t, y), target).mean()
        self.watch(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def sharded_networks(self) -> list[nn.Module]:
        return [self.net, self.ema]

    def on_train_start(self) -> None:
        check_same_layout(self.ema, self.net)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # as ExpertModule: the EMA moves once per optimizer step, before any callback of the batch saves it
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        update_ema(self.ema, self.net, ema_decay_at(self.global_step + 1, self.hparams.ema_decay))

    @property
    def export_net(self) -> DiT:
        """What ``distilled/expert.pt`` holds: the EMA of the student's weights."""
        return self.ema
