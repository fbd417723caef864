"""``ddm <stage> --help``: the config groups a stage reads, their options, and the keys with their comments.

Read straight from ``conf/``: the yaml comments are the documentation of every
option, so the help cannot drift from the config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddm.stages import STAGES


def default_options(conf_dir: Path) -> dict[str, str]:
    """``group -> default option`` from the defaults list of ``config.yaml``."""
    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    return {k: str(v) for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def top_level_keys(conf_dir: Path) -> list[str]:
    """The keys ``config.yaml`` sets itself (``name``, ``seed``, ``flow.*``, ...), Hydra's own left out."""
    root = yaml.safe_load((conf_dir / "config.yaml").read_text())
    keys = [k for k in root if k not in ("defaults", "hydra")]
    return [f"{k}.*" if isinstance(root[k], dict) else k for k in keys]


def top_level_block(conf_dir: Path, key: str) -> str | None:
    """The lines of ``config.yaml`` that set ``key:`` (with the comments just above it), up to a blank line."""
    lines = (conf_dir / "config.yaml").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{key}:")), None)
    if start is None:
        return None
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def group_options(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def stage_help(stage: str, conf_dir: Path) -> str:
    info = STAGES[stage]
    defaults = default_options(conf_dir)
    lines = [f"usage: ddm {stage} [key=value ...]", "", f"{info.summary}.", ""]
    if info.groups:
        lines += ["config groups it reads (choose an option with group=option, change a key with group.key=value):"]
        width = max(len(g) for g in info.groups)
        for g in info.groups:
            options = ", ".join(f"{o} (default)" if o == defaults.get(g) else o for o in group_options(conf_dir, g))
            lines.append(f"  {g.ljust(width)}  {options}")
        lines.append("")
        for g in info.groups:
            default = conf_dir / g / f"{defaults.get(g)}.yaml"
            if default.exists():
                lines += [f"--- {g}={defaults[g]} ({default}) ---", default.read_text().rstrip(), ""]
    own = top_level_block(conf_dir, stage)  # `submit:` lives in config.yaml itself
    if own:
        lines += [f"--- {stage}.* ({conf_dir / 'config.yaml'}) ---", own, ""]
    other = [g for g in defaults if g not in info.groups and g not in ("experiment", "_self_")]
    lines += [
        f"other groups: {', '.join(other)}; top-level keys: {', '.join(top_level_keys(conf_dir))}; "
        f"presets: experiment=<name> ({', '.join(group_options(conf_dir, 'experiment'))}).",
        f"`ddm {stage} --cfg job` prints the whole composed config; `--hydra-help` Hydra's own flags.",
    ]
    return "\n".join(lines)
