"""Every config option composes, and every option documents itself."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from ddm.config import CONF_DIR

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF_DIR / g).glob("*.yaml"))]
# Options whose required values (???) a user must supply.
REQUIRED = {
    ("data", "image_folder"): ["data.root=/tmp/images"],
    ("data", "webdataset"): ["data.urls='/tmp/shards/shard-{000000..000001}.tar'"],
    ("experiment", "imagenet256"): ["data.root=/tmp/imagenet/train"],
    ("experiment", "t2i"): ["data.urls='/tmp/laion/{000000..000001}.tar'"],
}


def test_config_groups_mirror_the_parts():
    assert set(GROUPS) >= {"data", "embed", "cluster", "model", "expert", "router", "sample", "island", "logger"}


def _leaves(node, prefix=()):
    """``(path, value)`` of every leaf of a plain dict (a list is one leaf)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix, node


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes_and_resolves(make_cfg, group, option):
    override = f"experiment={option}" if group == "experiment" else f"{group}={option}"
    required = REQUIRED.get((group, option), [])
    settings = make_cfg(override, *required)  # the typed settings: every value type-checked at the door
    resolved = settings.to_dict()
    assert "???" not in str(resolved), f"{override}: a mandatory value is unset"
    # the option chosen is the one composed: every value its file sets is the composed config's value
    # (an experiment's at the top level, its own `# @package _global_`; other options' under their group),
    # but for interpolations (resolved against the whole config) and the required values given above
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    own.pop("defaults", None)
    package = () if group == "experiment" else (group,)
    given = {o.split("=", 1)[0] for o in required} | {"run_dir"}
    checked = []
    for path, value in _leaves(own):
        key = ".".join((*package, *path))
        if key in given or (isinstance(value, str) and ("${" in value or value == "???")):
            continue
        got = resolved
        for part in (*package, *path):
            got = got[part]
        assert got == value, f"{override}: {key} composed as {got!r}, the option sets {value!r}"
        checked.append(key)
    assert checked, f"{override}: the option sets no value of its own to check"


@pytest.mark.parametrize("path", sorted(CONF_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_option_has_a_comment(path):
    """Each `key: value` line carries a trailing comment (or the comment line above it)."""
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[A-Za-z_][\w]*:\s*\S", line) or line.strip().startswith("#"):
            continue
        if path.parent.name == "experiment" or line.split(":")[0].strip() in ("defaults",):
            continue  # experiment files are override lists, documented at their top
        above = lines[i - 1].strip() if i else ""
        if "#" not in line and not above.startswith("#"):
            missing.append(line.strip())
    assert not missing, f"{path.name}: options without a comment: {missing}"
