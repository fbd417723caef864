"""Atomic file writes and checksums.

Every artefact of a run is written to a temporary file in the same folder and
renamed into place, so a crash never leaves a half-written file that looks
complete. A stage is "done" when its final marker file exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddm.errors import BadInput, MissingInput

# Which command remakes a file, by the run-directory folder it lies in (``ddm.artifacts`` layout): a damaged
# file's error says how to get a whole one back. Looked up from the file's folder upwards.
REMAKE = {
    "data": "`ddm prepare redo=true` (then embed, cluster and partition again)",
    "embeddings": "`ddm embed redo=true`",
    "clusters": "`ddm cluster redo=true` (then `ddm partition redo=true`)",
    "partitions": "`ddm partition redo=true`",
    "latents": "`ddm encode redo=true`",
    "router": "`ddm train-router redo=true`",
    "distilled": "`ddm distill redo=true`",
    "samples": "`ddm sample redo=true`",
    "evaluation": "`ddm evaluate redo=true`",
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the real suffix (``x.tmp123.npy``) so that writers
    which append or check extensions (numpy, PIL, torch) behave normally.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remake_hint(path: str | os.PathLike) -> str:
    """How to remake the run artefact at ``path``: the command of the stage that writes its folder."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, max(-1, len(parts) - 4), -1):  # the file's folder, then the one above it
        name = parts[i]
        if name.startswith("expert-") and name[7:].isdigit() and i > 0 and parts[i - 1] == "experts":
            return f"`ddm train-expert expert.id={int(name[7:])} redo=true`"
        if name in REMAKE:
            return REMAKE[name]
    return "the stage that wrote it (redo=true), or copy it again from where it came from"


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or damaged file is a ``MissingInput`` / ``BadInput`` naming it.

    Every artefact's manifest and record is read here, so a truncated or overwritten one ends in an
    error that names the file and the command that remakes it rather than a bare ``JSONDecodeError``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingInput(f"{path} does not exist: make it with {remake_hint(path)}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path} is damaged (not text): remake it with {remake_hint(path)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(
            f"{path} is damaged (not JSON: {e.msg} at line {e.lineno}; truncated or overwritten?): "
            f"remake it with {remake_hint(path)}"
        ) from None


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """One ``.npy`` array (never pickles); a missing or damaged file is a ``MissingInput`` / ``BadInput`` naming it.

    A truncated file fails inside numpy with a message that names no file (``cannot reshape array``,
    ``mmap length is greater than file size``); here it names the file and how to remake it.
    """
    path = Path(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise MissingInput(f"{path} does not exist: make it with {remake_hint(path)}") from None
    except (ValueError, OSError, EOFError) as e:
        raise BadInput(f"{path} is damaged (not a whole .npy array: {e}): remake it with {remake_hint(path)}") from None


def load_npz(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` file, read whole; a missing, damaged or incomplete file names itself.

    numpy opens an ``.npz`` lazily: a damaged member fails only when it is read, so every array is read here.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise BadInput(f"{path} holds no {missing} arrays: remake it with {remake_hint(path)}")
            return {n: z[n] for n in names}
    except FileNotFoundError:
        raise MissingInput(f"{path} does not exist: make it with {remake_hint(path)}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"{path} is damaged (not a whole .npz file: {e}): remake it with {remake_hint(path)}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class StringsDigest:
    """``sha256_strings`` taken a few strings at a time (keys arriving shard by shard)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, items) -> StringsDigest:
        for s in items:
            self._h.update(str(s).encode())
            self._h.update(b"\n")
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sha256_strings(items) -> str:
    """Order-sensitive digest of a sequence of strings (keys, labels)."""
    return StringsDigest().update(items).hexdigest()
