"""open_clip's text tower as the conditioning encoder of a text-to-image DiT.

The DiT cross-attends to the tower's per-token outputs (after its final
LayerNorm, before the projection into the joint image-text space) and adds
their pooled vector (the tower's own pooling: the end-of-text token for CLIP)
to its adaLN conditioning; both have the tower's width, ``dim``. Padding
positions (token id 0 in CLIP's tokenizer) are masked out. ``clip_embedding``
gives the projected, normalised embedding that CLIP score compares with
images.

Every job that conditions on text builds its own copy of the tower (the
experts', the router's, the sampler's), so the copies must be the same
network. A weights file is named by its sha256 (``text_identity``), which
expert.pt records and the sampler checks. Random weights (``pretrained=None``,
tests and CPU demos) are drawn from a fixed seed, so every process builds the
same random tower.

Encodings of repeated captions are kept (``cache``: up to that many distinct
captions, least recently used dropped first): template captions over class
names are encoded once per job, not once per batch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm.devices import resolve_device
from ddm.embed.base import looks_like_path
from ddm.embed.openclip import create_open_clip
from ddm.errors import BadInput
from ddm.io import sha256_file
from ddm.models.conditioning import TextCondition, batch_text_length

RANDOM_INIT_SEED = 0  # random towers (pretrained=None) are drawn from this seed, in every process alike


def text_width(model: str) -> int:
    """The width of an open_clip model's text tower (a text DiT's ``text_dim``), from its config alone."""
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise BadInput(f"text.model={model!r} is not an open_clip model; see open_clip.list_models()")
    return int(config["text_cfg"]["width"])


def weights_identity(pretrained: str | None) -> dict:
    """What names a text tower's weights: a file's sha256, a hub tag as given, or the seed of random ones."""
    if not pretrained:
        return dict(weights_sha256=None, init_seed=RANDOM_INIT_SEED)
    if looks_like_path(pretrained) and Path(pretrained).is_file():
        return dict(weights_sha256=sha256_file(pretrained))
    return dict(weights_sha256=None)  # a hub tag (or a missing file: building the encoder says so)


def check_same_text(recorded: dict, built: dict, where) -> None:
    """Refuse a text tower other than the one ``where`` was trained with (another file, model or random draw)."""
    keys = ("model", "weights_sha256", "init_seed")
    if any(recorded.get(k) != built.get(k) for k in keys if k in recorded):
        raise BadInput(
            f"{where} was trained with the text tower {recorded.get('model')} "
            f"(weights {str(recorded.get('weights_sha256'))[:12]}..., from {recorded.get('pretrained')}), but "
            f"{built.get('model')} (weights {str(built.get('weights_sha256'))[:12]}..., "
            f"from {built.get('pretrained')}) was given: set text.pretrained to the weights it was trained with"
        )


class OpenClipTextEncoder:
    """Captions -> ``TextCondition`` through an open_clip model's text tower (its image tower is dropped).

    ``cache``: how many distinct captions' encodings to keep on the device (0: none).
    """

    def __init__(
        self, model: str = "ViT-B-32", pretrained: str | None = None, device: str | None = "auto", cache: int = 0
    ):
        import open_clip

        if model not in open_clip.list_models():
            raise BadInput(f"text.model={model!r} is not an open_clip model; see open_clip.list_models()")
        pretrained = str(pretrained) if pretrained else None
        self.device = resolve_device(device, "text.device")
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            torch.manual_seed(RANDOM_INIT_SEED)  # random weights: the same tower in every process
            created, _ = create_open_clip(open_clip, model, pretrained, {}, key="text")
        created.visual = None  # only the text tower is used: free the image tower's memory
        self.model = created.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.dim = int(self.model.transformer.width)
        self.context_length = int(self.model.context_length)
        self.spec = dict(encoder="open_clip", model=model, pretrained=pretrained, dim=self.dim)
        self.spec.update(weights_identity(pretrained))
        self.cache_size = int(cache)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def from_record(cls, recorded: dict, where, pretrained: str | None = None, device="auto", cache: int = 0):
        """The tower a model file records (``text`` in expert.pt), checked; ``pretrained`` overrides its path
        (weights copied to another place), but must hold the same weights."""
        built = cls(recorded["model"], pretrained or recorded.get("pretrained"), device=device, cache=cache)
        check_same_text(recorded, dict(built.spec, model=recorded["model"]), where)
        return built

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        if isinstance(captions, str):
            raise BadInput("captions must be a list of strings, not one string")
        return self.tokenizer(list(captions)).to(self.device)

    def __call__(self, captions: list[str]) -> TextCondition:
        """The captions' encodings, their tokens cut after the longest caption (``batch_text_length``)."""
        if not self.cache_size:
            return self._encode(captions)[0]
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for start in range(0, len(missing), self.cache_size):
            chunk = missing[start : start + self.cache_size]
            new, lengths = self._encode(chunk)
            if len(chunk) == len(captions):  # every caption new and distinct (web captions): nothing to assemble
                fresh = new
            for i, caption in enumerate(chunk):  # each caption keeps its own tokens only
                self._cache[caption] = (new.tokens[i, : lengths[i]], new.pooled[i])
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if len(missing) == len(captions) and len(captions) <= self.cache_size:
            return fresh
        if any(c not in self._cache for c in captions):  # more distinct captions in one batch than the cache holds
            return self._encode(captions)[0]
        rows = []
        for c in captions:
            self._cache.move_to_end(c)
            rows.append(self._cache[c])
        length = batch_text_length(max(len(tokens) for tokens, _ in rows), self.context_length)
        tokens = torch.zeros(len(rows), length, self.dim, device=rows[0][0].device)
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=tokens.device)
        for i, (own, _) in enumerate(rows):
            tokens[i, : len(own)], mask[i, : len(own)] = own, True
        return TextCondition.of(tokens, mask, torch.stack([pooled for _, pooled in rows]))

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[TextCondition, list[int]]:
        """The encodings and each caption's token count (read on the host)."""
        from open_clip.transformer import text_global_pool

        if isinstance(captions, str):
            raise BadInput("captions must be a list of strings, not one string")
        host_ids = self.tokenizer(list(captions))
        # the caption lengths are read from the host's token ids: no device sync
        lengths = (host_ids != 0).sum(1).tolist()
        length = batch_text_length(max(lengths), self.context_length)
        ids = host_ids.to(self.device)
        m = self.model
        x = m.token_embedding(ids) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        pooled = text_global_pool(x, ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(pooled, tuple):  # some open_clip versions return (pooled, tokens)
            pooled = pooled[0]
        # the tower runs at its full context (its positions and causal mask are built for it); the tokens after
        # the longest caption are padding, cut here
        return TextCondition.of(x[:, :length].float(), ids[:, :length] != 0, pooled.float()), lengths

    @torch.no_grad()
    def clip_embedding(self, captions: list[str]) -> torch.Tensor:
        """Unit vectors in the joint image-text space: what CLIP score compares with image embeddings."""
        return F.normalize(self.model.encode_text(self.tokenize(captions)).float(), dim=-1)


class PromptBatches:
    """The conditions of many samples, one prompt each, encoded a batch at a time when sliced.

    ``conditions[lo:hi]`` is the ``TextCondition`` of samples lo..hi-1, encoded then: tens of thousands of
    prompts (an evaluation's captions) never sit encoded in memory together, and a sample's condition does not
    depend on which other prompts there are. Sampling slices it as it slices a label tensor.
    """

    def __init__(self, encoder, prompts: list[str]):
        self.encoder, self.prompts = encoder, list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, rows: slice) -> TextCondition:
        if not isinstance(rows, slice):
            raise TypeError("PromptBatches is sliced with conditions[lo:hi]")
        return self.encoder(self.prompts[rows])
