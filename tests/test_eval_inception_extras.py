"""The Inception Score and ADM's spatial FID features, from the Inception files that give them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddm.errors import BadInput
from ddm.eval.inception import SPATIAL_CHANNELS, load_inception, spatial_layers, to_tf_inception_input
from ddm.eval.inception_score import inception_score
from ddm.eval.run.feature_spaces import inception_extras
from ddm.settings import Eval
from ddm.settings.values import build
from tests.real_inception import REAL_INCEPTION, needs_real_inception


def one_hot(labels, classes: int) -> np.ndarray:
    return np.eye(classes)[np.asarray(labels)]


def test_inception_score_known_answers():
    # uniform predictions: p(y|x) = p(y), every KL is 0, the score is exp(0) = 1
    assert inception_score(np.full((50, 7), 1 / 7))["mean"] == pytest.approx(1.0)
    # confident predictions spread evenly over C classes in every split: KL = log C, the score is C
    for classes in (2, 5, 10):
        probs = one_hot(np.tile(np.arange(classes), 10), classes)  # each of the 10 splits holds every class once
        score = inception_score(probs)
        assert score["mean"] == pytest.approx(classes) and score["std"] == pytest.approx(0.0, abs=1e-12)
        assert score["splits"] == 10 and score["num_images"] == 10 * classes
    # one class only: confident but no diversity, so 1 again
    assert inception_score(one_hot(np.zeros(20, int), 4))["mean"] == pytest.approx(1.0)
    # a split of two classes with 3:1 images: exp(H(p(y))) = exp(-(.75 log .75 + .25 log .25))
    probs = one_hot([0, 0, 0, 1], 2)
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert inception_score(probs, splits=1)["mean"] == pytest.approx(expected)
    # the splits are consecutive parts, as the original code cuts them: two parts of one class each score 1
    two = inception_score(one_hot([0, 0, 1, 1], 2), splits=2)
    assert two["mean"] == pytest.approx(1.0) and two["splits"] == 2
    assert inception_score(one_hot([0, 1], 2))["splits"] == 2  # fewer images than 10 splits: one image a split


def test_inception_score_refuses_what_is_not_probabilities():
    with pytest.raises(BadInput, match="softmax the logits"):
        inception_score(np.array([[2.0, -1.0], [0.5, 0.5]]))
    with pytest.raises(BadInput, match=r"\[N, C\]"):
        inception_score(np.ones(3) / 3)


class NvidiaLike(torch.nn.Module):
    """NVIDIA's calling convention (``forward(img, return_features, use_fp16, no_output_bias)``, [0, 255] input,
    class probabilities out) around a small network: a real TorchScript file of that kind."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Linear(3, 2048)
        self.output = torch.nn.Linear(2048, 1008)
        with torch.no_grad():
            self.output.bias.fill_(50.0)  # a large bias: using it would change every probability
            self.output.bias[0] = 500.0

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        f = self.features(img.float().mean(dim=(2, 3)) / 255.0)
        if return_features:
            return f
        bias = None if no_output_bias else self.output.bias
        return torch.softmax(F.linear(f, self.output.weight, bias), dim=1)


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_nvidias_kind_of_file_gives_the_inception_score(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    net = NvidiaLike().eval()
    torch.jit.script(net).save(str(path))
    inception = load_inception(path)
    assert inception.kind == "fid_inception_nvidia" and inception.has_logits and not inception.has_spatial
    images = np.random.default_rng(0).integers(0, 256, (12, 9, 9, 3), dtype=np.uint8)
    out = inception.outputs(images, batch_size=5, probs=True)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        features = net(x, return_features=True)
        expected = torch.softmax(features @ net.output.weight.T, dim=1).double().numpy()  # no bias, as TF's IS
    assert out["probs"].shape == (12, 1008)
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["features"], features.double().numpy(), rtol=1e-5, atol=1e-6)
    assert inception_score(out["probs"])["mean"] == pytest.approx(inception_score(expected)["mean"], rel=1e-6)
    # auto asks for what the file gives; sFID from a file without TensorFlow's layers is refused, naming it
    ec = eval_settings()
    assert inception_extras(ec, inception) == dict(spatial=False, probs=True)
    with pytest.raises(BadInput, match=r"inception-2015-12-05\.pt.*spatial FID \(eval\.sfid\) needs.*default_1\.pt"):
        inception_extras(eval_settings(sfid=True), inception)
    with pytest.raises(BadInput, match="eval.sfid='yes': use true, false or auto"):
        inception_extras(eval_settings(sfid="yes"), inception)


