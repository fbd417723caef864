"""Shards as img2dataset writes them: real downloads from a loopback web server, by img2dataset's own CLI.

img2dataset lives in its own virtual environment (``make img2dataset-venv``), so its pins never meet ours.
``make test`` sets ``DDM_IMG2DATASET`` to its executable, which makes the tool required: a test fails when it is
missing. Without the variable (pytest run by hand) the default place is tried and a test without it is skipped.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXE = REPO / ".venv-img2dataset" / "bin" / "img2dataset"

# (height, width): two larger than the 32 px target (cropped and shrunk), one at it, one smaller (enlarged)
SIZES = ((48, 64), (32, 32), (80, 60), (24, 40))
CLASSES = ("red", "blue")
PER_CLASS = 12
PER_SHARD = 10  # 25 urls listed (24 pictures and the 404) -> three shards
MISSING = "missing.jpg"  # listed, never served: a 404 that img2dataset counts in its stats and leaves out of the tars
# img2dataset as a user runs it on a url list, scaled down: one process with a few threads for 25 urls
OPTIONS = (
    "--input_format=csv",
    "--url_col=url",
    "--caption_col=caption",
    "--output_format=webdataset",
    "--image_size=32",
    "--resize_mode=center_crop",
    f"--number_sample_per_shard={PER_SHARD}",
    "--processes_count=1",
    "--thread_count=4",
    "--timeout=5",
    "--enable_wandb=False",
)


def img2dataset_exe() -> Path:
    """img2dataset's executable; fails when ``make test`` asked for it and it is not there, else skips."""
    asked = os.environ.get("DDM_IMG2DATASET")
    exe = Path(asked) if asked else DEFAULT_EXE
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    if asked:
        pytest.fail(f"DDM_IMG2DATASET={asked} is not an executable: run `make img2dataset-venv` (it installs it)")
    pytest.skip(f"img2dataset is not installed at {exe}: run `make img2dataset-venv` (make test does)")


def picture(cls: int, i: int, h: int, w: int) -> np.ndarray:
    """Class 0 red, class 1 blue, each a smooth gradient with a blob: far apart in pixels at any crop."""
    rng = np.random.default_rng(100 * cls + i)
    y, x = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7, 2)
    blob = 60 * np.exp(-((x / w - cx) ** 2 + (y / h - cy) ** 2) / 0.05)
    main = 170 + 40 * x / w + blob
    other = 30 + 30 * y / h + blob / 2
    img = np.stack([main, other, other], axis=2) if cls == 0 else np.stack([other, other, main], axis=2)
    return img.clip(0, 255).astype(np.uint8)


def write_pictures(folder: Path) -> list[str]:
    """``PER_CLASS`` pictures of each class, JPEG and PNG in turn, of the ``SIZES`` in turn; their file names."""
    folder.mkdir(parents=True)
    names = []
    for cls, label in enumerate(CLASSES):
        for i in range(PER_CLASS):
            h, w = SIZES[i % len(SIZES)]
            name = f"{label}_{i:02d}.{'jpg' if i % 2 == 0 else 'png'}"
            Image.fromarray(picture(cls, i, h, w)).save(folder / name)
            names.append(name)
    return names


@dataclass(frozen=True)
class Downloaded:
    """img2dataset's output folder and what was asked of it."""

    shards: Path  # the folder img2dataset wrote (.tar shards, a parquet and _stats.json per shard)
    base_url: str  # http://127.0.0.1:PORT/ that served the pictures (stopped since)
    served: tuple[str, ...]  # file names of the pictures that were served
    missing: str  # the url listed that answered 404


def _serve(folder: Path, log) -> tuple[subprocess.Popen, int]:
    """``http.server`` on a free loopback port of its own choosing; the port read from its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ...", printed once it listens
    line = proc.stdout.readline()
    try:
        return proc, int(line.split(" port ")[1].split()[0])
    except (IndexError, ValueError):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"http.server did not say its port: {line!r}") from None


def download(root: Path) -> Downloaded:
    """Write the pictures, serve them on loopback, and let img2dataset download them (32 px, centre crop)."""
    exe = img2dataset_exe()
    names = write_pictures(root / "site")
    with open(root / "http.log", "w") as log:  # the server keeps its own handle of it
        proc, port = _serve(root / "site", log)
    try:
        base = f"http://127.0.0.1:{port}/"
        with open(root / "urls.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for name in [*names[:5], MISSING, *names[5:]]:
                writer.writerow([base + name, f"a {name.split('_')[0]} picture"])
        out = root / "shards"
        env = dict(
            os.environ,
            no_proxy="127.0.0.1,localhost",
            NO_PROXY="127.0.0.1,localhost",
            NO_ALBUMENTATIONS_UPDATE="1",  # albumentations would look for a newer version of itself online
        )
        done = subprocess.run(
            [str(exe), str(root / "urls.csv"), f"--output_folder={out}", *OPTIONS],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"img2dataset failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return Downloaded(out, base, tuple(names), base + MISSING)
