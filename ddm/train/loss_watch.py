"""The training loss kept on the device: checked for NaN/inf every few steps, not every step.

Reading a loss on the host (``loss.item()``, ``if not torch.isfinite(loss)``)
waits for the device to finish the step, so a check every step keeps a GPU
idle while the host launches the next one. ``LossWatch`` records each step's
loss and the first step whose loss was not finite in device tensors, and reads
them on the host only every ``every`` steps, before a checkpoint and at the
end: one wait per ``every`` steps, and the step that diverged is still named
exactly. Under data parallelism the ranks agree on the decision, so all stop
together rather than one waiting forever in the next all-reduce.
"""

from __future__ import annotations

import math

import torch

from ddm.errors import Diverged

RECENT = 20  # losses kept for the record's final_loss


class LossWatch:
    """Losses of one job, on the device they were computed on."""

    def __init__(self, what: str, every: int = 10):
        if int(every) < 1:
            raise ValueError(f"{what}: the NaN check interval must be at least 1 step, got {every}")
        self.what, self.every = what, int(every)
        self._first_bad: torch.Tensor | None = None  # step of the first non-finite loss, -1 while none
        self._recent: torch.Tensor | None = None  # ring of the last RECENT step losses
        self._seen = 0  # how many ring slots hold a loss
        self._checked_at = 0  # the step the last check covered up to
        self._restored: list[float] = []  # losses carried over from a checkpoint

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Record the loss of optimizer step ``step`` (called once per micro-batch); no host sync."""
        loss = loss.detach().float()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._recent = torch.zeros(RECENT, device=loss.device)
        bad = ~torch.isfinite(loss)
        # new_full fills on the device: no host-to-device copy of `step`, so no wait
        self._first_bad = torch.where(bad & (self._first_bad < 0), self._first_bad.new_full((), step), self._first_bad)
        self._recent[step % RECENT] = loss
        self._seen = min(RECENT, self._seen + 1)

    def due(self, step: int) -> bool:
        return step - self._checked_at >= self.every

    def check(self, step: int, strategy=None) -> None:
        """Raise ``Diverged`` if any loss up to ``step`` was not finite (on any rank when ``strategy`` is given)."""
        first = -1 if self._first_bad is None else int(self._first_bad)  # the one host sync
        bad = first >= 0
        if strategy is not None:
            bad = bool(strategy.reduce_boolean_decision(bad, all=False))
        since, self._checked_at = self._checked_at, step
        if not bad:
            return
        where = f"at step {first}" if first >= 0 else f"on another rank, between step {since} and step {step}"
        value = float(self._recent[first % RECENT]) if first >= 0 else float("nan")
        raise Diverged(
            f"{self.what}: the loss is {value} {where}; training stopped. Lower the learning rate, "
            f"check the input data for NaNs, or resume from an earlier checkpoint.",
            step=first if first >= 0 else None,
        )

    def recent(self) -> list[float]:
        """The last losses, in no particular order (a host sync: for checkpoints and the record, not every step)."""
        if self._recent is None or self._seen == 0:
            return list(self._restored)
        values = [v for v in self._recent.tolist()[: self._seen] if math.isfinite(v)]
        return (self._restored + values)[-RECENT:]

    def restore(self, losses: list[float], step: int) -> None:
        """Continue from a checkpoint: its recent losses count toward the record, checks resume from ``step``."""
        self._restored = [float(v) for v in losses][-RECENT:]
        self._checked_at = step
