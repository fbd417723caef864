"""A text run's held-out captions, the prompts its samples are drawn for, and their CLIP score."""

from __future__ import annotations

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.eval.clip_score import ClipScorer
from ddm.eval.heldout import load_captions
from ddm.eval.run.heldout import heldout_dir
from ddm.io import read_json
from ddm.settings import Settings
from ddm.text.encoder import OpenClipTextEncoder
from ddm.text.spec import captions_for, text_weights_override


class HeldoutText:
    """The held-out images' captions (their own, or the template over their class) and the run's text encoder."""

    def __init__(self, cfg: Settings, rd: RunDir, spec: dict, labels: np.ndarray, keys: list[str], device, seed: int):
        self.spec, self.labels, self.keys, self.device, self.seed = spec, labels, keys, device, int(seed)
        self.own = load_captions(heldout_dir(rd), keys)
        self.captions = captions_for(cfg, read_json(rd.data_manifest))
        self.encoder = OpenClipTextEncoder.from_record(
            spec, "the experts", pretrained=text_weights_override(cfg), device=device, cache=int(spec.get("cache") or 0)
        )

    def of(self, idx) -> list[str]:
        """The captions of held-out images ``idx``."""
        return [self.captions(self.own[i], int(self.labels[i]), self.keys[i]) for i in idx]

    def prompts(self, labels: torch.Tensor | None, n: int) -> list[str]:
        """Prompts of ``n`` generated images: the template over ``labels``, else held-out captions at random."""
        if labels is not None and self.captions.template is not None:
            return self.captions.of_labels(labels.tolist())
        count = len(self.keys)
        return self.of(np.random.default_rng(self.seed).choice(count, size=n, replace=count < n))

    def clip_score(self, generated: dict, batch_size: int) -> dict:
        """metrics.json ``clip_score``: {strategy: {mean: 100 x mean cos(image, prompt), num_images}}."""
        scorer = ClipScorer(self.spec["model"], self.spec.get("pretrained"), self.device)
        return {
            s: dict(mean=scorer(g["images"], g["prompts"], batch_size), num_images=len(g["images"]))
            for s, g in generated.items()
        }
