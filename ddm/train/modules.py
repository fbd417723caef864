"""LightningModules: a flow-matching expert and the router classifier.

Both draw their noisy inputs from the same ``FlowPath`` that the sampler uses.
Nothing here communicates outside the island: the only collective operations
are Lightning's own data-parallel ones among the devices of one job.

A training step makes no host sync of its own: pixels arrive as uint8 and are
scaled on the device (a quarter of the bytes through the loader and the
host-to-device copy), and the loss and the gradients are checked for NaN every
few steps by a ``LossWatch`` rather than read every step.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from ddm.errors import BadInput
from ddm.flow import FlowPath, check_prediction
from ddm.images import batch_to_model_space_on_device
from ddm.models.conditioning import TextCondition
from ddm.models.dit import DiT, DiTClassifier
from ddm.models.prediction import as_velocity_model
from ddm.train.ema import check_same_layout, ema_decay_at, make_ema, update_ema
from ddm.train.fsdp import FSDPIslandStrategy
from ddm.train.loss_watch import LossWatch, local_gradients


def _warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def fused_adamw_available(params) -> bool:
    """AdamW's fused kernel (one launch for every parameter) runs when all parameters are on CUDA."""
    return all(p.is_cuda for p in params)


ADAMW_BETAS = (0.9, 0.99)  # the demo's; DiT trains with (0.9, 0.999) (expert=dit_xl2 sets it)


def adamw_betas(betas) -> tuple[float, float]:
    """``expert.betas`` / ``router.betas`` as AdamW's (beta1, beta2), each in [0, 1)."""
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise BadInput(f"betas={betas!r} must be two numbers [beta1, beta2], e.g. [0.9, 0.999]") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise BadInput(f"betas={betas!r}: AdamW's betas must each be in [0, 1), e.g. [0.9, 0.999]")
    return b1, b2


class _Base(L.LightningModule):
    def __init__(self, what: str, flow: dict, nan_check_every: int):
        super().__init__()
        self.path = FlowPath(**flow)
        self.losses = LossWatch(what, nan_check_every)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            betas=adamw_betas(hp.get("betas") or ADAMW_BETAS),
            fused=fused_adamw_available(params) or None,  # None: torch's default (foreach) elsewhere
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(hp.warmup_steps, hp.total_steps))
        return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval="step"))

    def on_fit_start(self) -> None:
        # Compiled after Lightning placed (and, under DDP/FSDP, wrapped) the network; in place, so the
        # state dict keeps its names and checkpoints load into an uncompiled network.
        if self.hparams.compile:
            self.net.compile()

    def watch(self, loss: torch.Tensor) -> None:
        """Record this step's loss; every few steps check it (see ``LossWatch``)."""
        self.losses.add(loss, self.global_step)
        if self.losses.due(self.global_step):
            self.losses.check(self.global_step, self._strategy())

    def _strategy(self):
        return self.trainer.strategy if self._trainer is not None else None

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after backward and before clipping and the step: the gradients about to be applied.
        if self._trainer is not None and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: inf gradients are expected there, and its scaler skips those steps
        self.losses.add_gradients(local_gradients(self.net.parameters()), self.global_step)

    def on_train_end(self) -> None:
        self.losses.check(self.global_step, self._strategy())  # the exported weights must be finite

    def conditioning(self, labels: torch.Tensor, captions: list[str] | None):
        """What the network is conditioned on: the labels, or the captions encoded on this device."""
        spec = self.hparams.get("text")
        if not spec:
            return labels
        if captions is None:
            raise ValueError("a text-conditional job needs captions in its batches (the loader's captions=...)")
        if isinstance(captions, TextCondition):  # encoded once by `ddm encode` (text.store=true)
            return captions.to(self.device).to(dtype=torch.float32)
        if getattr(self, "_text_encoder", None) is None:
            from ddm.text.encoder import OpenClipTextEncoder

            # frozen and outside the state dict: checkpoints and expert.pt hold the DiT only
            self._text_encoder = OpenClipTextEncoder.from_record(
                spec, "this job's text.pretrained", device=self.device, cache=int(spec.get("cache") or 0)
            )
        return self._text_encoder(captions)

    def drop_labels(self, y):
        """Replace labels (or captions) by the null one with probability label_dropout (the unconditional branch)."""
        p = self.hparams.label_dropout
        if isinstance(y, TextCondition):
            return y if p <= 0 else y.dropped(torch.rand(len(y), device=y.device) < p)
        if p <= 0 or self.net.num_classes == 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < p
        return torch.where(drop, torch.full_like(y, self.net.num_classes), y)

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
        # No checkpoint of diverged weights: a resume would start from NaNs.
        self.losses.check(self.global_step, self._strategy())
        # The recent losses travel with the checkpoint: a resumed job still reports its final loss.
        checkpoint["ddm_recent_losses"] = self.losses.recent()

    def on_load_checkpoint(self, checkpoint) -> None:
        self.losses.restore(checkpoint.get("ddm_recent_losses", []), int(checkpoint.get("global_step", 0)))

    @property
    def recent_loss(self) -> float | None:
        recent = self.losses.recent()
        return sum(recent) / len(recent) if recent else None


