"""``ddm <stage> --help``: the config groups a stage reads, their options, and the keys with their comments.

Read straight from ``conf/``: the yaml comments are the documentation of every
option, so the help cannot drift from the config.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ddm.stages import STAGES

TOP_LEVEL = "name, run_dir, seed, redo, debug, log_level, flow.*"


def default_options(conf_dir: Path) -> dict[str, str]:
    """``group -> default option`` from the defaults list of ``config.yaml``."""
    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    return {k: str(v) for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


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
    other = [g for g in defaults if g not in info.groups and g not in ("experiment", "_self_")]
    lines += [
        f"other groups: {', '.join(other)}; top-level keys: {TOP_LEVEL}; presets: experiment=<name> "
        f"({', '.join(group_options(conf_dir, 'experiment'))}).",
        f"`ddm {stage} --cfg job` prints the whole composed config; `--hydra-help` Hydra's own flags.",
    ]
    return "\n".join(lines)
