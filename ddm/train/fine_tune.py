"""Where an expert's training starts (``expert.init``): random weights, or an expert.pt it fine-tunes.

``ddm extend`` with ``extend.mode=assign`` gives some clusters new images; their
partitions then name the expert they had (``previous_expert``, moved under
``history/``), and with ``expert.init=auto`` the expert of each starts from
those weights, checked against the sha256 the partition recorded. The start
must be the same network and target the job trains.
"""

from __future__ import annotations

from pathlib import Path

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.io import sha256_file
from ddm.sampling.checkpoints import load_expert
from ddm.settings import Settings


def initial_weights(cfg: Settings, rd: RunDir, manifest: dict) -> dict | None:
    """``expert.init``: None (random), or the expert.pt training starts from, checked: {path, sha256, clustering_id}.

    ``auto`` takes the partition's ``previous_expert`` (written by ``ddm extend`` for a cluster that received
    images), ``scratch`` nothing, anything else is a path to an expert.pt.
    """
    init = str(cfg.expert.init)
    if init == "scratch":
        return None
    if init == "auto":
        previous = manifest.get("previous_expert")
        if not previous:
            return None
        path, want, where = (
            rd.root / previous["path"],
            previous["sha256"],
            f"{rd.partition_manifest(manifest['cluster'])}",
        )
        if not path.exists():
            raise MissingInput(
                f"{where} says expert {manifest['cluster']} fine-tunes from {path}, which is missing: put it back, "
                f"or train it from random weights with expert.init=scratch"
            )
    else:
        path, want, where = Path(init).expanduser(), None, "expert.init"
        if not path.exists():
            raise MissingInput(f"expert.init={init}: no such file; give an expert.pt, or auto / scratch")
    sha = sha256_file(path)
    if want is not None and sha != want:
        raise Unusable(
            f"{path} does not match the sha256 {where} recorded for it: it changed; restore it, or train from "
            f"random weights with expert.init=scratch"
        )
    _, meta = load_expert(path, velocity=False)  # refuses a file that is no expert
    return dict(path=str(path), sha256=sha, clustering_id=meta.get("clustering_id"))


def start_from(module, start: dict, target: str) -> None:
    """Load ``start``'s EMA weights into the module's network and its EMA (a fine-tune), refusing another kind."""
    net, meta = load_expert(start["path"], velocity=False)
    if meta["target"] != target or net.config() != module.net.config():
        raise BadInput(
            f"{start['path']} is a {meta['model_config'].get('size')} predicting {meta['target']} "
            f"({net.config()}), this job trains {module.net.config()} predicting {target}: fine-tune with the "
            f"model and target it was trained with (model.size=..., expert.target=...), or expert.init=scratch"
        )
    state = net.state_dict()
    module.net.load_state_dict(state)
    module.ema.load_state_dict(state)
