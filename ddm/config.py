"""Config access without the command line: compose the same Hydra config, and the typed settings made from it,
in tests and notebooks."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from ddm.settings import Settings, from_values
from ddm.store.objects import working_copy_path

# ${local_run_dir:${run_dir},${store.cache}}: the run directory on this machine, the working copy of a run in a
# bucket (Hydra's own logs go there, not into a folder named "s3:")
OmegaConf.register_new_resolver(
    "local_run_dir", lambda run_dir, cache: str(working_copy_path(run_dir, cache)), replace=True
)

# What composing raises for a bad override or option (Hydra's own errors): the command line prints them on one line.
CONFIG_ERRORS = (CompactHydraException,)

# conf/ sits beside the package in a checkout; DDM_CONF_DIR points elsewhere.
CONF_DIR = Path(os.environ.get("DDM_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, exactly as the CLI would (unknown keys refused)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ddm.config_check import check_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    check_config(cfg, CONF_DIR)  # as the command line does: a key no config file declares is refused
    return cfg


def to_settings(cfg: DictConfig) -> Settings:
    """The typed settings of a composed config: interpolations resolved, each value checked against its type.

    A mandatory value (``???``) nobody gave stays unset and is refused where a stage reads it.
    """
    return from_values(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def settings(overrides: list[str] | None = None) -> Settings:
    """``compose`` then ``to_settings``: what every ``ddm`` command hands its stage."""
    return to_settings(compose(overrides))
