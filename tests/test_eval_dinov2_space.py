"""Sample quality in DINOv2's feature space (Stein et al. 2023), from a local timm DINOv2 file.

The network is the smallest DINOv2 ViT (ViT-S/14) with random weights saved by the test, at the 224 px the
metric uses; a few tiny images keep it to seconds on a CPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm.errors import MissingInput, Unusable
from ddm.eval.dinov2_space import SIZE, load_dinov2
from ddm.eval.fid import frechet_distance_features
from ddm.eval.quality import sample_quality
from ddm.io import sha256_file
from tests.test_embed_dinov2 import SMALL, SMALL_REG, save_model


def by_hand(source: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Stein et al.'s features: RGB, bicubic to 224, ImageNet mean/std, the final normed CLS token as it is."""
    x = torch.from_numpy(images).float().div(255)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return source.forward_features((x - mean) / std)[:, 0].double().numpy()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14.pth"
    return path, save_model(path, SMALL, img_size=SIZE)


def test_features_are_the_cls_token_at_224_px_not_normalised(weights):
    path, source = weights
    torch.manual_seed(123)  # another init: agreement proves the file was loaded
    dinov2 = load_dinov2(path, SMALL)
    assert dinov2.space == f"dinov2:{sha256_file(path)[:12]}" and dinov2.dim == 384
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    features = dinov2(images, batch_size=2)
    assert features.shape == (5, 384) and features.dtype == np.float64
    np.testing.assert_allclose(features, by_hand(source, images), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)  # not L2-normalised like ddm.embed's rows
    rgb = np.random.default_rng(1).integers(0, 256, (2, 10, 10, 3), dtype=np.uint8)
    np.testing.assert_allclose(dinov2(rgb), by_hand(source, rgb), rtol=1e-4, atol=1e-4)


def test_sample_quality_in_dinov2_space_matches_a_direct_computation(weights):
    path, source = weights
    dinov2 = load_dinov2(path, SMALL)
    rng = np.random.default_rng(2)
    real, gen, train = (rng.integers(0, 256, (5, 8, 8), dtype=np.uint8) for _ in range(3))
    gen[:, :4] = 255  # generated images unlike the real ones
    q = sample_quality(lambda x: dinov2(x, 4), real, np.full(5, -1), {"top1": (gen, np.full(5, -1))}, train, k=2)
    row = q["strategies"]["top1"]
    assert row["fd"] == pytest.approx(frechet_distance_features(by_hand(source, gen), by_hand(source, real)), rel=1e-4)
    assert row["precision"] is not None and row["recall"] is not None
    assert q["reference_training_images"]["fd"] < row["fd"]


def test_a_missing_or_wrong_file_is_refused_naming_the_eval_setting(tmp_path, weights):
    with pytest.raises(MissingInput, match=r"eval.dinov2_weights=.*nope\.pth: no such file.*eval.dinov2_weights=null"):
        load_dinov2(tmp_path / "nope.pth", SMALL)
    path, _ = weights
    with pytest.raises(Unusable, match=r"eval.dinov2_weights=.*does not hold vit_small_patch14_reg4_dinov2"):
        load_dinov2(path, SMALL_REG)


def test_evaluate_reports_the_dinov2_space(tiny_run, tmp_path, weights):
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import OVERRIDES, eval_group

    path, _ = weights
    run = tiny_run.copy(tmp_path / "run")
    overrides = [*eval_group(), f"eval.feature_net.cache_dir={tmp_path / 'cache'}", *OVERRIDES]
    overrides += [f"eval.dinov2_weights={path}", f"eval.dinov2_model={SMALL}", "eval.num_samples=6"]
    overrides += ["eval.strategies=[top1]", "eval.fm_loss.per_expert=false", "eval.flops.measure_images=0"]
    metrics = evaluate.run(run.settings(*overrides))
    name = f"dinov2:{sha256_file(path)[:12]}"
    assert list(metrics["feature_spaces"])[1] == name  # its own entry, after the classifier's
    space = metrics["feature_spaces"][name]
    assert space["kind"] == "dinov2" and space["model"] == SMALL and space["file"] == str(path)
    assert space["feature_dim"] == 384 and space["image_size"] == 224 and space["num_real"] == 6
    top1 = space["strategies"]["top1"]
    assert top1["fd"] > 0 and 0 <= top1["precision"] <= 1 and 0 <= top1["recall"] <= 1
    assert metrics["settings"]["eval"]["dinov2_weights"] == str(path)
    report = (run.rd.root / "evaluation" / "report.md").read_text()
    assert f"## Sample quality in `{name}`" in report
    assert f"Feature space: DINOv2 {SMALL} from {path} (384-d CLS token of images resized to 224 px" in report
    shutil.rmtree(run.rd.root)
