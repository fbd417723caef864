"""A tiny open_clip model (random weights) registered from a local config file, for text-conditioning tests."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "ddm-tiny-text"
CONFIG = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)


def register_tiny_text_model(folder: Path) -> str:
    """Write the config to ``folder/<NAME>.json``, register it with open_clip and return the model's name."""
    import open_clip

    path = Path(folder) / f"{NAME}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    return NAME
