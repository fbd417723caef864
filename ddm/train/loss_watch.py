"""The training loss and gradients kept on the device: checked for NaN/inf every few steps, not every step.

Reading a loss on the host (``loss.item()``, ``if not torch.isfinite(loss)``)
waits for the device to finish the step, so a check every step keeps a GPU
idle while the host launches the next one. ``LossWatch`` records each step's
loss, and the first step whose loss or whose gradients were not finite, in
device tensors, and reads them on the host only every ``every`` steps, before a
checkpoint and at the end: one wait per ``every`` steps, and the step that
diverged is still named exactly. Under data parallelism the ranks agree on the
decision, so all stop together rather than one waiting forever in the next
all-reduce.

The gradients are watched as well as the loss because a finite loss can still
give non-finite gradients (an overflow in the backward pass): gradient-norm
clipping does not raise on them, the optimizer writes them into the weights and
the EMA, and only a later step's loss would show it, after a checkpoint of the
poisoned weights was saved. A check before every checkpoint covers both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ddm.errors import Diverged

RECENT = 20  # losses kept for the record's final_loss


def local_gradients(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The gradients this rank holds: a sharded (DTensor) gradient's local slice, which every rank checks."""
    grads = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g
        if g.numel():  # FSDP shards on dim 0: a rank beyond a small parameter's rows holds an empty slice
            grads.append(g)
    return grads


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: every value of every tensor is finite. No host sync.

    One max-norm per tensor (fused where torch can), then one reduction: a NaN or
    inf anywhere makes its tensor's max |value| NaN or inf, while finite values,
    however large, never overflow a max the way a sum of squares would.
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    inf = float("inf")
    if len({(t.device, t.dtype) for t in tensors}) == 1:
        norms = torch._foreach_norm(tensors, inf)
    else:
        norms = [torch.linalg.vector_norm(t, inf) for t in tensors]
    return torch.stack([n.float() for n in norms]).isfinite().all()


class LossWatch:
    """Losses and gradient health of one job, on the device they were computed on."""

    def __init__(self, what: str, every: int = 10):
        if int(every) < 1:
            raise ValueError(f"{what}: the NaN check interval must be at least 1 step, got {every}")
        self.what, self.every = what, int(every)
        self._first_bad: torch.Tensor | None = None  # step of the first non-finite loss, -1 while none
        self._first_bad_grad: torch.Tensor | None = None  # step of the first non-finite gradient, -1 while none
        self._recent: torch.Tensor | None = None  # ring of the last RECENT step losses
        self._seen = 0  # how many ring slots hold a loss
        self._checked_at = 0  # the step the last check covered up to
        self._restored: list[float] = []  # losses carried over from a checkpoint

    def _ensure(self, device: torch.device) -> None:
        if self._first_bad is None or self._first_bad.device != device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
            self._first_bad_grad = torch.full((), -1, dtype=torch.long, device=device)
            self._recent = torch.zeros(RECENT, device=device)

    @staticmethod
    def _mark(first: torch.Tensor, bad: torch.Tensor, step: int) -> torch.Tensor:
        # new_full fills on the device: no host-to-device copy of `step`, so no wait
        return torch.where(bad & (first < 0), first.new_full((), step), first)

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Record the loss of optimizer step ``step`` (called once per micro-batch); no host sync."""
        loss = loss.detach().float()
        self._ensure(loss.device)
        self._first_bad = self._mark(self._first_bad, ~torch.isfinite(loss), step)
        self._recent[step % RECENT] = loss
        self._seen = min(RECENT, self._seen + 1)

    def add_gradients(self, grads: list[torch.Tensor], step: int) -> None:
        """Record whether the gradients about to be applied at optimizer step ``step`` are finite; no host sync."""
        if not grads:
            return
        self._ensure(grads[0].device)
        finite = all_finite(grads).to(self._first_bad_grad.device)
        self._first_bad_grad = self._mark(self._first_bad_grad, ~finite, step)

    def due(self, step: int) -> bool:
        return step - self._checked_at >= self.every

    def check(self, step: int, strategy=None) -> None:
        """Raise ``Diverged`` if any loss or gradient up to ``step`` was not finite (on any rank with ``strategy``).

        With a ``strategy`` of several ranks, one all-reduce (min) of the two first-bad steps: every rank
        stops together and names the same, earliest step, also where only some ranks saw it (under FSDP a
        non-finite gradient may sit in the shards of a few ranks only).
        """
        if self._first_bad is None:
            firsts = torch.full((2,), -1, dtype=torch.long)
        else:
            firsts = torch.stack([self._first_bad, self._first_bad_grad])
        if strategy is not None and strategy.world_size > 1:
            firsts = _earliest_over_ranks(firsts, strategy)
        first_loss, first_grad = firsts.tolist()  # the one host sync
        self._checked_at = step
        if first_loss < 0 and first_grad < 0:
            return
        todo = "Lower the learning rate, set a grad_clip, check the input data for NaNs, or resume from an earlier "
        todo += "checkpoint."
        if first_grad >= 0 and (first_loss < 0 or first_grad < first_loss):
            # the gradients of this step went bad while its loss was still finite
            raise Diverged(
                f"{self.what}: the gradients are not finite at step {first_grad} (the loss was finite there); "
                f"training stopped before a checkpoint of those weights was saved. {todo}",
                step=first_grad,
            )
        value = self._loss_at(first_loss)
        what = f"{value}" if not math.isfinite(value) else f"not finite on another rank ({value} on this one)"
        raise Diverged(
            f"{self.what}: the loss is {what} at step {first_loss}; training stopped. {todo}", step=first_loss
        )

    def _loss_at(self, step: int) -> float:
        """This rank's recorded loss at ``step`` (from the ring of the last ``RECENT`` steps)."""
        return float(self._recent[step % RECENT]) if self._recent is not None else float("nan")

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


def _earliest_over_ranks(firsts: torch.Tensor, strategy) -> torch.Tensor:
    """Each first-bad step, the earliest over every rank (-1 where no rank saw one): one all-reduce."""
    import torch.distributed as dist

    never = torch.iinfo(torch.long).max
    on_device = firsts.to(strategy.root_device)
    on_device = torch.where(on_device < 0, torch.full_like(on_device, never), on_device)
    dist.all_reduce(on_device, op=dist.ReduceOp.MIN)
    return torch.where(on_device == never, torch.full_like(on_device, -1), on_device).cpu()