class ExpertModule(_Base):
    """Flow matching on one partition: regress the path's velocity with MSE.

    ``target`` (``ddm.flow.PREDICTIONS``): what the network regresses, the velocity,
    or the noise ``eps`` or the clean ``x0`` (the same draws of t and eps, the MSE
    to that quantity instead). The sampler converts the latter two to velocities
    (``ddm.models.prediction``).
    """

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
        nan_check_every: int = 10,
        compile: bool = False,
        text: dict | None = None,
        target: str = "velocity",
        betas: tuple[float, float] = ADAMW_BETAS,
    ):
        super().__init__(f"expert {expert_id}", flow, nan_check_every)
        adamw_betas(betas)  # a bad setting fails before the job starts, not when the optimizer is built
        self.save_hyperparameters()
        self.target = check_prediction(target)
        self.net = DiT(**model)
        self.ema = make_ema(self.net)

    def training_step(self, batch, batch_idx):
        x0 = batch_to_model_space_on_device(batch[0])
        y = self.conditioning(batch[1], batch[2] if len(batch) > 2 else None)
        # (t, eps) first, then the label dropout: one fixed order of draws, whatever the target
        point = self.path.noised(x0, prediction=self.target)
        loss = self.path.loss_at(self.net, point, self.drop_labels(y)).mean()
        self.watch(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
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
        It predicts ``target``; ``velocity_model`` is what a sampler integrates.
        """
        return self.ema

    def velocity_model(self, net: torch.nn.Module | None = None) -> torch.nn.Module:
        """``net`` (default ``export_net``) as a velocity model: itself, or converted from ``target``."""
        return as_velocity_model(self.export_net if net is None else net, self.target, self.path)


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
        nan_check_every: int = 10,
        compile: bool = False,
        text: dict | None = None,
        betas: tuple[float, float] = ADAMW_BETAS,
    ):
        super().__init__("router", flow, nan_check_every)
        adamw_betas(betas)
        self.save_hyperparameters()
        self.net = DiTClassifier(**model)

    def training_step(self, batch, batch_idx):
        x0, k = batch_to_model_space_on_device(batch[0]), batch[2]
        y = self.conditioning(batch[1], batch[3] if len(batch) > 3 else None)
        point = self.path.noised(x0)
        logits = self.net(point.x_t, point.t, self.drop_labels(y))
        loss = F.cross_entropy(logits.float(), k)
        self.watch(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(k))
        self.log("train/acc", (logits.argmax(1) == k).float().mean(), batch_size=len(k))
        return loss

    @property
    def export_net(self) -> DiTClassifier:
        """The network a finished router exports: the trained classifier itself (no EMA)."""
        return self.net
