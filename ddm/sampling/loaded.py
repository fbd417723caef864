"""What a sampler knows about the networks it loaded: ``load_ensemble`` and ``load_distilled`` return it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LoadedModels:
    """The run's networks as loaded for sampling: the image shape and conditioning they take, which experts
    serve, and what each was trained with (for the guidance checks and the records of what samples came from).

    Fields a file written before they existed cannot tell are None: not known, so not refused.
    """

    num_experts: int  # K of the run's clustering
    clustering_id: str
    flow: dict  # the experts' path as they trained on it
    num_classes: int  # 0: unconditional or text
    image_size: int  # the networks' input side (latent cells in a latent run)
    in_channels: int
    text: dict | None = None  # the text tower the networks were trained with (None: class labels)
    latents: dict | None = None  # latent runs: the VAE that decodes the samples and the pixel shape (None: pixels)
    experts: list[int] = dataclasses.field(default_factory=list)  # the experts loaded (none for the student)
    missing_experts: list[int] = dataclasses.field(default_factory=list)  # sample.experts=available: the others
    # the ensemble: the router's and each expert's training steps and label dropout, each expert's size and target
    router_steps: int | None = None
    router_label_dropout: float | None = None
    expert_steps: dict[int, int | None] = dataclasses.field(default_factory=dict)
    expert_label_dropout: dict[int, float | None] = dataclasses.field(default_factory=dict)
    expert_models: dict[int, dict] = dataclasses.field(default_factory=dict)
    # the distilled student: its size, steps, label dropout and the experts it learnt from
    size: str | None = None
    steps: int | None = None
    label_dropout: float | None = None
    distilled_from: dict | None = None
