"""The settings the config files declare, and the check of a composed config against them, at the door.

Hydra refuses ``sample.stepz=5`` (no such key), but it adds ``+sample.stepz=5``
and an experiment file's ``sample.stepz`` without a word, and the stages never
read them: a typo that silently changes nothing. ``check_config`` refuses such a
key in one line that names it and the settings its group does have.

What is declared: every key of ``conf/config.yaml`` and of every option file of
every config group (``conf/<group>/<option>.yaml``, under the group's name),
and, for namespaces no group declares (the paper table's ``paper:``), the keys
experiment files give them. An experiment may set declared keys, not invent
keys inside a group.

Value types are not checked here: the files' defaults do not tell them (``null``
means "off" or "all" for many keys, ``auto`` is a value of integer keys such as
``pipeline.parallel``); each stage checks the values it reads and names the key.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from ddm.errors import BadInput

SKIPPED = ("hydra",)  # Hydra's own settings: Hydra checks them


def _walk(node, prefix: str = ""):
    """(dotted key, value) of every key in a nested dict, parents before children; lists are values."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "defaults" and not prefix:
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        yield path, value
        yield from _walk(value, path)


@functools.lru_cache(maxsize=4)
def declared(conf_dir: str) -> frozenset[str]:
    """Every key (dotted) the config files under ``conf_dir`` declare, groups included."""
    conf = Path(conf_dir)
    found: set[str] = set()
    found.update(key for key, _ in _walk(yaml.safe_load((conf / "config.yaml").read_text()) or {}))
    groups = sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "experiment")
    for group in groups:
        found.add(group.name)
        for option in sorted(group.glob("*.yaml")):
            found.update(key for key, _ in _walk(yaml.safe_load(option.read_text()) or {}, group.name))
    # namespaces of their own that only experiment files give (scripts' settings, e.g. the paper table's)
    experiments = [yaml.safe_load(p.read_text()) or {} for p in sorted((conf / "experiment").glob("*.yaml"))]
    own = {top for tree in experiments for top in tree if top != "defaults" and top not in found}
    for tree in experiments:
        found.update(key for key, _ in _walk({top: value for top, value in tree.items() if top in own}))
    return frozenset(found)


def _siblings(key: str, known: dict) -> str:
    parent = key.rpartition(".")[0]
    depth = key.count(".")
    names = sorted(k.rpartition(".")[2] for k in known if k.count(".") == depth and k.rpartition(".")[0] == parent)
    where = f"{parent}'s settings" if parent else "the top-level settings and groups"
    return f"{where}: {', '.join(names)}"


def check_config(cfg, conf_dir: str | Path) -> None:
    """Refuse a key that no config file declares (``BadInput`` naming it and its group's settings).

    Reads the composed config without resolving it: interpolations and mandatory values (``???``)
    are the stages' to resolve, where a missing one is reported by name (``ddm.cli``).
    """
    known = declared(str(conf_dir))
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    for key, _ in _walk(tree):
        if key.split(".")[0] in SKIPPED:
            continue
        if key not in known:
            raise BadInput(
                f"{key} is not a setting ({_siblings(key, known)}): check its spelling; `ddm <stage> --help` "
                f"lists every group and key"
            )
