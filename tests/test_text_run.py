"""A tiny text-to-image run end to end: captions from a class template, text experts, prompts at sampling."""

from __future__ import annotations

import io

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
    assert expert["text"] == dict(
        kind="open_clip", model=text_model, pretrained=None, weights_sha256=None, init_seed=0, cache=1024
    )
    router = torch.load(rd.router_weights, weights_only=False)
    assert router["model_config"]["num_classes"] == 0 and "text_dim" not in router["model_config"]  # text.router=false

    prompts = ["a photo of the digit 3", "a photo of the digit 7"]
    sample_cfg = make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", f"sample.prompts={prompts}")
    record = run_stage("sample", sample_cfg)
    assert record["grid_prompts"] == prompts and record["num_grid"] == 2 * sample_cfg.sample.per_class
    saved = np.load(rd.samples / "samples.npz")
    assert saved["images"].shape == (record["num_images"], 8, 8)
    assert sorted(set(saved["labels"].tolist())) == [0, 1]  # indices into the prompts

    # in two parts, each encoding its own samples' prompts a batch at a time: the images of one job
    text = ["experiment=tiny", *TEXT, f"text.model={text_model}", f"sample.prompts={prompts}", "sample.batch_size=4"]
    rd.samples_record.unlink()
    for j in (0, 1):
        run_stage("sample", make_cfg(*text, "sample.parts=2", f"sample.part={j}"))
    joined = run_stage("sample", make_cfg(*text, "sample.parts=2"))
    assert joined["parts"]["count"] == 2 and joined["grid_prompts"] == prompts
    again = np.load(rd.samples / "samples.npz")
    assert np.array_equal(again["images"], saved["images"]) and np.array_equal(again["labels"], saved["labels"])

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


def test_stored_caption_encodings_are_what_the_tower_gives_and_training_reads_them(make_cfg, text_model, tmp_path):
    """text.store=true: `ddm encode` stores each caption's encoding with its latent; the experts read it."""
    import open_clip

    from ddm.data.loader import batch_loader, sample_stream
    from ddm.data.shards import iter_shard, load_manifest, shard_paths
    from ddm.errors import MissingInput
    from ddm.text import OpenClipTextEncoder
    from tests.test_latent_vae import save_tiny_vae

    vae = tmp_path / "vae"
    save_tiny_vae(vae, in_channels=3, scaling_factor=0.5)
    over = ["experiment=tiny", *TEXT, f"text.model={text_model}", "vae=sd", f"vae.pretrained={vae}", "expert.steps=4"]
    cfg = make_cfg(*over, "text.store=true")
    rd = RunDir(cfg.run_dir)
    _run(cfg, "prepare", "embed", "cluster", "partition")
    run_stage("encode", make_cfg(*over))  # latents without caption encodings
    with pytest.raises(MissingInput, match="holds no caption encodings"):
        run_stage("train-expert", make_cfg(*over, "text.store=true", "expert.id=0"))
    assert run_stage("encode", cfg)["encoded"] == [0, 1]  # text.store changed what the shards must hold

    tower = OpenClipTextEncoder(text_model, device="cpu")
    manifest = load_manifest(rd.latent(0))
    assert manifest["text"]["model"] == text_model and manifest["text"]["init_seed"] == 0
    assert manifest["text"]["context_length"] == 16 and manifest["text"]["dim"] == 32
    raw = next(iter_shard(shard_paths(rd.latent(0), manifest)[0]))
    caption = f"a photo of the digit {int(raw['cls'])}"  # digits have no captions: the template's
    want = tower([caption])
    tokens = np.load(io.BytesIO(raw["txt_tokens.npy"]))
    assert tokens.dtype == np.float16 and tokens.shape == (int(want.mask.sum()), 32)  # padding not stored
    np.testing.assert_array_equal(tokens, want.tokens[0, : len(tokens)].numpy().astype(np.float16))

    # the loader's batches: the tower's encodings of the captions, padded back to the context length
    urls = shard_paths(rd.latent(0), manifest)
    x, y, stored = next(iter(batch_loader(sample_stream(urls, 4, seed=0, shuffle_buffer=10, stored_text=16), 8, 0)))
    assert stored.tokens.shape == (8, 8, 32) and stored.tokens.dtype == torch.float16  # 8 tokens a caption
    again = tower([f"a photo of the digit {int(label)}" for label in y])
    assert torch.equal(stored.mask, again.mask)
    torch.testing.assert_close(stored.tokens.float(), again.tokens * again.mask[..., None], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stored.pooled.float(), again.pooled, atol=2e-3, rtol=2e-3)

    record = run_stage("train-expert", make_cfg(*over, "text.store=true", "expert.id=0"))
    assert record["steps"] == 4

    # encodings of another tower are refused: a weights file is not the random tower they came from
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(text_model, pretrained=None).state_dict(), weights)
    other = [*over, "text.store=true", f"text.pretrained={weights}", "expert.id=1"]
    with pytest.raises(BadInput, match="caption encodings of another text tower.*ddm encode redo=true"):
        run_stage("train-expert", make_cfg(*other))


def test_storing_caption_encodings_needs_a_latent_run(make_cfg, text_model):
    cfg = make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", "text.store=true")
    _run(cfg, "prepare", "embed", "cluster", "partition")
    with pytest.raises(BadInput, match="text.store=true .* no VAE .*text.store=false"):
        run_stage("train-expert", make_cfg("experiment=tiny", *TEXT, f"text.model={text_model}", "text.store=true"))
