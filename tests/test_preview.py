"""Preview grids while an expert trains: written every few steps, shown to TensorBoard, no effect on training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ddm.errors import BadInput
from ddm.stages import train_expert
from tests.fabricate import make_partitions


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def test_an_expert_writes_previews_and_trains_as_it_would_without(fast_cfg, tmp_path):
    weights = []
    for preview in (0, 2):
        rd = make_partitions(tmp_path / f"run{preview}")
        cfg = fast_cfg(
            "expert.steps=4",
            f"expert.preview_every={preview}",
            "expert.preview_rows=3",
            "logger=tensorboard",
            run_dir=rd.root,
        )
        train_expert.run(cfg)
        weights.append(torch.load(rd.expert_weights(0), weights_only=True)["state_dict"])
        folder = rd.expert(0) / "previews"
        if preview:
            assert _pngs(folder) == ["step-0000002.png", "step-0000004.png"]
            grids = [np.asarray(Image.open(folder / n)) for n in _pngs(folder)]
            assert grids[0].shape == grids[1].shape and not np.array_equal(grids[0], grids[1])  # the EMA moved
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = EventAccumulator(str(rd.expert(0) / "logs"), size_guidance={"images": 0})
            events.Reload()
            assert [e.step for e in events.Images("preview")] == [2, 4]
        else:
            assert not folder.exists()
    # the preview draws its noise from its own generator: the trained weights are the same bit for bit
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_bad_guidance_interval_is_refused_before_the_expert_trains(fast_cfg, tmp_path):
    rd = make_partitions(tmp_path / "run")
    cfg = fast_cfg("expert.steps=4", "expert.preview_every=2", "sample.cfg_interval=[0.9,0.1]", run_dir=rd.root)
    with pytest.raises(BadInput, match="sample.cfg_interval"):
        train_expert.run(cfg)
    assert not rd.expert_weights(0).exists() and not (rd.expert(0) / "checkpoints").exists()
