"""LightningModules: a flow-matching expert and the router classifier.

Both draw their noisy inputs from the same ``FlowPath`` that the sampler uses.
Nothing here communicates outside the island: the only collective operations
are Lightning's own data-parallel ones among the devices of one job.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from ddm.errors import Diverged
from ddm.flow import FlowPath
from ddm.models.dit import DiT, DiTClassifier
from ddm.train.ema import check_same_layout, ema_decay_at, make_ema, update_ema
from ddm.train.fsdp import FSDPIslandStrategy


def _warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise Diverged(
            f"{what}: the loss is {loss.item()} at step {step}; training stopped. Lower the learning rate, "
            f"check the input data for NaNs, or resume from an earlier checkpoint."
        )


class _Base(L.LightningModule):
    def __init__(
        self, flow: dict, lr: float, weight_decay: float, warmup_steps: int, total_steps: int, label_dropout: float
    ):
        super().__init__()
        self.path = FlowPath(**flow)
        self._recent: list[float] = []  # losses of the last steps, for the record

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(hp.warmup_steps, hp.total_steps))
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null label with probability label_dropout (trains the unconditional branch)."""
        p = self.hparams.label_dropout
        if p <= 0 or self.net.num_classes == 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < p
        return torch.where(drop, torch.full_like(y, self.net.num_classes), y)

    def remember(self, loss: torch.Tensor, every: int = 10) -> None:
        # Only sync with the device every few steps: .item() would stall a GPU each step.
        if self.global_step % every == 0:
            self._recent = (self._recent + [loss.item()])[-20:]

    def configure_model(self) -> None:
        # Lightning calls this on every rank once the island's processes exist. Only an FSDP island shards
        # (ddm.train.fsdp); under DDP or on one device the networks stay whole.
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPIslandStrategy):
            for net in self.sharded_networks():
                strategy.shard(net)

    def sharded_networks(self) -> list[torch.nn.Module]:
        """The networks an FSDP island shards, each per DiT block."""
        return [self.net]

    def on_save_checkpoint(self, checkpoint) -> None:
        # The recent losses travel with the checkpoint: a resumed job still reports its final loss.
        checkpoint["ddm_recent_losses"] = list(self._recent)

    def on_load_checkpoint(self, checkpoint) -> None:
        self._recent = list(checkpoint.get("ddm_recent_losses", []))

    @property
    def recent_loss(self) -> float | None:
        return sum(self._recent) / len(self._recent) if self._recent else None


class ExpertModule(_Base):
    """Flow matching on one partition: regress the path's velocity with MSE."""

    def __init__(
        self,
        model: dict,
        flow: dict,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        label_dropout: float = 0.1,
        ema_decay: float = 0.999,
        expert_id: int = 0,
    ):
        super().__init__(flow, lr, weight_decay, warmup_steps, total_steps, label_dropout)
        self.save_hyperparameters()
        self.net = DiT(**model)
        self.ema = make_ema(self.net)

    def training_step(self, batch, batch_idx):
        x0, y = batch[0], batch[1]
        point = self.path.noised(x0)  # (t, eps) first, then the label dropout: one fixed order of draws
        loss = self.path.loss_at(self.net, point, self.drop_labels(y)).mean()
        _check_finite(loss, f"expert {self.hparams.expert_id}", self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.remember(loss)
        return loss

    def sharded_networks(self) -> list[torch.nn.Module]:
        # The EMA is sharded exactly as the network (same mesh, same split of every parameter), so each rank
        # updates its EMA slices from the live slices it holds; it stays out of the optimizer.
        return [self.net, self.ema]

    def on_train_start(self) -> None:
        check_same_layout(self.ema, self.net)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        # The EMA moves right after the weights do: once per optimizer step (never per micro-batch), and
        # before any callback of that batch (a checkpoint) sees it; Lightning runs the module's own
        # on_train_batch_end after the callbacks', so an EMA moved there would be saved one step behind.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        step = self.global_step + 1  # Lightning counts this step as done once the hook returns
        update_ema(self.ema, self.net, ema_decay_at(step, self.hparams.ema_decay))

    @property
    def export_net(self) -> DiT:
        """The network a finished expert exports and samples with: the EMA of its weights.

        On an FSDP island it is sharded: ``ddm.train.fsdp.full_copy`` gathers it (on every rank).
        """
        return self.ema


class RouterModule(_Base):
    """Cross-entropy of r(x_t, t, y) against the cluster of the clean sample that was noised."""

    def __init__(
        self,
        model: dict,
        flow: dict,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        total_steps: int = 1000,
        label_dropout: float = 0.1,
    ):
        super().__init__(flow, lr, weight_decay, warmup_steps, total_steps, label_dropout)
        self.save_hyperparameters()
        self.net = DiTClassifier(**model)

    def training_step(self, batch, batch_idx):
        x0, y, k = batch
        point = self.path.noised(x0)
        logits = self.net(point.x_t, point.t, self.drop_labels(y))
        loss = F.cross_entropy(logits.float(), k)
        _check_finite(loss, "router", self.global_step)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == k).float().mean())
        self.remember(loss)
        return loss

    @property
    def export_net(self) -> DiTClassifier:
        """The network a finished router exports: the trained classifier itself (no EMA)."""
        return self.net
