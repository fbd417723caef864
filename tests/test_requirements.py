"""The training code names the torch and Lightning it needs, instead of failing deep in an FSDP import."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning
import pytest
import torch

from ddm.train import requirements


def test_versions_below_the_floors_are_named_with_the_version_needed():
    lines = requirements.too_old({"torch": "2.5.1+cu121", "lightning": "2.3.3"})
    assert lines[0].startswith("torch 2.5.1+cu121 is installed; ddm's training needs torch>=2.6")
    assert lines[1].startswith("lightning 2.3.3 is installed; ddm's training needs lightning>=2.4")
    # release candidates and local builds of the floor itself pass
    assert requirements.too_old({"torch": "2.6.0rc1", "lightning": "2.4.0.dev0"}) == []
    assert requirements.too_old({"torch": "2.14.1+cu130", "lightning": "2.6.6"}) == []


def test_importing_the_training_modules_on_an_old_torch_fails_with_the_version_to_install(monkeypatch):
    import ddm.train

    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(ImportError, match=r"torch 2\.4\.1 is installed.*torch>=2\.6.*pip install --upgrade"):
        importlib.reload(ddm.train)
    monkeypatch.setattr(torch, "__version__", "2.14.1")
    monkeypatch.setattr(lightning, "__version__", "2.2.0")
    with pytest.raises(ImportError, match=r"lightning>=2\.4"):
        importlib.reload(ddm.train)


def test_pyproject_states_the_same_floors():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for name, floor in requirements.FLOORS.items():
        assert f'"{name}>={floor}"' in text, name
