"""What can be checked of the Dockerfile without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def test_every_copied_path_exists():
    copied = [src for line in DOCKERFILE.splitlines() if line.startswith("COPY") for src in line.split()[1:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_install_commands_are_the_documented_ones():
    makefile = (ROOT / "Makefile").read_text()
    readme = (ROOT / "docker" / "README.md").read_text()
    for pin in re.findall(r"pip install (torch==\S+ torchvision==\S+)", DOCKERFILE):
        assert pin in makefile and pin in readme
    assert "pip install -e '.[cluster]'" in DOCKERFILE


def test_entry_point_is_the_cli():
    assert 'ENTRYPOINT ["ddm"]' in DOCKERFILE
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ddm"] == "ddm.cli:main"
