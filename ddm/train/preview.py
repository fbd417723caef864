"""A small sample grid from an expert's EMA every few steps: what people look at while a job trains.

Every ``every`` optimizer steps (``expert.preview_every``) the EMA weights
sample the same grid: fixed noise, fixed labels (or prompts), a few Euler
steps. The grid goes to ``<job>/previews/step-NNNNNNN.png`` and, where the
logger shows images, to it (wandb: ``log_image``; TensorBoard: ``add_image``);
the csv logger keeps the files only. Every rank takes part in the sampling
(under FSDP the EMA's forward pass gathers shards on all ranks), and global
rank 0 writes. The noise comes from its own generator, so a preview changes
no training draw.

``EveryNSteps`` (when a preview is due) and ``show_image`` (the logger's
image call) serve the router's preview too (``ddm.train.router_preview``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ddm.images import to_uint8
from ddm.sampling.solvers import check_cfg_interval, sample
from ddm.viz import save_grid

log = logging.getLogger("ddm")


def island_autocast(pl_module) -> torch.dtype | None:
    """The dtype the island's training steps autocast to (``bf16-mixed``: bfloat16), None for full precision.

    Lightning runs ``training_step`` under its precision plugin's autocast, but not callbacks. Under
    ``bf16-mixed`` an FSDP island gathers its weights in bf16 (``ddm.train.fsdp``), so a preview's network
    called outside autocast would meet fp32 inputs with bf16 weights: previews run under this dtype.
    """
    trainer = getattr(pl_module, "_trainer", None)  # None: a module outside any Trainer
    precision = str(getattr(getattr(trainer, "precision_plugin", None), "precision", "")) if trainer else ""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


class EveryNSteps(Callback, ABC):
    """Call ``write(trainer, pl_module, step)`` after every ``every``-th optimizer step.

    The decision reads ``trainer.global_step`` only (no host sync), the same on
    every rank, so every rank takes part in a preview or none does. A step is
    written once: not again for the later micro-batches of gradient
    accumulation, and never for the step an attempt starts or resumes at (its
    weights were trained by an earlier attempt, or not at all).
    """

    def __init__(self, every: int):
        if int(every) < 1:
            raise ValueError(f"preview interval must be at least 1 step, got {every}")
        self.every = int(every)
        self._seen_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step  # 0, or the step resumed at: nothing new to show yet

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step or step % self.every:  # mid accumulation, or not a preview step
            return
        self._seen_step = step
        path = self.write(trainer, pl_module, step)
        if path is not None:
            log.info("preview: step %d -> %s", step, path)

    @abstractmethod
    def write(self, trainer, pl_module, step: int) -> Path | None:
        """Make the preview (on every rank); on global rank 0 write it and return its file."""


class Preview(EveryNSteps):
    """Sample ``len(rows) x per_row`` images from ``pl_module.export_net`` every ``every`` steps.

    ``condition(pl_module)`` gives the grid's ``y`` (labels, a ``TextCondition``,
    or None), one per image, row by row; ``rows`` label the grid's rows;
    ``decode`` turns latents into images (latent runs), None for pixels.
    """

    def __init__(
        self,
        every: int,
        folder: Path,
        shape: tuple[int, int, int],
        rows: list[str] | None,
        per_row: int,
        condition: Callable,
        steps: int = 10,
        cfg_scale: float = 1.0,
        seed: int = 0,
        decode: Callable | None = None,
        cfg_interval=None,
    ):
        super().__init__(every)
        # checked now, so a bad value fails before training rather than at the first preview
        self.cfg_interval = check_cfg_interval(cfg_interval)
        self.folder, self.shape = Path(folder), tuple(shape)
        self.rows, self.per_row, self.condition = rows, int(per_row), condition
        self.steps, self.cfg_scale, self.seed, self.decode = int(steps), float(cfg_scale), int(seed), decode

    @property
    def num_images(self) -> int:
        return (len(self.rows) if self.rows else self.per_row) * self.per_row

    @torch.no_grad()
    def grid(self, pl_module) -> np.ndarray:
        """The preview images, uint8, from the module's current EMA weights."""
        net = pl_module.export_net
        was_training = net.training
        net.eval()
        device = pl_module.device
        noise = torch.Generator().manual_seed(self.seed)  # fixed: the same grid at every step
        # an expert that predicts eps or x0 is sampled through its conversion to velocity
        velocity = pl_module.velocity_model(net) if hasattr(pl_module, "velocity_model") else net
        try:
            x = sample(
                velocity,
                pl_module.path,
                (self.num_images, *self.shape),
                y=self.condition(pl_module),
                steps=self.steps,
                cfg_scale=self.cfg_scale,
                cfg_interval=self.cfg_interval,
                generator=noise,
                device=device,
                # the island's autocast: an FSDP island gathers bf16 weights under bf16-mixed (the sampler sets
                # its own autocast around each model call, so an outer one would not reach them)
                autocast=island_autocast(pl_module),
            )
        finally:
            net.train(was_training)
        return to_uint8(x if self.decode is None else self.decode(x))

    def write(self, trainer, pl_module, step: int) -> Path | None:
        images = self.grid(pl_module)  # every rank: a sharded EMA needs all of them
        if not trainer.is_global_zero:
            return None
        path = self.folder / f"step-{step:07d}.png"
        picture = save_grid(images, self.per_row, path, row_labels=self.rows)
        show_image(trainer.logger, picture, step)
        return path


def show_image(logger, picture: np.ndarray, step: int, key: str = "preview") -> None:
    """Show a picture (uint8 HW or HWC) where the logger can: wandb and TensorBoard take images; csv keeps the
    file only."""
    if logger is None:
        return
    name = type(logger).__name__
    if name == "WandbLogger":
        logger.log_image(key=key, images=[picture], step=step)
    elif name == "TensorBoardLogger":
        logger.experiment.add_image(key, picture, step, dataformats="HWC" if picture.ndim == 3 else "HW")
