"""What encoding captions on the fly costs: a text tower's forward FLOPs against a text DiT's training step.

    python scripts/text_flops.py [--text ViT-L-14] [--size DiT-XL/2] [--latent 32]

Counts with torch's FLOP counter (``ddm.eval.flops.count_flops``) on random weights,
so it runs anywhere with no download; a training step is taken as three forward passes.
"""

from __future__ import annotations

import argparse
import logging

from ddm.eval.flops import count_flops, model_forward_flops
from ddm.models.dit import DiT
from ddm.text.encoder import OpenClipTextEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="ViT-L-14", help="open_clip model whose text tower encodes the captions")
    ap.add_argument("--size", default="DiT-XL/2", help="the expert DiT")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px images through the SD VAE)")
    ap.add_argument("--channels", type=int, default=4, help="latent channels")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the random-weights warning: these are FLOP counts only

    tower = OpenClipTextEncoder(args.text, None, device="cpu")
    text = count_flops(tower, ["a photo of a cat on a sofa"])
    dit = DiT(args.size, args.latent, args.channels, num_classes=0, text_dim=tower.dim)
    step = 3 * model_forward_flops(dit, (args.channels, args.latent, args.latent))
    print(f"{args.text} text tower forward: {text / 1e9:.1f} GFLOPs per caption ({tower.context_length} tokens)")
    shape = f"{args.channels}x{args.latent}x{args.latent}"
    print(f"text {args.size} training step on {shape}: {step / 1e9:.1f} GFLOPs per sample")
    print(f"on-the-fly caption encoding adds {text / step:.1%} to a training step")


if __name__ == "__main__":
    main()
