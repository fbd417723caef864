"""The sample stage as jobs (``ddm submit submit.stage=sample``): its row of the table in
``ddm.launch.stage_parts``. A part is done when its record is there, drawn with the settings and models asked
for now; the stage is complete when ``samples/record.json`` is, of those settings and models."""

from __future__ import annotations

from pathlib import Path

from ddm.artifacts import RunDir
from ddm.io import read_json
from ddm.launch.stage_spec import StageParts
from ddm.settings import Settings


def _sample_expect(cfg: Settings, rd: RunDir) -> dict:
    from ddm.sampling.checkpoints import models_identity
    from ddm.sampling.draw import requested_settings

    return dict(settings=requested_settings(cfg.sample), models=models_identity(rd))


def _sample_done(cfg: Settings, rd: RunDir, parts: int) -> list[int]:
    """The parts whose record is there, drawn with the settings and models asked for now."""
    if parts < 2:
        return []
    from ddm.sampling.parts import part_done

    expect = _sample_expect(cfg, rd)
    return [j for j in range(parts) if part_done(rd.samples, j, parts, expect) is not None]


def _samples_current(cfg: Settings, rd: RunDir, ids: list[int], done: list[int]) -> bool:
    """samples/record.json is there, drawn with the settings and models asked for now."""
    if not rd.samples_record.exists():
        return False
    record = read_json(rd.samples_record)
    return all(record.get(k) == v for k, v in _sample_expect(cfg, rd).items())


def _sample_count(cfg: Settings, rd: RunDir) -> int:
    from ddm.sampling.parts import check_parts

    return check_parts(cfg.sample.parts, None)[0]


def _sample_record(rd: RunDir, part: int, parts: int) -> Path:
    from ddm.sampling.parts import part_files

    return part_files(rd.samples, part, parts)[1]


def _sample_needs(rd: RunDir) -> str | None:
    if rd.router_weights.exists() or rd.distilled_weights.exists():
        return None
    return f"no {rd.router_weights}: train the experts and the router first"


SAMPLE = StageParts(
    stage="sample",
    part_key="sample.part",
    count_key="sample.parts",
    workers_key=None,
    gpu=True,
    what="draws part j of the samples (samples/parts/part-JJJJ-of-NNNN.json marks it done)",
    folder=lambda rd: rd.samples,
    needs=_sample_needs,
    count=_sample_count,
    done=_sample_done,
    complete=_samples_current,
    record=_sample_record,
    records="samples/parts/part-*-of-*.json",
    output_name="record.json",
)
