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
    assert enc.dim == 32 and y.tokens.shape == (2, 16, 32) and y.pooled.shape == (2, 32)
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
