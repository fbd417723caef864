"""Training throughput of one expert network: step time, images/s, peak memory, TFLOP/s and MFU.

The step measured is the one ``ddm train-expert`` runs: an ``ExpertModule``
fitted by Lightning's Trainer (its optimizer, autocast and loss), fed an
in-memory stream of random batches so the data loader is not what is timed.
The first ``warmup`` steps (allocation, autotuning, ``torch.compile``) are
left out; the clock is read after synchronising the device.

FLOPs per step are 3 x the forward FLOPs of the batch counted by
``ddm.eval.flops.count_flops`` (a multiply-add is 2 FLOPs); MFU divides the
achieved rate by the device's dense bf16 peak (``BF16_PEAK_TFLOPS``, or the
peak the caller gives).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ddm.eval.flops import count_flops
from ddm.models.dit import count_params
from ddm.train.modules import ExpertModule
from ddm.train.quiet import quiet_lightning

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order: the first match wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name, or None when it is not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


@dataclass
class Throughput:
    size: str
    input_shape: tuple[int, int, int]
    batch: int
    precision: str
    compiled: bool
    params: int
    flops_per_step: float  # 3 x forward FLOPs of one batch
    step_s: float  # mean over the measured steps
    peak_memory_bytes: int  # CUDA: max allocated; CPU: the process's peak resident set
    device: str
    peak_tflops: float | None  # the device's bf16 peak, when known (GPUs)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def tflops(self) -> float:
        return self.flops_per_step / self.step_s / 1e12

    @property
    def mfu(self) -> float | None:
        return None if not self.peak_tflops else self.tflops / self.peak_tflops


class _StepClock(Callback):
    """Wall time from the end of the ``warmup``-th optimizer step to the end of the last."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = None

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = self._now(trainer)
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        if trainer.global_step == trainer.max_steps:
            self.end = self._now(trainer)


class _RandomBatches(torch.utils.data.IterableDataset):
    """Endless batches of random pixels (uint8) or latents (float), made once and repeated."""

    def __init__(self, shape, batch: int, num_classes: int, latent: bool):
        g = torch.Generator().manual_seed(0)
        if latent:
            self.x = torch.randn(batch, *shape, generator=g)
        else:
            self.x = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
        self.y = torch.randint(0, max(1, num_classes), (batch,), generator=g)

    def __iter__(self):
        while True:
            yield self.x, self.y


def measure(
    size: str,
    image_size: int,
    channels: int,
    batch: int,
    num_classes: int = 10,
    steps: int = 20,
    warmup: int = 5,
    precision: str = "auto",
    compile: bool = False,
    accelerator: str = "auto",
    peak_tflops: float | None = None,
) -> Throughput:
    """Train ``size`` for ``warmup + steps`` optimizer steps on one device and time the last ``steps``."""
    quiet_lightning()
    cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if precision == "auto":
        precision = "bf16-mixed" if cuda else "32-true"
    if cuda:
        torch.set_float32_matmul_precision("high")
    model = dict(size=size, image_size=image_size, in_channels=channels, num_classes=num_classes)
    module = ExpertModule(model=model, flow={}, warmup_steps=1, total_steps=warmup + steps, compile=compile)
    shape = (channels, image_size, image_size)
    x = torch.zeros(1, *shape)
    forward = count_flops(module.net, x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    clock = _StepClock(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=precision,
        max_steps=warmup + steps,
        logger=False,
        callbacks=[clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    data = _RandomBatches(shape, batch, num_classes, latent=channels > 3)
    loader = torch.utils.data.DataLoader(data, batch_size=None, pin_memory=cuda)
    trainer.fit(module, train_dataloaders=loader)
    device = trainer.strategy.root_device
    if device.type == "cuda":
        peak_mem, name = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_name(device)
        peak = peak_tflops or bf16_peak_tflops(name)
    else:
        peak_mem, name, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu", peak_tflops
    return Throughput(
        size=size,
        input_shape=shape,
        batch=batch,
        precision=precision,
        compiled=compile,
        params=count_params(module.net),
        flops_per_step=3.0 * forward * batch,
        step_s=(clock.end - clock.start) / steps,
        peak_memory_bytes=int(peak_mem),
        device=name,
        peak_tflops=peak,
    )
