"""Random streams of a training job that differ across ranks and continue across resumes.

The job is seeded once before its module is built, so every rank starts from
the same initial weights. If nothing more were done, every DDP/FSDP rank would
then draw the same t, noise and label-dropout mask (a global batch of W ranks
would hold only B/W distinct draws), and a resumed job would draw again what
it drew after step 0. ``RankStreams`` reseeds Python, NumPy and torch when
training starts, that is after the process group is up and a checkpoint is
restored, from (the job's seed, the global rank, the global step).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ddm.seeds import seed_everything, stream_seed


class RankStreams(Callback):
    """At train start: reseed every generator from (job seed, global rank, global step)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer, pl_module) -> None:
        seed_everything(stream_seed(self.seed, trainer.global_rank, trainer.global_step))
