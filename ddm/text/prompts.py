"""The prompts a text-conditional run is sampled with: given, read from a file, or made from the class names."""

from __future__ import annotations

from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.settings import Settings
from ddm.text.captions import Captions


def sample_prompts(cfg: Settings, rd: RunDir) -> list[str]:
    """``sample.prompts``, else the lines of ``sample.prompts_file``, else ``text.caption_template`` per class."""
    sc = cfg.sample
    if sc.prompts:
        prompts = [str(p) for p in sc.prompts]
    elif sc.prompts_file:
        path = Path(str(sc.prompts_file)).expanduser()
        if not path.is_file():
            raise MissingInput(f"sample.prompts_file={path}: no such file (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise BadInput(f"sample.prompts_file={path} holds no prompt (one per line)")
    else:
        template = cfg.text.caption_template
        names = read_json(rd.data_manifest).get("class_names") if rd.data_manifest.exists() else None
        if not template or not names:
            raise BadInput(
                "this run's experts are text-conditional: give the prompts, "
                'sample.prompts=["a photo of a shirt","..."] or sample.prompts_file=<one prompt per line>'
            )
        prompts = Captions(template, names).of_labels(range(len(names)))
    if any(not p for p in prompts):
        raise BadInput("sample.prompts holds an empty prompt")
    return prompts
