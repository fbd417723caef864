"""A Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero conditioning.

``DiT(x, t, y) -> v`` predicts the flow velocity for images (pixels or VAE
latents, any channel count). ``t`` is a float in [0, 1] (see ``ddm.flow``);
``y`` holds class labels in ``[0, num_classes)``, or ``num_classes`` for "no
label" (the classifier-free guidance null token). The same trunk with a pooled
classification head is the router (``DiTClassifier``).

With ``text_dim > 0`` the network is text-conditional instead (PixArt-alpha
style): ``y`` is a ``TextCondition``; every block cross-attends to the
caption's token embeddings (projected to the width, padding masked out) and
the pooled embedding is added to the adaLN conditioning. A learned null text
(one token and one pooled vector) stands in for dropped captions and for the
unconditional half of guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ddm.errors import BadInput
from ddm.models.attention import Attention, CrossAttention
from ddm.models.conditioning import TextCondition
from ddm.models.embedders import LabelEmbedder, TextEmbedder, TimestepEmbedder
from ddm.models.velocity import VelocityModel


@dataclass(frozen=True)
class DiTSize:
    hidden: int
    depth: int
    heads: int


# Standard DiT widths (S/B/L/XL) plus two small ones that train on a laptop CPU.
SIZES = {
    "N": DiTSize(hidden=64, depth=2, heads=2),  # "nano": unit tests
    "T": DiTSize(hidden=128, depth=4, heads=4),  # "tiny": CPU demo
    "S": DiTSize(hidden=384, depth=12, heads=6),
    "B": DiTSize(hidden=768, depth=12, heads=12),
    "L": DiTSize(hidden=1024, depth=24, heads=16),
    "XL": DiTSize(hidden=1152, depth=28, heads=16),
}


def parse_size(name: str) -> tuple[DiTSize, int]:
    """``"DiT-B/2"`` -> (size, patch). Raises a clear error for unknown names."""
    try:
        prefix, rest = name.split("-", 1)
        size_name, patch = rest.split("/")
        assert prefix == "DiT"
        return SIZES[size_name], int(patch)
    except (ValueError, KeyError, AssertionError):
        known = ", ".join(f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8))
        raise BadInput(f"model.size={name!r} is not a known DiT size; use one of: {known}") from None


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape [grid*grid, dim]."""
    assert dim % 4 == 0, "hidden size must be divisible by 4 for 2-D sin-cos embeddings"
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(yy), emb(xx)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero).

    With ``cross_attention`` it also attends to the text between its self-attention and its MLP.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        if cross_attention:
            self.norm_x = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            self.cross = CrossAttention(hidden, heads)
        else:
            self.cross = None

    def forward(self, x, c, text=None):
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        if self.cross is not None:
            x = x + self.cross(self.norm_x(x), *text)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiTTrunk(nn.Module):
    """Patchify, embed, and run the conditioned transformer blocks. Shared by DiT and router."""

    def __init__(self, size: str, image_size: int, in_channels: int, num_classes: int, text_dim: int = 0):
        super().__init__()
        dims, patch = parse_size(size)
        if text_dim and num_classes:
            raise BadInput(
                f"a DiT is class-conditional (num_classes={num_classes}) or text-conditional "
                f"(text_dim={text_dim}), not both: set num_classes=0 for a text model"
            )
        if image_size % patch:
            raise BadInput(f"image size {image_size} is not divisible by the patch size {patch} of {size}")
        self.size, self.patch, self.hidden = size, patch, dims.hidden
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, dims.hidden, patch, stride=patch)
        self.register_buffer("pos", sincos_pos_embed(dims.hidden, self.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(dims.hidden)
        self.y_embed = LabelEmbedder(num_classes, dims.hidden) if num_classes > 0 else None
        self.text_dim = int(text_dim)
        self.text_embed = TextEmbedder(text_dim, dims.hidden) if text_dim else None
        self.blocks = nn.ModuleList(
            DiTBlock(dims.hidden, dims.heads, cross_attention=bool(text_dim)) for _ in range(dims.depth)
        )
        # Activation checkpointing: keep only each block's inputs and recompute its activations in the
        # backward pass (about one more forward's FLOPs for a fraction of the activation memory). A
        # training setting, not part of the network: config() and the weights do not record it.
        self.checkpoint_blocks = False

    def embed(self, x, t, y):
        """(image tokens, adaLN conditioning, text context or None)."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embed(t)
        if self.y_embed is not None:
            if isinstance(y, TextCondition):
                raise BadInput("this DiT is class-conditional: y must be class labels, not a TextCondition")
            if y is None:  # unconditional call: every sample gets the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            c = c + self.y_embed(y)
        text = None
        if self.text_embed is not None:
            if not isinstance(y, TextCondition):
                raise BadInput("this DiT is text-conditional: y must be a TextCondition (see ddm.models.conditioning)")
            context, mask, pooled = self.text_embed(y)
            c, text = c + pooled, (context, mask)
        return tokens, c, text

    def forward(self, x, t, y):
        tokens, c, text = self.embed(x, t, y)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            # non-reentrant: composes with FSDP's per-block gathering and with blocks whose inputs need no grad
            tokens = checkpoint(block, tokens, c, text, use_reentrant=False) if recompute else block(tokens, c, text)
        return tokens, c


class DiT(VelocityModel):
    """Velocity model ``v = DiT(x_t, t, y)`` (see ``ddm.models.velocity``); guidance is the doubled batch.

    ``conv_head`` > 0: each token is decoded to ``conv_head`` feature channels per pixel
    instead of the output itself, and two 3x3 convolutions over the whole image make the
    output from them, so neighbouring patches see each other's pixels (a patch-4 DiT's
    output otherwise has seams at the patch borders). The last convolution starts at zero,
    as the linear head does, so the network still starts by predicting zero.
    """

    def __init__(
        self,
        size: str = "DiT-T/4",
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        text_dim: int = 0,
        conv_head: int = 0,
    ):
        super().__init__()
        self.trunk = DiTTrunk(size, image_size, in_channels, num_classes, text_dim)
        h, p = self.trunk.hidden, self.trunk.patch
        if int(conv_head) < 0:
            raise BadInput(f"model.conv_head={conv_head}: use 0 (a linear head) or a number of feature channels")
        self.conv_head = int(conv_head)
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.final = nn.Linear(h, p * p * (self.conv_head or in_channels))
        self.refine = (
            nn.Sequential(
                nn.Conv2d(self.conv_head, self.conv_head, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(self.conv_head, in_channels, 3, padding=1),
            )
            if self.conv_head
            else None
        )
        self.init_weights()

    @property
    def num_classes(self) -> int:
        return self.trunk.num_classes

    @property
    def text_dim(self) -> int:
        return self.trunk.text_dim

    def config(self) -> dict:
        tr = self.trunk
        out = dict(size=tr.size, image_size=tr.image_size, in_channels=tr.in_channels, num_classes=tr.num_classes)
        # older expert.pt files have neither key: written only when used
        out = dict(out, text_dim=tr.text_dim) if tr.text_dim else out
        return dict(out, conv_head=self.conv_head) if self.conv_head else out

    def init_weights(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.trunk.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.trunk.patch_embed.bias)
        if self.trunk.y_embed is not None:
            nn.init.normal_(self.trunk.y_embed.table.weight, std=0.02)
        for lin in (self.trunk.t_embed.mlp[0], self.trunk.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: each block starts as the identity and the output as zero; so does its cross-attention.
        for block in self.trunk.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
            if block.cross is not None:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        if self.trunk.text_embed is not None:
            nn.init.normal_(self.trunk.text_embed.null_token, std=0.02)
            nn.init.normal_(self.trunk.text_embed.null_pooled, std=0.02)
        # the output starts at zero: the last layer (the linear head, or the conv head's last convolution)
        last = [self.final] if self.refine is None else [self.refine[-1]]
        for layer in (self.final_ada[-1], *last):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens):
        tr = self.trunk
        b, p, g = tokens.shape[0], tr.patch, tr.grid
        c = tokens.shape[-1] // (p * p)
        x = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c = self.trunk(x, t, y)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        out = self.unpatchify(self.final(modulate(self.final_norm(tokens), shift, scale)))
        if self.refine is not None:
            out = self.refine(out)
        return out.to(x.dtype)


class DiTClassifier(nn.Module):
    """The router: a DiT trunk with a mean-pooled head giving K logits, ``r(x_t, t, y)``."""

    def __init__(
        self,
        num_outputs: int,
        size: str = "DiT-N/4",
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        text_dim: int = 0,
    ):
        super().__init__()
        self.num_outputs = num_outputs
        self.trunk = DiTTrunk(size, image_size, in_channels, num_classes, text_dim)
        h = self.trunk.hidden
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(2 * h, num_outputs)

    @property
    def num_classes(self) -> int:
        return self.trunk.num_classes

    def config(self) -> dict:
        tr = self.trunk
        out = dict(
            num_outputs=self.num_outputs,
            size=tr.size,
            image_size=tr.image_size,
            in_channels=tr.in_channels,
            num_classes=tr.num_classes,
        )
        return dict(out, text_dim=tr.text_dim) if tr.text_dim else out

    def forward(self, x, t, y=None):
        tokens, c = self.trunk(x, t, y)
        # Pooled image tokens plus the conditioning vector: the head sees t and y directly.
        return self.head(torch.cat([self.norm(tokens.mean(dim=1)), c], dim=1))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
