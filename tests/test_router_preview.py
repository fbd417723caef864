"""The router's training preview: held-out accuracy by t every few steps, the final record's figures, no effect."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddm.eval.router_diag import router_diagnostics
from ddm.flow import FlowPath
from ddm.models.dit import DiTClassifier
from ddm.stages import train_router
from ddm.train.router_preview import RouterPreview, bucket_name
from tests.fabricate import make_partitions


def _pngs(folder):
    return sorted(p.name for p in folder.glob("*.png"))


def _logged_previews(job_dir) -> dict[int, dict[str, float]]:
    """The csv logger's preview scalars, by step (none when it wrote no metrics: fewer steps than log_every)."""
    files = list(job_dir.glob("logs/version_*/metrics.csv"))
    if not files:
        return {}
    (metrics,) = files
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("preview/") and v != ""}
        for r in rows
        if r.get("preview/accuracy")
    }


def test_a_router_previews_its_heldout_accuracy_and_trains_as_it_would_without(fast_cfg, tmp_path):
    weights = []
    for preview in (0, 2):
        rd = make_partitions(tmp_path / f"run{preview}", sizes=(20, 20))
        cfg = fast_cfg(
            "router.steps=4",
            f"router.preview_every={preview}",
            "router.eval_samples=20",
            "router.preview_samples=20",  # the record's held-out set: the last preview sees the record's figures
            "router.t_buckets=3",
            run_dir=rd.root,
        )
        record = train_router.run(cfg)
        weights.append(torch.load(rd.router_weights, weights_only=True)["state_dict"])
        folder = rd.router / "previews"
        if not preview:
            assert not folder.exists()
            assert _logged_previews(rd.router) == {}
            continue
        assert _pngs(folder) == ["step-0000002.png", "step-0000004.png"]
        picture = np.asarray(Image.open(folder / "step-0000004.png"))
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
        logged = _logged_previews(rd.router)
        by_t = record["accuracy_by_t"]
        names = {"preview/accuracy", *(f"preview/{bucket_name(r)}" for r in by_t)}
        assert sorted(logged) == [2, 4] and all(set(m) == names for m in logged.values())
        assert names >= {"preview/accuracy_t0.167", "preview/accuracy_t0.5", "preview/accuracy_t0.833"}
        assert all(0.0 <= v <= 1.0 for m in logged.values() for v in m.values())
        # the last preview classified with the exported weights, on the record's samples, noise and t
        last = logged[4]
        for row in by_t:
            assert last[f"preview/{bucket_name(row)}"] == pytest.approx(row["accuracy"], abs=1e-12)
        assert last["preview/accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in by_t]), abs=1e-12)
    # the preview draws its noise from its own generator and leaves the router in training mode:
    # the trained weights are the same bit for bit
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class TensorBoardLogger:
    """Records what a preview sends; named as Lightning's, since ``show_image`` dispatches on the type's name."""

    def __init__(self):
        self.metrics, self.images = [], []
        self.experiment = self

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def add_image(self, tag, picture, step, dataformats):
        self.images.append((tag, step, picture.dtype, picture.shape, dataformats))


def test_a_preview_is_router_diagnostics_of_the_batch_every_n_steps_written_by_rank_zero_only(tmp_path):
    torch.manual_seed(0)
    net = DiTClassifier(num_outputs=2, size="DiT-N/2", image_size=8, in_channels=1, num_classes=3).train()
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    x0, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    k, prior = torch.tensor([0] * 8 + [1] * 4), torch.tensor([0.5, 0.5])
    module = SimpleNamespace(export_net=net, path=FlowPath(), device=torch.device("cpu"))

    def run(folder, rank_zero: bool):
        logger = TensorBoardLogger()
        trainer = SimpleNamespace(global_step=0, is_global_zero=rank_zero, logger=logger)
        cb = RouterPreview(2, folder, x0, k, lambda m: labels, prior, buckets=4, seed=7)
        cb.on_train_start(trainer, module)
        # 0: the start (a first micro-batch under accumulation); 2 twice: the rest of an accumulation
        for step in (0, 1, 2, 2, 3):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, None, None, 0)
        return logger

    logger = run(tmp_path / "rank0", rank_zero=True)
    assert _pngs(tmp_path / "rank0") == ["step-0000002.png"]
    assert net.training  # given back in training mode
    ((step, metrics),) = logger.metrics
    expected = router_diagnostics(
        net.eval(), module.path, x0, labels, k, buckets=4, seed=7, weights=prior[k] / torch.bincount(k).float()[k]
    )
    net.train()
    assert step == 2 and len(metrics) == 5
    assert metrics == pytest.approx(
        {
            "preview/accuracy": np.mean([r["accuracy"] for r in expected]),
            **{f"preview/{bucket_name(r)}": r["accuracy"] for r in expected},
        }
    )
    ((tag, image_step, dtype, shape, fmt),) = logger.images
    assert (tag, image_step, dtype, fmt) == ("preview", 2, np.uint8, "HWC") and shape[2] == 3

    calls.clear()
    logger = run(tmp_path / "rank1", rank_zero=False)
    assert calls  # it classified, as every rank must (a sharded router gathers on all of them)
    assert not (tmp_path / "rank1").exists() and logger.metrics == [] and logger.images == []
