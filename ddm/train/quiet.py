"""A training log a person can read: Lightning's notices that say nothing about this job are left out.

Without this, every job's log (a SLURM log file, a terminal) opens with
Lightning's start-up banners (GPU/TPU/HPU available, a "Tip", LOCAL_RANK and
process-group lines), each printed twice (once by Lightning's own handler, once
by the root logger Hydra set up), and deprecation warnings about Lightning's
own calls into torch, which a user can do nothing about. ``quiet_lightning``
is called whenever a trainer is built (``ddm.train.trainer.build_trainer``).

With ``log_level=DEBUG`` Lightning's INFO lines stay.
"""

from __future__ import annotations

import logging
import warnings

# Lightning sets INFO on each of these itself, so each needs its own level.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")

# Warnings that are expected in every ddm job, matched at the start of their message.
EXPECTED_WARNINGS = (
    # An expert keeps its EMA copy in eval mode on purpose: it is never trained, only averaged into.
    r"Found \d+ module\(s\) in eval mode",
    # ddm submits its own SLURM jobs (`ddm submit`); a job started without srun on a node that has it is meant.
    r"The `srun` command is available on your system but is not used",
    # A resumed job saves into the folder it resumed from; the job's log already says "resuming from".
    r"Checkpoint directory .* exists and is not empty",
)


def quiet_lightning() -> None:
    """Silence Lightning's deprecation notices and expected warnings; its INFO banners go to WARNING.

    Safe to call again: an identical warnings filter replaces the earlier one.
    """
    from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=LightningDeprecationWarning)
    # torch's deprecation notices about calls that Lightning's own code makes (e.g. its pytree helpers)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"lightning(\.|$)")
    if not logging.getLogger("ddm").isEnabledFor(logging.DEBUG):
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    _print_once()


def _print_once() -> None:
    """Lightning's messages once, not twice, when the root logger (Hydra's, a user's) has handlers.

    Lightning adds a console handler to its ``lightning`` logger and lets its
    records propagate to the root too; with handlers at the root, that one
    prints them (and Hydra's also writes them to its log file under the run).
    """
    if not logging.getLogger().handlers:
        return
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)
