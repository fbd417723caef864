"""The oldest torch and Lightning the training code runs on, checked when ``ddm.train`` is imported.

The training modules import FSDP2 (``torch.distributed.fsdp.fully_shard`` and
``MixedPrecisionPolicy``, public in torch 2.6; DTensor, public in 2.5) and
Lightning's ``ModelParallelStrategy`` (Lightning 2.4). On an older stack those
imports fail deep inside ``ddm.train.fsdp`` with a bare ``ImportError`` that names
a symbol, not a version; this check names the version to install instead.
``pyproject.toml`` states the same floors.
"""

from __future__ import annotations

from packaging.version import Version

FLOORS = {"torch": "2.6", "lightning": "2.4"}
WHY = {
    "torch": "FSDP2's fully_shard and MixedPrecisionPolicy (torch.distributed.fsdp)",
    "lightning": "ModelParallelStrategy, which the fsdp island is built on",
}


def too_old(versions: dict[str, str]) -> list[str]:
    """One line per package in ``versions`` (name -> installed version) that is below its floor."""
    lines = []
    for name, floor in FLOORS.items():
        found = versions.get(name)
        if found is not None and Version(Version(found).base_version) < Version(floor):
            lines.append(f"{name} {found} is installed; ddm's training needs {name}>={floor} for {WHY[name]}")
    return lines


def check_training_stack() -> None:
    """Raise ``ImportError`` naming each package of the training stack that is too old, and how to upgrade."""
    import lightning
    import torch

    lines = too_old({"torch": torch.__version__, "lightning": lightning.__version__})
    if lines:
        wanted = " ".join(f"'{name}>={floor}'" for name, floor in FLOORS.items())
        raise ImportError("; ".join(lines) + f". Upgrade with: pip install --upgrade {wanted}")
