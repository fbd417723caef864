"""open_clip's text tower through the real path: a tiny random text model registered from a local config file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm.errors import BadInput, MissingInput
from ddm.models.dit import DiT
from ddm.text import OpenClipTextEncoder
from tests.text_models import register_tiny_text_model


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    """The name of a tiny open_clip model whose config lives in a local json file (random weights)."""
    return register_tiny_text_model(tmp_path_factory.mktemp("clip"))


def test_captions_become_token_embeddings_with_their_padding_masked(tiny_text_model):
    enc = OpenClipTextEncoder(tiny_text_model, pretrained=None, device="cpu")
    y = enc(["a photo of a cat", "dog"])
    # tokens up to the longest caption, rounded up to 8 (of the context's 16): the rest is padding
    assert enc.dim == 32 and y.tokens.shape == (2, 8, 32) and y.pooled.shape == (2, 32)
    # <start> a photo of a cat <end> = 7 tokens; <start> dog <end> = 3
    assert y.mask.sum(1).tolist() == [7, 3] and not y.null.any()
    # CLIP pools at the end-of-text token: the pooled vector is that token's output
    torch.testing.assert_close(y.pooled[1], y.tokens[1, 2])
    assert not torch.allclose(y.tokens[0, :3], y.tokens[1, :3])
    clip = enc.clip_embedding(["a photo of a cat"])
    assert clip.shape == (1, 24) and torch.allclose(clip.norm(dim=-1), torch.ones(1))


def test_the_encoding_conditions_a_text_dit(tiny_text_model):
    enc = OpenClipTextEncoder(tiny_text_model, device="cpu")
    net = DiT("DiT-N/2", 8, 1, num_classes=0, text_dim=enc.dim)
    y = enc(["shirt", "a pair of trousers"])
    assert net(torch.randn(2, 1, 8, 8), torch.rand(2), y).shape == (2, 1, 8, 8)


def test_bad_text_encoders_are_clear_errors(tiny_text_model, tmp_path):
    with pytest.raises(BadInput, match="text.model='no-such-model'"):
        OpenClipTextEncoder("no-such-model")
    with pytest.raises(MissingInput, match="text.pretrained=.*no such weights file"):
        OpenClipTextEncoder(tiny_text_model, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(BadInput, match="list of strings"):
        OpenClipTextEncoder(tiny_text_model, device="cpu")("one caption")


def test_clip_score_is_100_times_the_cosine_of_image_and_prompt(tiny_text_model):
    import torch.nn.functional as F
    from PIL import Image

    from ddm.eval.clip_score import ClipScorer

    scorer = ClipScorer(tiny_text_model, device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    prompts = ["a shirt", "a bag", "a sandal"]
    pixels = torch.stack([scorer.preprocess(Image.fromarray(im).convert("RGB")) for im in images])
    with torch.no_grad():
        image = F.normalize(scorer.model.encode_image(pixels), dim=-1)
        text = F.normalize(scorer.model.encode_text(scorer.tokenizer(prompts)), dim=-1)
    want = float(100 * (image * text).sum(-1).mean())
    assert scorer(images, prompts, batch_size=2) == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(images, prompts[:2])


def test_random_towers_are_the_same_network_in_every_process(tiny_text_model):
    """Experts, router and sampler each build the tower: random weights must not depend on the caller's seed."""
    torch.manual_seed(1)
    a = OpenClipTextEncoder(tiny_text_model, device="cpu")(["a shirt"])
    after = torch.rand(1)
    torch.manual_seed(2)
    b = OpenClipTextEncoder(tiny_text_model, device="cpu")(["a shirt"])
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.manual_seed(1)
    OpenClipTextEncoder(tiny_text_model, device="cpu")
    assert torch.rand(1) == after  # building the tower leaves the caller's random stream alone
    enc = OpenClipTextEncoder(tiny_text_model, device="cpu")
    assert enc.spec["init_seed"] == 0 and enc.spec["weights_sha256"] is None


def test_a_weights_file_is_named_by_its_sha256_and_another_file_is_refused(tiny_text_model, tmp_path):
    import open_clip

    from ddm.io import sha256_file

    full = open_clip.create_model(tiny_text_model, pretrained=None).state_dict()  # a whole CLIP, as users have
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    torch.save(full, first)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in full.items()}
    torch.save(state, second)
    loaded = OpenClipTextEncoder(tiny_text_model, str(first), device="cpu")
    assert loaded.spec["weights_sha256"] == sha256_file(first) and "init_seed" not in loaded.spec
    recorded = dict(loaded.spec, kind="open_clip", model=tiny_text_model)
    same = OpenClipTextEncoder.from_record(recorded, "expert 0", device="cpu")
    torch.testing.assert_close(same(["a bag"]).tokens, loaded(["a bag"]).tokens)
    moved = tmp_path / "moved.pt"
    moved.write_bytes(first.read_bytes())  # the same weights elsewhere: accepted
    OpenClipTextEncoder.from_record(recorded, "expert 0", pretrained=str(moved), device="cpu")
    with pytest.raises(BadInput, match="expert 0 was trained with the text tower.*text.pretrained"):
        OpenClipTextEncoder.from_record(recorded, "expert 0", pretrained=str(second), device="cpu")
    random = dict(kind="open_clip", model=tiny_text_model, pretrained=None, weights_sha256=None, init_seed=0)
    with pytest.raises(BadInput, match="trained with the text tower"):
        OpenClipTextEncoder.from_record(random, "expert 0", pretrained=str(first), device="cpu")


def test_the_caption_cache_gives_what_encoding_gives(tiny_text_model):
    plain = OpenClipTextEncoder(tiny_text_model, device="cpu")
    cached = OpenClipTextEncoder(tiny_text_model, device="cpu", cache=3)
    batches = [["a", "b", "a"], ["b", "c", "d", "a"], ["e", "f", "g", "h", "e"], ["a"]]  # 5 distinct > 3 kept
    calls = []
    encode = cached._encode
    cached._encode = lambda captions: calls.append(list(captions)) or encode(captions)
    long = "a photo of a very very long caption " * 3  # past the context: the tower truncates it
    batches.append(["a", long])
    for captions in batches:
        want, got = plain(captions), cached(captions)
        assert got.tokens.shape == want.tokens.shape  # up to the longest caption, rounded up to 8
        torch.testing.assert_close(got.tokens[got.mask], want.tokens[want.mask])  # the padding is masked out
        torch.testing.assert_close(got.pooled, want.pooled)
        assert torch.equal(got.mask, want.mask) and not got.null.any()
    assert calls[0] == ["a", "b"] and calls[1] == ["c", "d"]  # each distinct caption encoded once while kept
    assert len(cached._cache) <= 3
