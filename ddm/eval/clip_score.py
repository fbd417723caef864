"""CLIP score: how well generated images match their prompts, in an open_clip model's joint space.

``100 x cos(image embedding, text embedding)``, averaged over the images (the
usual text-to-image CLIP score; the CLIPScore paper's 2.5 x max(cos, 0) is a
rescaling of the same cosine). The model is the text run's own open_clip model
(``text.model``, ``text.pretrained``), both towers; with random weights, as in
tests, the figure carries no meaning.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ddm.devices import resolve_device
from ddm.embed.openclip import create_open_clip


class ClipScorer:
    def __init__(self, model: str, pretrained: str | None = None, device="auto"):
        import open_clip

        self.device = resolve_device(device, "eval.device")
        created, self.preprocess = create_open_clip(open_clip, model, pretrained, {}, key="text")
        self.model = created.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str], batch_size: int = 64) -> float:
        """The mean CLIP score of uint8 ``images`` [N, H, W(, C)] against ``prompts`` (one per image)."""
        from PIL import Image

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for lo in range(0, len(images), batch_size):
            batch = [Image.fromarray(im).convert("RGB") for im in images[lo : lo + batch_size]]
            pixels = torch.stack([self.preprocess(im) for im in batch]).to(self.device)
            image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            tokens = self.tokenizer(list(prompts[lo : lo + batch_size])).to(self.device)
            text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            scores.append(100.0 * (image * text).sum(-1).cpu())
        return float(torch.cat(scores).mean())
