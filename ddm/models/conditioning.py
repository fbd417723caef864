"""Text conditioning as a batch: what ``y`` is in ``model(x, t, y)`` for a text-to-image model.

A class-conditional model takes ``y`` as a ``[B]`` tensor of labels. A
text-conditional one takes a ``TextCondition``: the text encoder's token
embeddings with their padding mask, its pooled embedding, and a ``null`` flag
per sample that tells the model to use its own learned "no text" in place of
the caption (caption dropout in training, the unconditional half of guidance
in sampling). It behaves like a batch tensor where the sampler and the
ensemble need it to (``len``, ``index_select`` along the batch, ``to``,
``cat_conditions``), so one sampler and one ensemble serve both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ddm.errors import BadInput

TOKEN_MULTIPLE = 8  # batches keep their captions' tokens up to the longest, rounded up to this (few distinct shapes)


def batch_text_length(longest: int, limit: int) -> int:
    """Tokens a batch of captions keeps: its longest caption's, rounded up to ``TOKEN_MULTIPLE``, at most ``limit``.

    Everything after a caption's end is padding the model masks out, so cutting it changes no output
    and saves the cross-attention and text projection most of their work on short captions.
    """
    return min(int(limit), -(-max(int(longest), 1) // TOKEN_MULTIPLE) * TOKEN_MULTIPLE)


@dataclass(frozen=True)
class TextCondition:
    tokens: torch.Tensor  # [B, L, D] token embeddings of the caption (float)
    mask: torch.Tensor  # [B, L] bool: True where a token is part of the caption, False for padding
    pooled: torch.Tensor  # [B, D] the encoder's pooled embedding of the caption
    null: torch.Tensor  # [B] bool: True -> the model's learned null text replaces this caption

    def __post_init__(self):
        b, length = self.tokens.shape[:2]
        if self.tokens.dim() != 3 or self.mask.shape != (b, length) or self.pooled.shape[0] != b:
            raise BadInput(
                f"a TextCondition needs tokens [B, L, D], mask [B, L] and pooled [B, D]; got "
                f"{tuple(self.tokens.shape)}, {tuple(self.mask.shape)}, {tuple(self.pooled.shape)}"
            )
        if self.null.shape != (b,):
            raise BadInput(f"TextCondition.null must be [B] = [{b}], got {tuple(self.null.shape)}")

    @classmethod
    def of(cls, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> TextCondition:
        """Captions as encoded, none of them dropped."""
        return cls(tokens, mask.bool(), pooled, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def _map(self, fn) -> TextCondition:
        return TextCondition(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def __getitem__(self, rows: slice) -> TextCondition:
        """A slice of the batch (``y[lo:hi]``), as for a label tensor."""
        if not isinstance(rows, slice):
            raise BadInput("a TextCondition is sliced with y[lo:hi] or indexed with index_select")
        return self._map(lambda v: v[rows])

    def index_select(self, dim: int, index: torch.Tensor) -> TextCondition:
        if dim != 0:
            raise BadInput("a TextCondition is indexed along its batch dimension (0) only")
        return self._map(lambda v: v.index_select(0, index.to(v.device)))

    def to(self, *args, **kwargs) -> TextCondition:
        """Moves every field; a dtype applies to the float fields only (the mask and flags stay bool)."""
        args = tuple(a for a in args if a is not None)  # y.to(None), as for a tensor moved nowhere
        if not args and kwargs.get("device", None) is None and "dtype" not in kwargs:
            return self
        device = _device_of(args, kwargs)

        def move(v):
            if v.is_floating_point():
                return v.to(*args, **kwargs)
            return v if device is None else v.to(device)

        return self._map(move)

    def padded_to(self, length: int) -> TextCondition:
        """The same captions with padding up to ``length`` tokens (masked out: the model's output is unchanged)."""
        extra = int(length) - self.tokens.shape[1]
        if extra < 0:
            raise BadInput(f"cannot pad {self.tokens.shape[1]} text tokens down to {length}")
        if extra == 0:
            return self
        tokens = F.pad(self.tokens, (0, 0, 0, extra))
        return replace(self, tokens=tokens, mask=F.pad(self.mask, (0, extra), value=False))

    def as_null(self) -> TextCondition:
        """Every sample with the null text: the unconditional input of guidance."""
        return replace(self, null=torch.ones_like(self.null))

    def dropped(self, drop: torch.Tensor) -> TextCondition:
        """Caption dropout: the samples where ``drop`` is True get the null text."""
        return replace(self, null=self.null | drop.to(self.null.device))


def _device_of(args, kwargs):
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            return a
    return None


def cat_conditions(parts: list) -> torch.Tensor | TextCondition:
    """``torch.cat`` along the batch for label tensors and ``TextCondition`` alike."""
    if isinstance(parts[0], TextCondition):
        length = max(p.tokens.shape[1] for p in parts)
        parts = [p.padded_to(length) for p in parts]
        return TextCondition(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})
    return torch.cat(parts)


CLIP_CONTEXT = 77  # CLIP's caption length in tokens: what FLOPs are counted at when no encoder says otherwise


def example_condition(net, batch: int, device=None, text_tokens: int = CLIP_CONTEXT):
    """A ``y`` that ``net`` accepts, for counting its FLOPs: class 0, or a caption of ``text_tokens`` real tokens."""
    trunk = getattr(net, "trunk", None)  # a DiT or a router; a wrapped expert says its text_dim itself
    text_dim = getattr(trunk, "text_dim", 0) if trunk is not None else getattr(net, "text_dim", 0)
    if not text_dim:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return TextCondition.of(
        torch.zeros(batch, text_tokens, text_dim, device=device),
        torch.ones(batch, text_tokens, dtype=torch.bool, device=device),
        torch.zeros(batch, text_dim, device=device),
    )
