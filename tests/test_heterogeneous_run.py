"""A run whose experts differ: a DiT-T velocity expert and a DiT-S eps expert, trained, routed, sampled, evaluated.

Each expert is its own job with its own overrides (``model.size``, ``expert.target``), as on two islands.
"""

from __future__ import annotations

import pytest
import torch

from ddm.artifacts import RunDir
from ddm.io import read_json
from ddm.stages.pipeline import BEFORE_EXPERTS
from ddm.stages.runner import run_stage
from tests.test_evaluate_stage import OVERRIDES as EVAL_OVERRIDES
from tests.test_evaluate_stage import eval_group

STEPS = ["expert.steps=4", "router.steps=4", "sample.steps=3"]
# DiT-S/4 on 8x8 images: 4 tokens and a small batch, so the 33M-parameter expert trains in seconds; the eps
# expert trains (and is guarded) on t in [5e-3, 1 - 5e-3], as conf/expert/default.yaml advises
EXPERTS = {
    0: ["model.size=DiT-T/2"],
    1: ["model.size=DiT-S/4", "expert.target=eps", "expert.batch_size=8", "flow.t_eps=5e-3"],
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    from ddm.config import settings

    root = tmp_path_factory.mktemp("mixed")

    def cfg(*extra):
        return settings(["experiment=tiny", f"run_dir={root / 'run'}", *STEPS, *extra])

    for stage in BEFORE_EXPERTS:
        run_stage(stage, cfg())
    for k, overrides in EXPERTS.items():
        run_stage("train-expert", cfg(f"expert.id={k}", *overrides))
    run_stage("train-router", cfg())
    run_stage("sample", cfg())
    return cfg, RunDir(root / "run"), root


def test_each_expert_records_its_size_and_target(mixed_run):
    _, rd, _ = mixed_run
    for k, (size, target) in {0: ("DiT-T/2", "velocity"), 1: ("DiT-S/4", "eps")}.items():
        payload = torch.load(rd.expert_weights(k), weights_only=True)
        assert payload["model_config"]["size"] == size and payload["target"] == target
        record = read_json(rd.expert_record(k))
        assert record["model_size"] == size and record["target"] == target
    fwd = [read_json(rd.expert_record(k))["forward_flops_per_sample"] for k in (0, 1)]
    assert fwd[1] > 5 * fwd[0]  # DiT-S is much the bigger


def test_the_mixed_ensemble_samples_end_to_end(mixed_run):
    from ddm.models.prediction import PredictionToVelocity
    from ddm.sampling import load_ensemble, sample

    _, rd, _ = mixed_run
    record = read_json(rd.samples_record)
    assert (rd.samples / "grid.png").exists() and record["num_images"] > 0 and record["experts_loaded"] == [0, 1]
    for strategy, cfg_scale in (("full", 2.0), ("top1", 1.0)):
        ensemble, path, info = load_ensemble(rd.root, strategy=strategy)
        assert info.expert_models == {
            0: dict(size="DiT-T/2", target="velocity"),
            1: dict(size="DiT-S/4", target="eps"),
        }
        assert isinstance(ensemble.experts["1"], PredictionToVelocity) and ensemble.experts["1"].t_eps == 5e-3
        x = sample(
            ensemble,
            path,
            (4, 1, 8, 8),
            y=torch.tensor([0, 1, 2, 3]),
            steps=3,
            solver="heun",
            cfg_scale=cfg_scale,
            generator=torch.Generator().manual_seed(0),
        )
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_the_report_names_each_experts_kind(mixed_run):
    cfg, rd, _ = mixed_run
    run_stage("report", cfg())
    text = (rd.root / "report.md").read_text()
    assert "| expert | network | target |" in text
    assert "DiT-S/4 | eps" in text and "DiT-T/2 | velocity" in text


def test_evaluate_measures_the_velocity_of_every_expert(mixed_run):
    from ddm.config import settings
    from ddm.stages import evaluate

    _, rd, root = mixed_run
    cfg = settings(
        [
            "experiment=tiny",
            f"run_dir={rd.root}",
            *STEPS,
            *eval_group(),
            f"eval.feature_net.cache_dir={root / 'cache'}",
            *EVAL_OVERRIDES,
            "eval.fm_loss.t_grid=[0.0,0.5,1.0]",  # both ends: the eps expert's guard at t = 1
            "eval.num_samples=20",
        ]
    )
    metrics = evaluate.run(cfg)
    assert metrics["run"]["expert_models"] == {
        "0": dict(size="DiT-T/2", target="velocity"),
        "1": dict(size="DiT-S/4", target="eps"),
    }
    fm = metrics["fm_loss"]["models"]
    for name in ("expert-00", "expert-01", "ensemble-top1", "ensemble-full"):
        losses = [p["loss"] for p in fm[name]["per_t"]]
        assert all(loss == loss and loss < float("inf") for loss in losses), (name, losses)
    fl = metrics["flops"]
    fwd = fl["forward_per_sample"]
    assert fwd["expert-01"] > 5 * fwd["expert-00"]
    assert fm["expert-01"]["forward_flops_per_call"] == fwd["expert-01"]
    full, top1 = fl["sampling"]["full"], fl["sampling"]["top1"]
    assert full["per_image"] == full["measured_per_image"]  # every expert runs: the formula is exact
    assert top1["per_image_min"] <= top1["measured_per_image"] <= top1["per_image_max"]
    report = (rd.root / "evaluation" / "report.md").read_text()
    assert "1: DiT-S/4 predicting eps" in report and "The experts differ in size" in report
