"""Random draws that belong to a sample's index, not to the batch or the job it was drawn in.

Sample ``i`` of a sampling run starts from the noise of its own generator, seeded with
``stream_seed(seed, i)``, and (the ``sample`` strategy) draws its experts from its own
stream seeded with ``stream_seed(routing_seed, i)``. So the images of a run are the
same whether one job draws them all or P jobs each draw a range: nothing a sample
gets depends on what else was drawn before it or beside it.

Plain PyTorch: the generators are CPU ones, so one seed gives the same draws on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddm.seeds import stream_seed


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, index))


def index_noise(path, seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The prior noise ``[len(indices), *shape]`` of samples ``indices``: row j from sample ``indices[j]``'s stream."""
    if not len(indices):
        return path.prior((0, *shape))
    return torch.cat([path.prior((1, *shape), generator=_generator(seed, i)) for i in indices])


class RowStreams:
    """One random stream per row of a batch, for the ``sample`` routing strategy.

    ``multinomial(probs)`` draws one expert per row from that row's own stream by the
    inverse of its cumulative distribution. A batch of ``m * n`` rows (guidance routed
    separately: the conditional rows, then the null-input rows) uses stream ``r % n``
    for row ``r``, so each sample's stream draws its conditional expert first, then
    its null input's.
    """

    def __init__(self, seed: int, indices: Sequence[int]):
        self.indices = [int(i) for i in indices]
        self._streams = [_generator(seed, i) for i in self.indices]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` expert indices, row r drawn from ``probs[r]`` with stream ``r % len(indices)``."""
        rows, n = probs.shape[0], len(self._streams)
        if n == 0 or rows % n:
            raise ValueError(f"RowStreams of {n} samples cannot draw for a batch of {rows} rows")
        u = torch.stack([torch.rand((), generator=self._streams[r % n], dtype=torch.float64) for r in range(rows)])
        p = probs.detach().to("cpu", torch.float64)
        # the first expert whose cumulative probability exceeds u: one of nonzero probability, always
        chosen = (p.cumsum(dim=-1) <= u[:, None]).sum(dim=-1)
        # a sum rounded under 1 may leave u above it: then the last expert of nonzero probability
        last = p.shape[-1] - 1 - (p > 0).flip(-1).to(torch.int64).argmax(dim=-1)
        return torch.minimum(chosen, last).view(-1, 1).to(probs.device)
