#!/usr/bin/env python
"""Sampling cost of the ensemble relative to one expert, at the same step count.

Prints, for each routing strategy, the ratio of its sampling time to one
expert's at the same step count (router included), by wall clock and by this
process's CPU time (steadier when other work shares the machine), and the
router's forward FLOPs relative to one expert's.

    python scripts/bench_sampling.py --run runs/demo            # a trained run
    python scripts/bench_sampling.py --size DiT-T/4 --k 4       # random weights, same shapes
    python scripts/bench_sampling.py --run runs/demo --device cuda --n 2000   # on a GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ddm.devices import allow_tf32, autocast_dtype, resolve_device
from ddm.ensemble import Ensemble
from ddm.eval.flops import count_flops
from ddm.flow import FlowPath
from ddm.models.dit import DiT, DiTClassifier
from ddm.sampling.solvers import sample


def load(args):
    if args.run:
        from ddm.sampling.ensemble_loading import load_ensemble

        ens, path, _ = load_ensemble(args.run, strategy="top1", device=args.device)
        experts = [ens.experts[str(k)] for k in ens.active_ids]
        return experts, ens.router, path
    torch.manual_seed(0)
    experts = [DiT(args.size, args.image_size, 1, 10).eval().to(args.device) for _ in range(args.k)]
    router = DiTClassifier(args.k, args.router_size, args.image_size, 1, 10).eval().to(args.device)
    return experts, router, FlowPath()


def time_once(model, path, n, image_size, channels, steps, cfg, device, precision) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one sampling run."""
    y = torch.arange(n) % 10
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    sample(
        model,
        path,
        (n, channels, image_size, image_size),
        y=y,
        steps=steps,
        solver="euler",
        cfg_scale=cfg,
        generator=torch.Generator().manual_seed(0),
        device=device,
        autocast=precision,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a run directory with trained experts and router")
    ap.add_argument("--size", default="DiT-T/4", help="expert size when no --run is given")
    ap.add_argument("--router-size", default="DiT-N/7", help="router size when no --run is given")
    ap.add_argument("--k", type=int, default=4, help="number of experts when no --run is given")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--n", type=int, default=200, help="images per sampling run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=1.5, help="guidance scale (same for every row)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--strategies", default="top1,topk,sample,full", help="ensemble strategies to time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="auto", help="auto (cuda when visible), cpu, cuda, cuda:1, ...")
    ap.add_argument("--precision", default="auto", help="auto (bf16 autocast on a GPU, fp32 on CPU), bf16, fp32")
    args = ap.parse_args()
    args.device = resolve_device(args.device, "--device")
    precision = autocast_dtype(args.precision, args.device, "--precision")
    allow_tf32(args.device)

    if args.threads:
        torch.set_num_threads(args.threads)
    experts, router, path = load(args)
    tr = experts[0].trunk
    shape = (1, tr.in_channels, tr.image_size, tr.image_size)
    x, t, y = (torch.zeros(shape), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    x, t, y = x.to(args.device), t.to(args.device), y.to(args.device)
    f_expert, f_router = count_flops(experts[0], x, t, y), count_flops(router, x, t, y)
    print(
        f"host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; device {device_name(args.device)}, precision {args.precision}"
    )
    print(
        f"expert {tr.size}: {f_expert / 1e6:.1f} MFLOPs/image/call; router {router.trunk.size}: "
        f"{f_router / 1e6:.1f} MFLOPs ({100 * f_router / f_expert:.1f}% of an expert)"
    )
    print(f"{args.n} images, {args.steps} Euler steps, cfg {args.cfg}, K={len(experts)}, best of {args.repeats}")
    models = {"one expert": experts[0]}
    for strategy in args.strategies.split(","):
        label = "top2" if strategy == "topk" else strategy
        models[label] = Ensemble(experts, router, strategy=strategy, top_k=2).eval()
    # Interleave the repeats (expert, top1, ..., expert, top1, ...) so that load from anything
    # else on the machine hits every row alike; keep the best of each.
    best = {name: (float("inf"), float("inf")) for name in models}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, model in models.items():
                wall, cpu = time_once(
                    model, path, args.n, tr.image_size, tr.in_channels, args.steps, args.cfg, args.device, precision
                )
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    base_wall, base_cpu = best["one expert"]
    print(f"{'':>14}  {'wall s':>8} {'ratio':>6}   {'CPU s':>8} {'ratio':>6}")
    for name, (wall, cpu) in best.items():
        print(f"{name:>14}: {wall:8.2f} {wall / base_wall:5.2f}x   {cpu:8.2f} {cpu / base_cpu:5.2f}x")


if __name__ == "__main__":
    main()
