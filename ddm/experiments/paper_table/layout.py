"""Where each step of the table works, and the settings its stages see.

Layout of the table's folder (``run_dir``)::

    data-run/                   prepare + embed, once (every other folder links to its data)
    clusterings/<config>/       cluster + partition of one configuration (a mixed-kind DDM uses its K's)
    runs/<config>-s<budget>/    experts/, router/, evaluation/ of one configuration at one budget
                                (data, embeddings, clusters and partitions are links)
    table.md  results.json  train_flops.png  sampling_flops.png  timings.json
"""

from __future__ import annotations

import os
from pathlib import Path

from ddm.errors import UserError
from ddm.settings import Settings, changed

from .grid import Config, Run


class NotALink(UserError, FileExistsError):
    """A path of the table's folder that should link to shared artefacts is a real file or folder."""


def derive(cfg: Settings, **changes) -> Settings:
    """A copy of ``cfg`` with dotted keys replaced, e.g. ``derive(cfg, **{"cluster.k": 4})``."""
    return changed(cfg, changes)


def data_dir(cfg: Settings) -> Path:
    return Path(cfg.run_dir) / "data-run"


def clustering_dir(cfg: Settings, config: Config) -> Path:
    return Path(cfg.run_dir) / "clusterings" / config.clustering


def data_cfg(cfg: Settings) -> Settings:
    """The settings of prepare and embed: the whole dataset, once, in ``data-run/``."""
    return derive(cfg, run_dir=str(data_dir(cfg)))


def clustering_cfg(cfg: Settings, config: Config) -> Settings:
    """The settings of cluster and partition for one configuration."""
    return derive(
        cfg, run_dir=str(clustering_dir(cfg, config)), **{"cluster.method": config.method, "cluster.k": config.k}
    )


def run_cfg(cfg: Settings, r: Run) -> Settings:
    """The settings every stage of run ``r`` sees."""
    return derive(
        clustering_cfg(cfg, r.config),
        run_dir=str(r.folder),
        **{
            "expert.batch_size": r.expert_batch,
            "expert.steps": r.expert_steps,
            "router.steps": max(1, r.router_steps),
            "eval.strategies": list(r.strategies),
            "eval.fm_loss.strategies": list(r.strategies),
            "sample.experts": None,
        },
    )


def link(target: Path, path: Path) -> None:
    """A relative symlink ``path -> target`` (kept when it already points there)."""
    rel = os.path.relpath(target, path.parent)
    if path.is_symlink():
        if os.readlink(path) == rel:
            return
        path.unlink()
    elif path.exists():
        raise NotALink(f"{path} exists and is not a link to {target}: remove it or use another run_dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(rel, path)
