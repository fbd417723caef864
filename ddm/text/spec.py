"""What a run's networks are conditioned on, from the ``text`` config group and the data's manifest.

``text=none``: class labels (``num_classes`` from the data; 0 = unconditional).
``text=open_clip``: captions through open_clip's text tower; the networks are
then text-conditional (``num_classes=0``, ``text_dim`` = the tower's width),
and the router reads the captions only with ``text.router=true``.
"""

from __future__ import annotations

from ddm.errors import BadInput
from ddm.settings import Group, Settings
from ddm.text.captions import Captions
from ddm.text.encoder import text_width, weights_identity

KINDS = ("none", "open_clip")


def group_kind(cfg: Settings, group: str, kinds: tuple[str, ...]) -> tuple[str, Group]:
    """``(kind, section)`` of an optional part's settings group (``text``, ``vae``)."""
    section = getattr(cfg, group)
    kind = str(section.kind or "none")
    if kind not in kinds:
        raise BadInput(f"{group}.kind={kind!r} is not one of {', '.join(kinds)}")
    return kind, section


def text_spec(cfg: Settings) -> dict | None:
    """The text encoder a run's experts use (what expert.pt records), or None for a run without text.

    ``{kind, model, pretrained, weights_sha256 (a file's; None otherwise), [init_seed (random weights)],
    cache (distinct captions whose encodings a job keeps)}``
    """
    kind, section = group_kind(cfg, "text", KINDS)
    if kind == "none":
        return None
    pretrained = str(section.pretrained) if section.pretrained else None
    return dict(
        kind=kind,
        model=str(section.model),
        pretrained=pretrained,
        **weights_identity(pretrained),
        cache=int(section.cache or 0),
    )


def router_text_spec(cfg: Settings) -> dict | None:
    """The text encoder of the router: the experts' with ``text.router=true``, else none."""
    spec = text_spec(cfg)
    return spec if spec is not None and bool(cfg.text.router) else None


def conditioning_args(spec: dict | None, meta: dict) -> dict:
    """``num_classes`` and ``text_dim`` of a network for this conditioning and these data."""
    if spec is None:
        return dict(num_classes=int(meta["num_classes"]))
    return dict(num_classes=0, text_dim=text_width(spec["model"]))


def router_conditioning_args(cfg: Settings, meta: dict) -> dict:
    """The router's ``num_classes`` / ``text_dim``: a text run's router without text sees no labels either
    (prompts come with none); otherwise it is conditioned as the experts are."""
    text = router_text_spec(cfg)
    if text is None and text_spec(cfg) is not None:
        return dict(num_classes=0)
    return conditioning_args(text, meta)


def captions_for(cfg: Settings, meta: dict) -> Captions | None:
    """Where the loader takes each sample's caption from, or None when the job reads no captions."""
    if text_spec(cfg) is None:
        return None
    return Captions(cfg.text.caption_template, meta.get("class_names"))


def text_weights_override(cfg: Settings) -> str | None:
    """``text.pretrained`` when set: where this machine keeps the text weights the experts recorded.

    Model files record the path they were trained with; on another machine the same
    weights may live elsewhere. Either way their sha256 must match the record.
    """
    section = cfg.text
    return str(section.pretrained) if section.kind != "none" and section.pretrained else None


def stored_text_spec(cfg: Settings) -> dict | None:
    """The text tower whose encodings ``ddm encode`` stores with the latents (``text.store=true``), else None."""
    spec = text_spec(cfg)
    if spec is None or not bool(cfg.text.store):
        return None
    if str(cfg.vae.kind or "none") == "none":
        raise BadInput(
            "text.store=true stores caption encodings with the latents `ddm encode` writes, and this run has "
            "no VAE (vae=none): set vae=sd vae.pretrained=..., or text.store=false to encode captions on the fly"
        )
    return spec
