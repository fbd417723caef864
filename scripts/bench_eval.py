#!/usr/bin/env python
"""Evaluation throughput: images/s of the networks ``ddm evaluate`` runs besides the sampler.

    python scripts/bench_eval.py                      # this machine: CUDA when visible, else the CPU
    python scripts/bench_eval.py --device cpu --vae-images 0      # skip the (slow on CPU) VAE decode
    python scripts/bench_eval.py --images 4096 --vae-images 1024  # more images (a GPU)

One row per network, each at the batch size the ImageNet 256 experiment configures
(``experiment=imagenet256``: ``eval.batch_size``, ``eval.inception_batch_size``,
``vae.batch_size``), or fewer when fewer images are measured (the CPU defaults
measure a few images so the whole run takes about two minutes on 2 cores):

- the FID Inception's features of uint8 images (``data/weights/fid_inception_default_1.pt``
  or ``$DDM_FID_INCEPTION``; skipped, saying so, when there is no file), through
  ``ddm.eval.inception``; on a GPU also at ``eval.batch_size`` images per batch;
- the classifier feature net's features (``ddm.eval.feature_net``: a fresh net of
  ``eval.feature_net.width``; its speed does not depend on its training);
- the router diagnostics (``ddm.eval.router_diag.router_diagnostics``): the router of
  ``router.size`` on 32x32x4 latents, each held-out image noised once per
  ``eval.router.t_buckets`` bucket; images/s counts held-out images (one router call per bucket);
- the VAE decode of samples to uint8 images on the host (``RunLatents.decode`` then
  ``ddm.images.to_uint8``), in an AutoencoderKL of the Stable Diffusion VAE's shape with random
  weights (built offline; the same FLOPs as the real one), under ``vae.precision=auto``
  (bf16 autocast on a GPU, fp32 on the CPU); on a GPU also in fp32, for the ratio.

Inputs are random: 256 px RGB images for Inception and the feature net, latents
for the router and the VAE. Each row is timed after one warm-up batch; the last
column projects the time of the experiment's image count at that rate on this device
(``eval.num_samples``, 50,000 for FID-50k, per set of images; ``eval.router.num_samples`` for the router).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ddm.config import settings
from ddm.cores import available_cores
from ddm.devices import allow_tf32, resolve_device
from ddm.markdown import num, table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INCEPTION = ROOT / "data" / "weights" / "fid_inception_default_1.pt"
# images measured per network when not given: a few on the CPU (about two minutes on 2 cores), many on a GPU
CPU_IMAGES = dict(inception=32, feature_net=256, router=4, vae=2)
GPU_IMAGES = dict(inception=2048, feature_net=8192, router=2048, vae=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warm, full, device: torch.device) -> float:
    """Seconds of ``fn(full)`` after one warm-up call ``fn(warm)``."""
    fn(warm)
    sync(device)
    start = time.perf_counter()
    fn(full)
    sync(device)
    return time.perf_counter() - start


def host_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB images (at most 512 distinct ones, repeated: the content does not change the speed)."""
    pool = np.random.default_rng(seed).integers(0, 256, (min(n, 512), side, side, 3), dtype=np.uint8)
    return pool[np.arange(n) % len(pool)]


def row(name: str, what: str, batch: int, default: int, n: int, seconds: float, note: str = "") -> dict:
    return dict(name=name, what=what, batch=batch, default=default, n=n, seconds=seconds, rate=n / seconds, note=note)


def bench_inception(path: Path, images: np.ndarray, batches: list[int], device) -> list[dict]:
    from ddm.eval.inception import load_inception

    inception = load_inception(path, device=device)
    rows = []
    for batch in batches:
        b = min(batch, len(images))
        seconds = timed(lambda x, b=b: inception(x, b), images[:b], images, device)
        rows.append(row("Inception features", f"{inception.kind}, 256 px RGB", b, batches[0], len(images), seconds))
    return rows


def bench_feature_net(width: int, classes: int, images: np.ndarray, batch: int, device) -> dict:
    from ddm.eval import feature_net as fnet

    torch.manual_seed(0)
    net = fnet.FeatureNet(3, classes, width).eval().to(device)
    b = min(batch, len(images))
    seconds = timed(lambda x: fnet.features(net, x, b), images[:b], images, device)
    return row("feature net features", f"width {width} ({4 * width}-d), 256 px RGB", b, batch, len(images), seconds)


def bench_router(cfg, n: int, batch: int, device) -> dict:
    from ddm.eval.router_diag import router_diagnostics
    from ddm.flow import FlowPath
    from ddm.models import DiTClassifier

    k, classes, buckets = int(cfg.cluster.k), int(cfg.data.num_classes), int(cfg.eval.router.t_buckets)
    torch.manual_seed(0)
    router = DiTClassifier(k, str(cfg.router.size), 32, 4, classes).eval().to(device)
    x0 = torch.randn(n, 4, 32, 32)
    y = torch.randint(0, classes, (n,))
    clusters = torch.arange(n) % k
    b = min(batch, n)

    def diagnostics(m: int, t_buckets: int):
        return router_diagnostics(
            router, FlowPath(), x0[:m], y[:m], clusters[:m], t_buckets, batch_size=b, device=device
        )

    seconds = timed(lambda a: diagnostics(*a), (b, 1), (n, buckets), device)  # warm-up: one bucket, one batch
    what = f"{cfg.router.size}, 32x32x4 latents, {buckets} buckets"
    return row("router diagnostics", what, b, batch, n, seconds, f"{n * buckets / seconds:.4g} router calls/s")


