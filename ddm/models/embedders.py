"""What a DiT is conditioned on, embedded to its width: the time t, a class label, a caption."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ddm.errors import BadInput
from ddm.models.conditioning import TextCondition


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (scaled by 1000 so frequencies match DiT's), then an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.t_scale)[:, None] * freqs[None]
        # The features in float32, then in the MLP's own dtype (float64 in exactness tests).
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for "no label"."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


class TextEmbedder(nn.Module):
    """Caption tokens and pooled embedding -> the width of the network, with a learned null text."""

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.text_dim = text_dim
        self.tokens = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden))
        self.pooled = nn.Linear(text_dim, hidden)
        self.null_token = nn.Parameter(torch.zeros(text_dim))
        self.null_pooled = nn.Parameter(torch.zeros(text_dim))

    def forward(self, y: TextCondition) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context [B, L, H], mask [B, L], pooled [B, H]); a null sample sees one null token only."""
        if y.tokens.shape[-1] != self.text_dim:
            raise BadInput(f"the text embeddings are {y.tokens.shape[-1]}-d but this DiT was built for {self.text_dim}")
        null = y.null[:, None]
        dtype = self.null_token.dtype
        tokens = torch.where(null[..., None], self.null_token, y.tokens.to(dtype))
        first = torch.zeros_like(y.mask)
        first[:, 0] = True
        mask = torch.where(null, first, y.mask)
        pooled = torch.where(null, self.null_pooled, y.pooled.to(dtype))
        return self.tokens(tokens), mask, self.pooled(pooled)
