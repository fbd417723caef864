"""A tiny text-to-image run end to end: captions from a class template, text experts, prompts at sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.stages.runner import run_stage
from tests.test_evaluate_stage import OVERRIDES as EVAL_OVERRIDES
from tests.text_models import register_tiny_text_model

FAST_EVAL = [o for o in EVAL_OVERRIDES if o.startswith("eval.")]

TEXT = ["text=open_clip", 'text.caption_template="a photo of the digit {class}"']


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return register_tiny_text_model(tmp_path_factory.mktemp("clip"))


def _run(cfg, *stages):
    for stage in stages:
        run_stage(stage, cfg)


def test_a_text_run_trains_text_experts_and_samples_from_prompts(make_cfg, text_model):
    cfg = make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", "expert.steps=6", "router.steps=6")
    rd = RunDir(cfg.run_dir)
    _run(cfg, "prepare", "embed", "cluster", "partition")
    for k in range(2):
        cfg_k = make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", "expert.steps=6", f"expert.id={k}")
        run_stage("train-expert", cfg_k)
    run_stage("train-router", cfg)

    expert = torch.load(rd.expert_weights(0), weights_only=False)
    assert expert["model_config"]["text_dim"] == 32 and expert["model_config"]["num_classes"] == 0
    assert expert["text"] == dict(kind="open_clip", model=text_model, pretrained=None)
    router = torch.load(rd.router_weights, weights_only=False)
    assert router["model_config"]["num_classes"] == 0 and "text_dim" not in router["model_config"]  # text.router=false

    prompts = ["a photo of the digit 3", "a photo of the digit 7"]
    sample_cfg = make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", f"sample.prompts={prompts}")
    record = run_stage("sample", sample_cfg)
    assert record["grid_prompts"] == prompts and record["num_grid"] == 2 * sample_cfg.sample.per_class
    saved = np.load(rd.samples / "samples.npz")
    assert saved["images"].shape == (record["num_images"], 8, 8)
    assert sorted(set(saved["labels"].tolist())) == [0, 1]  # indices into the prompts

    # without prompts, the caption template over the class names gives one row per class
    record = run_stage("sample", make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", "redo=true"))
    assert record["grid_prompts"] == [f"a photo of the digit {d}" for d in range(10)]
    run_stage("report", cfg)
    assert rd.report.exists()

    # evaluate: prompts from the template over held-out classes, per-class accuracy, CLIP score, FM loss on captions
    fast = [*FAST_EVAL, f"eval.feature_net.cache_dir={rd.root}/c"]
    metrics = run_stage("evaluate", make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", *fast))
    ((_, space),) = metrics["feature_spaces"].items()
    assert space["target"] == "class" and space["strategies"]["top1"]["per_class"]
    score = metrics["clip_score"]["top1"]
    assert score["num_images"] == 40 and -100 <= score["mean"] <= 100
    assert all(m["mean"] > 0 for m in metrics["fm_loss"]["models"].values())


def test_a_router_that_reads_the_captions(make_cfg, text_model):
    over = ["experiment=tiny", *TEXT, f"text.model={text_model}", "text.router=true", "router.steps=4"]
    cfg = make_cfg(*over)
    _run(cfg, "prepare", "embed", "cluster", "partition", "train-router")
    rd = RunDir(cfg.run_dir)
    router = torch.load(rd.router_weights, weights_only=False)
    assert router["model_config"]["text_dim"] == 32 and router["text"]["model"] == text_model
    by_t = read_json(rd.router_record)["accuracy_by_t"]
    assert len(by_t) == cfg.router.t_buckets and all(0 <= r["accuracy"] <= 1 for r in by_t)


def test_text_without_captions_or_template_is_refused(make_cfg, text_model):
    cfg = make_cfg("experiment=tiny", "text=open_clip", f"text.model={text_model}", "expert.steps=2")
    _run(cfg, "prepare", "embed", "cluster", "partition")
    with pytest.raises(BadInput, match="has no caption.*caption_template"):
        run_stage("train-expert", cfg)
    with pytest.raises(BadInput, match="text.kind='clip' is not one of none, open_clip"):
        run_stage("train-expert", make_cfg("experiment=tiny", "text.kind=clip"))