def sd_vae():
    """An AutoencoderKL of the Stable Diffusion VAE's configuration (sd-vae-ft-ema), random weights."""
    from diffusers import AutoencoderKL

    from ddm.latent import LatentCodec

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    )
    return LatentCodec(vae, "random SD-VAE-shaped AutoencoderKL")


def bench_vae(n: int, batch: int, device, precisions: list[str]) -> list[dict]:
    from ddm.images import to_uint8
    from ddm.latent.run_latents import RunLatents

    codec = sd_vae().to(device)
    z = torch.randn(n, 4, 32, 32, device=device)  # where the sampler leaves them
    b = min(batch, n)
    rows = []
    for precision in precisions:
        latents = RunLatents(codec, 3, b, precision)
        dtype = "bf16" if latents.autocast == torch.bfloat16 else "fp32"
        seconds = timed(lambda x, decode=latents.decode: to_uint8(decode(x)), z[:b], z, device)
        what = f"SD-VAE-shaped decoder ({precision}: {dtype}), 32x32x4 -> 256 px uint8 on the host"
        rows.append(row("VAE decode", what, b, batch, n, seconds))
    return rows


def hardware(device: torch.device) -> str:
    cpu = f"{available_cores()} cores, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), host {cpu}"
    return f"CPU ({cpu}, load average {os.getloadavg()[0]:.2f} at the start)"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:1, ...")
    ap.add_argument("--images", type=int, default=None, help="images for Inception and the feature net")
    ap.add_argument("--router-images", type=int, default=None, help="held-out images for the router diagnostics")
    ap.add_argument("--vae-images", type=int, default=None, help="latents decoded (0: skip the VAE)")
    ap.add_argument("--inception", type=Path, default=None, help="FID Inception file (default: $DDM_FID_INCEPTION)")
    ap.add_argument("--experiment", default="imagenet256", help="the experiment whose batch sizes are used")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. eval.batch_size=512")
    args = ap.parse_args(argv)

    device = resolve_device(args.device, "--device")
    allow_tf32(device)  # as the evaluate stage does
    cfg = settings([f"experiment={args.experiment}", *args.set])
    ec = cfg.eval
    counts = dict(GPU_IMAGES if device.type == "cuda" else CPU_IMAGES)
    if args.images is not None:
        counts.update(inception=args.images, feature_net=args.images)
    counts.update({k: v for k, v in (("router", args.router_images), ("vae", args.vae_images)) if v is not None})

    print(f"# evaluation networks on {platform.node()}: {hardware(device)}, torch {torch.__version__}")
    given = " ".join(args.set)
    print(f"batch sizes of experiment={args.experiment} {given}".rstrip() + "; random inputs, one warm-up batch each\n")
    rows, notes = [], []

    inception_file = args.inception or Path(os.environ.get("DDM_FID_INCEPTION") or DEFAULT_INCEPTION)
    if inception_file.is_file():
        batches = [int(ec.inception_batch_size)]
        if device.type == "cuda" and int(ec.batch_size) != batches[0]:
            batches.append(int(ec.batch_size))  # larger batches on a GPU: for the ratio
        rows += bench_inception(inception_file, host_images(counts["inception"], 256), batches, device)
    else:
        notes.append(f"Inception skipped: no weights file at {inception_file} (set $DDM_FID_INCEPTION or --inception)")

    rows.append(
        bench_feature_net(
            int(ec.feature_net.width),
            int(cfg.data.num_classes),
            host_images(counts["feature_net"], 256, 1),
            int(ec.batch_size),
            device,
        )
    )
    rows.append(bench_router(cfg, counts["router"], int(ec.batch_size), device))

    if counts["vae"] > 0:
        precisions = ["auto", "fp32"] if device.type == "cuda" else ["auto"]
        rows += bench_vae(counts["vae"], int(cfg.vae.batch_size or 64), device, precisions)
        notes.append("VAE: the Stable Diffusion VAE's architecture with random weights (no download): its real speed")
    else:
        notes.append("VAE decode skipped (--vae-images 0)")

    header = ["network", "input", "batch (config)", "images", "seconds", "images/s", "the config's images"]
    project = dict.fromkeys(("Inception features", "feature net features", "VAE decode"), int(ec.num_samples))
    project["router diagnostics"] = int(ec.router.num_samples)
    lines = [
        [
            r["name"],
            r["what"],
            f"{r['batch']} ({r['default']})",
            r["n"],
            num(r["seconds"], ".3g"),
            num(r["rate"], ".4g"),
            f"{project[r['name']]:,}: {project[r['name']] / r['rate'] / 60:.3g} min",
        ]
        for r in rows
    ]
    print("\n".join(table(header, lines)))
    for r in rows:
        if r["note"]:
            notes.append(f"{r['name']}: {r['note']}")
    inception = [r for r in rows if r["name"] == "Inception features"]
    if inception:
        base = inception[0]["rate"]
        ratios = ", ".join(f"{r['name']} {r['rate'] / base:.3g}x" for r in rows if r["name"] != "Inception features")
        notes.append(f"images/s against Inception's at batch {inception[0]['batch']}: {ratios}")
        if len(inception) > 1:
            notes.append(
                f"Inception at batch {inception[1]['batch']} over {inception[0]['batch']}: "
                f"{inception[1]['rate'] / base:.2f}x"
            )
    vae = [r for r in rows if r["name"] == "VAE decode"]
    if len(vae) > 1:
        notes.append(f"VAE decode, bf16 autocast over fp32: {vae[0]['rate'] / vae[1]['rate']:.2f}x")
    print("\n".join(f"- {n}" for n in notes))
    return rows


if __name__ == "__main__":
    main()
