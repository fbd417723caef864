"""Errors a user can fix: bad input, a missing artefact, a diverged job.

The command line prints their message alone, on one line, and exits with
status 2; every other exception is a bug and keeps its traceback
(``HYDRA_FULL_ERROR=1`` or ``debug=true`` shows the traceback for these too).
Each class also derives from the built-in exception a caller would expect
(``ValueError``, ``FileNotFoundError``, ...), so library code can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error whose message names the input and says what to do."""


class BadInput(UserError, ValueError):
    """A config value, file or dataset that cannot be used as given."""


class MissingInput(UserError, FileNotFoundError):
    """An artefact or file that a stage needs does not exist yet."""


class MissingConfig(UserError, KeyError):
    """A config group or key that a stage needs is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Diverged(UserError, FloatingPointError):
    """Training produced a non-finite loss; ``step`` is the step that did, when it is known."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Unusable(UserError, RuntimeError):
    """A file or resource that exists but cannot be used here (weights that do not fit, a hub offline)."""


class Locked(Unusable):
    """A job folder that another job holds (its ``lock.json`` names it): two jobs must not write one folder."""


class JobFailed(UserError, RuntimeError):
    """Jobs started by ``ddm`` on this machine that failed; each left its error in its own folder and log."""


def some_of(items, most: int = 10) -> str:
    """The first ``most`` of ``items`` for a message, comma-separated, `` ...`` when there are more."""
    items = list(items)
    return ", ".join(map(str, items[:most])) + (" ..." if len(items) > most else "")
