"""The run's own clustering encoder, fed as the embed stage fed it, for the cluster router."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class ModelSpaceEmbedder:
    """Images in model space [-1, 1] ``[B, C, H, W]`` (a latent run: latents, decoded first) -> embeddings
    ``[B, D]`` on the images' device, through the clustering encoder exactly as the embed stage fed it: 8-bit
    images (``ddm.images.to_uint8``), rows rounded to the stored dtype."""

    def __init__(self, encoder, decode: Callable | None = None, stored_dtype: str = "float32"):
        self.encoder, self.decode, self.stored_dtype = encoder, decode, np.dtype(stored_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ddm.images import to_uint8

        images = self.decode(x) if self.decode is not None else x
        rows = np.asarray(self.encoder(to_uint8(images)))
        return torch.from_numpy(rows.astype(self.stored_dtype).astype(np.float32)).to(x.device)


def run_embedder(run_dir, seed: int, decode: Callable | None = None) -> ModelSpaceEmbedder:
    """The run's clustering encoder (embeddings/manifest.json) as a ``ModelSpaceEmbedder``.

    ``seed``: the run's seed (random-init encoders are rebuilt from it, as the embed stage built them; the
    global random state is left as it was). ``decode``: a latent run's decoder (latents -> images in [-1, 1]).
    """
    import random

    from ddm.artifacts import RunDir
    from ddm.data.shards import load_manifest
    from ddm.data.sources import SourceMeta
    from ddm.embed import build_encoder, load_embeddings_manifest
    from ddm.seeds import seed_everything
    from ddm.settings import Embed
    from ddm.settings.values import build

    rd = RunDir(run_dir)
    manifest = load_embeddings_manifest(rd.embeddings)
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(int(seed))
        encoder = build_encoder(
            build(Embed, manifest["encoder_config"], "embed"), SourceMeta.from_manifest(load_manifest(rd.data))
        )
    random.setstate(states[0])
    np.random.set_state(states[1])
    stored = manifest.get("dtype") or manifest["encoder_config"].get("dtype") or "float32"
    return ModelSpaceEmbedder(encoder, decode, stored)