def eval_settings(**changes) -> Eval:
    from omegaconf import OmegaConf

    from ddm.config import CONF_DIR

    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "eval" / "default.yaml"))
    values.update(seed=0, reference_cache="/tmp/unused")
    values["feature_net"]["cache_dir"] = "/tmp/unused"
    return build(Eval, values | changes, "eval")


def test_the_probabilities_of_a_logits_file_are_its_softmax():
    from ddm.eval.inception import _probabilities

    logits = torch.tensor([[1.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(_probabilities(logits).numpy(), torch.softmax(logits.double(), 1).numpy())
    probs = torch.tensor([[0.2, 0.8, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(_probabilities(probs).numpy(), probs.double().numpy())


@needs_real_inception
def test_the_default_1_file_gives_adms_spatial_features_and_no_inception_score():
    inception = load_inception(REAL_INCEPTION)
    assert inception.has_spatial and not inception.has_logits
    assert inception_extras(eval_settings(), inception) == dict(spatial=True, probs=False)
    with pytest.raises(BadInput, match=r"fid_inception_default_1\.pt.*needs the 1008 class outputs of NVIDIA"):
        inception_extras(eval_settings(inception_score=True), inception)
    with pytest.raises(BadInput, match="gives no class logits"):
        inception.outputs(np.zeros((1, 8, 8), np.uint8), probs=True)

    images = np.random.default_rng(1).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    out = inception.outputs(images, batch_size=2, spatial=True)
    assert out["spatial"].shape == (2, 17 * 17 * SPATIAL_CHANNELS) == (2, 2023)
    # the pool features of the walk through the layers are the network's own
    np.testing.assert_allclose(out["features"], inception(images), rtol=1e-5, atol=1e-6)
    # ADM's layout: mixed_6/conv's first 7 channels, flattened as TensorFlow's (height, width, channel)
    layers = spatial_layers(inception.model)
    x = to_tf_inception_input(torch.from_numpy(images).float().unsqueeze(1).expand(-1, 3, -1, -1))
    with torch.no_grad():
        for name, layer in layers.named_children():
            if name == "mixed_6":
                conv = layer.conv(x)
                break
            x = layer(x)
    assert conv.shape == (2, 192, 17, 17)
    np.testing.assert_allclose(out["spatial"].reshape(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1).numpy(), rtol=1e-5)
    assert out["spatial"].min() >= 0  # after the ReLU, as TensorFlow's mixed_6/conv:0


@pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")
def test_evaluate_reports_the_inception_score_of_a_file_that_gives_it(tiny_run, tmp_path):
    import shutil

    from ddm.io import sha256_file
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import OVERRIDES, eval_group

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(NvidiaLike().eval()).save(str(path))
    run = tiny_run.copy(tmp_path / "run")
    overrides = [*eval_group(), f"eval.feature_net.cache_dir={tmp_path / 'cache'}", *OVERRIDES]
    overrides += [f"eval.inception_weights={path}", "eval.num_samples=20", "eval.strategies=[top1]"]
    overrides += ["eval.fm_loss.per_expert=false", "eval.flops.measure_images=0"]
    with pytest.raises(BadInput, match=r"inception-2015-12-05\.pt \(fid_inception_nvidia\) cannot give it"):
        evaluate.run(run.settings(*overrides, "eval.sfid=true"))
    metrics = evaluate.run(run.settings(*overrides))
    space = metrics["feature_spaces"][f"inception:{sha256_file(path)[:12]}"]
    assert space["inception_score"] is True and space["sfid"] is False
    for row in (space["strategies"]["top1"], space["reference_training_images"]):
        score = row["inception_score"]
        assert score["splits"] == 10 and score["num_images"] == 20 and score["mean"] >= 1.0 and "sfid" not in row
    assert metrics["settings"]["eval"]["inception_score"] == "auto"
    report = (run.rd.root / "evaluation" / "report.md").read_text()
    top1 = space["strategies"]["top1"]["inception_score"]
    assert "| strategy | images | FD | IS | precision |" in report
    assert f"| top1 | 20 | {space['strategies']['top1']['fd']:.4g} | {top1['mean']:.3f} ± {top1['std']:.3f} |" in report
    shutil.rmtree(run.rd.root)
