"""open_clip's text tower as the conditioning encoder of a text-to-image DiT.

The DiT cross-attends to the tower's per-token outputs (after its final
LayerNorm, before the projection into the joint image-text space) and adds
their pooled vector (the tower's own pooling: the end-of-text token for CLIP)
to its adaLN conditioning; both have the tower's width, ``dim``. Padding
positions (token id 0 in CLIP's tokenizer) are masked out. ``clip_embedding``
gives the projected, normalised embedding that CLIP score compares with
images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddm.devices import resolve_device
from ddm.embed.openclip import create_open_clip
from ddm.errors import BadInput
from ddm.models.conditioning import TextCondition


def text_width(model: str) -> int:
    """The width of an open_clip model's text tower (a text DiT's ``text_dim``), from its config alone."""
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise BadInput(f"text.model={model!r} is not an open_clip model; see open_clip.list_models()")
    return int(config["text_cfg"]["width"])


class OpenClipTextEncoder:
    """Captions -> ``TextCondition`` through an open_clip model's text tower (its image tower is dropped)."""

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, device: str | None = "auto"):
        import open_clip

        if model not in open_clip.list_models():
            raise BadInput(f"text.model={model!r} is not an open_clip model; see open_clip.list_models()")
        pretrained = str(pretrained) if pretrained else None
        self.device = resolve_device(device, "text.device")
        created, _ = create_open_clip(open_clip, model, pretrained, {}, key="text")
        created.visual = None  # only the text tower is used: free the image tower's memory
        self.model = created.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.dim = int(self.model.transformer.width)
        self.context_length = int(self.model.context_length)
        self.spec = dict(encoder="open_clip", model=model, pretrained=pretrained, dim=self.dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        if isinstance(captions, str):
            raise BadInput("captions must be a list of strings, not one string")
        return self.tokenizer(list(captions)).to(self.device)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> TextCondition:
        from open_clip.transformer import text_global_pool

        ids = self.tokenize(captions)
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(pooled, tuple):  # some open_clip versions return (pooled, tokens)
            pooled = pooled[0]
        return TextCondition.of(x.float(), ids != 0, pooled.float())

    @torch.no_grad()
    def clip_embedding(self, captions: list[str]) -> torch.Tensor:
        """Unit vectors in the joint image-text space: what CLIP score compares with image embeddings."""
        return F.normalize(self.model.encode_text(self.tokenize(captions)).float(), dim=-1)
