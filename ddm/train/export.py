"""Plain-PyTorch artefacts of a finished job (expert.pt, router.pt): what sampling loads.

They hold the network's constructor arguments, its weights, the flow path and
the clustering id, so a notebook can rebuild the model without Lightning or Hydra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddm.io import atomic_path


def save_weights(path: Path, kind: str, net: torch.nn.Module, flow: dict, **meta) -> None:
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = dict(kind=kind, model_config=net.config(), state_dict=state, flow=dict(flow), **meta)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
