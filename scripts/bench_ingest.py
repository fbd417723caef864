#!/usr/bin/env python
"""Ingest throughput: prepare, embed, cluster and partition on a folder of ImageNet-like JPEGs.

    python scripts/bench_ingest.py                           # makes 1200 JPEGs of 350-500 px, 1 worker and all cores
    python scripts/bench_ingest.py --images /data/imagenet/train --limit 5000 --workers 1 8
    python scripts/bench_ingest.py --cores 32 --gpus 8 --encoder-images-per-s 2000   # the projection's node

Runs the real stages (``ddm prepare`` with ``data=image_folder data.resize=256``, then ``embed``,
``cluster`` and ``partition``) in a temporary run per ``--workers`` value, timing each (prepare:
best of ``--repeat``). Prints images/s (and per worker), the
speed-up of each worker count over the first, the bytes stored per image against the source
files', and the projected wall time of each stage for 1.28M and 100M images on a node of
``--cores`` cores, assuming the rate per worker measured at the largest count holds there.
For embedding on ``--gpus`` GPUs, give the encoder's measured images/s per GPU
(``--encoder-images-per-s``); the projection then takes the slower of decoding on the cores and
encoding on the GPUs. A projection is arithmetic on these figures, not a measurement.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ddm.config import settings
from ddm.cores import available_cores
from ddm.data.shards import load_manifest
from ddm.markdown import num, table
from ddm.settings import changed
from ddm.stages.runner import run_stage

SIZES = (1_281_167, 100_000_000)  # ImageNet-1k's training set; a LAION-scale set


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photograph-like image: smooth colour fields, edges and fine texture, so JPEG sizes are realistic."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.5, 12, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(20, 60, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)[:, :, None]
    edges = (np.sin(2 * np.pi * rng.uniform(2, 6) * x + rng.uniform(0, 6)) > 0)[:, :, None] * rng.uniform(-40, 40, 3)
    img += 128 + edges + rng.normal(0, 9, (h, w, 1))
    return img.clip(0, 255).astype(np.uint8)


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of 350-500 px a side in 10 class folders, as ImageNet's are."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(350, 501, 2))
        Image.fromarray(photo(rng, h, w)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _decode_loop(args: tuple[bytes, int, int]) -> int:
    """Decode, crop, resize and encode one JPEG ``n`` times: the work of prepare, without ddm around it."""
    data, side, n = args
    for _ in range(n):
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
        crop = min(rgb.size)
        small = rgb.crop((0, 0, crop, crop)).resize((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0)
        small.save(io.BytesIO(), "JPEG", quality=95)
    return n


def machine_ceiling(sample: Path, side: int, workers: int, n: int = 400) -> float:
    """The speed-up ``workers`` plain processes get over one on the same decode loop: what this machine allows."""
    data = sample.read_bytes()
    start = time.perf_counter()
    _decode_loop((data, side, n))
    one = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_decode_loop, [(data, side, n // workers)] * workers)
        many = time.perf_counter() - start
    return one / many * (n // workers * workers) / n


def timed(stage: str, cfg) -> float:
    start = time.perf_counter()
    run_stage(stage, cfg)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=None, help="a folder of images (class subfolders); default: made")
    ap.add_argument("--count", type=int, default=1200, help="images to make when --images is not given")
    ap.add_argument("--limit", type=int, default=None, help="prepare this many of --images (a seeded subset)")
    ap.add_argument("--size", type=int, default=256, help="side of the prepared images (data.resize)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default: 1 and all cores)")
    ap.add_argument("--shard-size", type=int, default=100, help="data.shard_size: a shard is one worker's unit of work")
    ap.add_argument("--format", default="jpeg", choices=("jpeg", "png"), help="data.image_format")
    ap.add_argument("--repeat", type=int, default=2, help="prepare runs per worker count; the fastest is shown")
    ap.add_argument("--k", type=int, default=8, help="clusters")
    ap.add_argument("--cores", type=int, default=32, help="cores of the node the projection is for")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of that node, for embedding on them")
    ap.add_argument("--encoder-images-per-s", type=float, default=None, help="the encoder's images/s on one GPU")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run here instead of a temporary folder")
    args = ap.parse_args(argv)
    workers = sorted(set(args.workers or [1, available_cores()]))

    work = Path(tempfile.mkdtemp(prefix="bench_ingest_")) if args.keep is None else args.keep
    try:
        images = args.images or make_folder(work / "images", args.count)
        files = [p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")]
        base = [
            "data=image_folder",
            f"data.root={images}",
            f"data.resize={args.size}",
            f"data.image_size={args.size}",
            f"data.image_format={args.format}",
            f"data.shard_size={args.shard_size}",
            *([f"data.limit={args.limit}"] if args.limit else []),
            f"cluster.k={args.k}",
            "cluster.method=flat",
            "log_level=WARNING",
        ]
        rows, rate, later = [], {}, {}
        for n in workers:
            cfg = settings([*base, f"run_dir={work / f'run-w{n}'}", f"data.workers={n}", f"embed.workers={n}"])
            # best of --repeat runs (redo=true after the first): the first pays for cold files and imports
            seconds = min(timed("prepare", changed(cfg, {"redo": i > 0})) for i in range(args.repeat))
            manifest = load_manifest(Path(cfg.run_dir) / "data")
            count = manifest["num_samples"]
            rate[n] = count / seconds
            rows.append(["prepare", n, count, num(seconds, ".3g"), num(rate[n], ".4g"), num(rate[n] / n, ".4g")])
            later[n] = {stage: timed(stage, cfg) for stage in ("embed", "cluster", "partition")}
            for stage, took in later[n].items():
                rows.append([stage, n, count, num(took, ".3g"), num(count / took, ".4g"), "-"])
        rows.sort(key=lambda row: ["prepare", "embed", "cluster", "partition"].index(row[0]))
        first, last = workers[0], workers[-1]
        stored = sum(s["size"] for s in manifest["shards"]) / count
        source = np.mean([p.stat().st_size for p in files])
        print(
            f"# ingest on {platform.node()} ({available_cores()} cores, {platform.processor() or platform.machine()})"
        )
        print(f"{count} images of {images} -> {args.size} px {args.format}, {args.shard_size} per shard\n")
        print("\n".join(table(["stage", "workers", "images", "seconds", "images/s", "images/s per worker"], rows)))
        speedup = rate[last] / rate[first]
        embed_speedup = later[first]["embed"] / later[last]["embed"]
        partition_speedup = later[first]["partition"] / later[last]["partition"]
        ceiling = machine_ceiling(files[0], args.size, last) if last > 1 else 1.0
        print(
            f"\nprepare speed-up, {last} workers over {first}: {speedup:.2f}x (the same decode loop in {last} plain "
            f"processes over one, without ddm: {ceiling:.2f}x on this machine); embed {embed_speedup:.2f}x, "
            f"partition {partition_speedup:.2f}x (cluster is faiss's own threads: workers do not apply)"
        )
        print(
            f"bytes per image: stored {stored / 1e3:.1f} KB ({args.size} px {args.format}, tar headers included) "
            f"against the source files' {source / 1e3:.1f} KB: {stored / source:.2f}x"
        )
        projection = project(rate[last] / last, later[last], count, last, args)
        node = f"{args.cores} cores" + (f" and {args.gpus} GPUs" if args.gpus else "")
        print(
            f"\nprojected wall time on {node} (prepare and embed at the rate per worker above; cluster and partition "
            f"scaled from this run, fixed costs included, so an upper bound):"
        )
        print("\n".join(table(["stage", *[f"{n:,} images" for n in SIZES]], projection)))
        return dict(rate=rate, speedup=speedup, ceiling=ceiling, stored=stored, source=source, later=later)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def project(prepare_per_core: float, later: dict, count: int, workers: int, args) -> list[list[str]]:
    """Each stage's wall time for SIZES images: prepare and embed spread over the cores (embed over the GPUs
    too when given), cluster and partition as measured per image (one process each)."""
    per_image = {stage: seconds / count for stage, seconds in later.items()}
    rows = []

    def hours(seconds: float) -> str:
        return f"{seconds / 3600:.2f} h"

    prepare = [n / (prepare_per_core * args.cores) for n in SIZES]
    rows.append(["prepare", *map(hours, prepare)])
    embed_cpu = [n * per_image["embed"] * workers / args.cores for n in SIZES]  # measured with `workers` decoding
    if args.gpus and args.encoder_images_per_s:
        embed = [max(c, n / (args.gpus * args.encoder_images_per_s)) for c, n in zip(embed_cpu, SIZES)]
    else:
        embed = embed_cpu
    rows.append(["embed", *map(hours, embed)])
    for stage in ("cluster", "partition"):
        rows.append([stage, *(hours(n * per_image[stage]) for n in SIZES)])
    single = [[n * per_image[stage] for n in SIZES] for stage in ("cluster", "partition")]
    totals = [sum(parts) for parts in zip(prepare, embed, *single)]
    rows.append(["all four", *map(hours, totals)])
    return rows


if __name__ == "__main__":
    main()
