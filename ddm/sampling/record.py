"""``samples/record.json`` as the stages that read it back see it: what decides whether samples still stand.

The sample stage writes the record (its summary: settings, the weights the images
came from, the experts that served, FLOPs-relevant counts, outputs) and reads it
back to skip a rerun with the same settings; the evaluate stage reads it to reuse
``samples.npz`` for a strategy sampled with the same settings; the report shows
its settings. They read it through ``SamplesRecord``, one named contract.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ddm.io import read_json


@dataclasses.dataclass(frozen=True)
class SamplesRecord:
    settings: dict  # the sampling settings that decided what was drawn (``requested_settings``)
    models: dict | None  # the checksums of the weights the images came from (``models_identity``)
    num_images: int
    num_experts: int  # K of the run the samples were drawn from
    experts_loaded: list[int]  # the experts that could serve (``sample.experts=available``: those on disk)
    model: str  # "ensemble", or "distilled": the student alone

    @classmethod
    def read(cls, path: Path) -> SamplesRecord:
        raw = read_json(path)
        return cls(
            settings=dict(raw["settings"]),
            models=raw.get("models"),  # None in a record older than the field: never taken as current
            num_images=int(raw["num_images"]),
            num_experts=int(raw.get("num_experts", 0)),
            experts_loaded=[int(k) for k in raw.get("experts_loaded") or []],
            model=str(raw.get("model") or "ensemble"),
        )
