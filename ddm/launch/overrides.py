"""Which Hydra overrides given to ``ddm submit`` (or ``ddm pipeline``) travel to the jobs it starts.

A job must compose the same config as the ``ddm submit`` call that made it,
so every override passes through, except those the job sets itself (the
expert id, a stage's part or the cluster to encode, from the array task), those that belong to ``submit`` or
``pipeline`` alone, and
the run's location, which is passed once, resolved to an absolute path, so a
job on another node or in another working directory finds the same run.
"""

from __future__ import annotations

import re

# Keys whose overrides never reach a job. `redo` is refused earlier (see ddm.stages.submit).
DROPPED = (
    "submit",
    "pipeline",
    "expert.id",
    "data.part",
    "embed.part",
    "cluster.partition_part",
    "vae.clusters",
    "name",
    "run_dir",
    "hydra",
)
_SAFE_VALUE = re.compile(r"[\w./@+:-]*")


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``; ``~a`` -> ``a``; ``island=gpu`` -> ``island``."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def is_dropped(override: str) -> bool:
    key = override_key(override)
    return any(key == d or key.startswith(d + ".") for d in DROPPED)


def hydra_value(value: str) -> str:
    """A value as a Hydra override writes it: bare when plain, else single-quoted."""
    if _SAFE_VALUE.fullmatch(value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def job_overrides(user_overrides: list[str], run_name: str, run_dir: str) -> list[str]:
    """The overrides a job is started with: ``name`` and the absolute ``run_dir`` first, then the user's."""
    kept = [o for o in user_overrides if not is_dropped(o)]
    return [f"name={hydra_value(run_name)}", f"run_dir={hydra_value(run_dir)}", *kept]
