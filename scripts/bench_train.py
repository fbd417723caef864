#!/usr/bin/env python
"""Training throughput of expert networks: step time, images/s, peak memory, TFLOP/s and, on a GPU, MFU.

    python scripts/bench_train.py                                   # the demo's expert on this machine
    python scripts/bench_train.py --size DiT-B/2 DiT-XL/2 --image-size 32 --channels 4 --batch 32
    python scripts/bench_train.py --size DiT-XL/2 --image-size 32 --channels 4 --batch 32 --compile

One row per size: the real training step (``ExpertModule`` under Lightning,
bf16 autocast on a GPU, fp32 on CPU unless --precision says otherwise) on
random in-memory batches, timed after --warmup steps. FLOPs are 3 x the
counted forward FLOPs; MFU is against the GPU's dense bf16 peak (a table in
``ddm.train.throughput``, or --peak-tflops). On CPU the MFU column reads ``-``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from ddm.markdown import num, table
from ddm.train.throughput import measure


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["DiT-T/4"], help="DiT sizes, e.g. DiT-B/2 DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=28, help="input side: 28 for the demo, 32 for 256px latents")
    ap.add_argument("--channels", type=int, default=1, help="1 grey, 3 RGB (uint8 batches), 4 SD-VAE latents (float)")
    ap.add_argument("--batch", type=int, default=64, help="batch per step on the one device")
    ap.add_argument("--classes", type=int, default=10, help="class labels (0: unconditional)")
    ap.add_argument("--steps", type=int, default=20, help="steps timed")
    ap.add_argument("--warmup", type=int, default=5, help="steps run first and not timed")
    ap.add_argument("--precision", default="auto", help="auto (bf16-mixed on a GPU, 32-true on CPU) or a Lightning one")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network (as model.compile=true)")
    ap.add_argument("--accelerator", default="auto", help="auto, gpu or cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, for MFU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for size in args.size:
        results.append(
            measure(
                size,
                args.image_size,
                args.channels,
                args.batch,
                num_classes=args.classes,
                steps=args.steps,
                warmup=args.warmup,
                precision=args.precision,
                compile=args.compile,
                accelerator=args.accelerator,
                peak_tflops=args.peak_tflops,
            )
        )
    r0 = results[0]
    host = platform.processor() or platform.machine()
    print(
        f"device: {r0.device} (host {host}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
        f"{args.steps} steps timed after {args.warmup}"
    )
    header = ["model", "params", "input", "batch", "precision", "compile", "step ms", "img/s", "peak mem GiB"]
    header += ["TFLOP/s", "MFU"]
    rows = [
        [
            r.size,
            f"{r.params / 1e6:.1f}M",
            "x".join(map(str, r.input_shape)),
            r.batch,
            r.precision,
            "yes" if r.compiled else "no",
            num(1e3 * r.step_s, ".1f"),
            num(r.images_per_s, ".1f"),
            num(r.peak_memory_bytes / 2**30, ".2f"),
            num(r.tflops, ".3g"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
        ]
        for r in results
    ]
    print("\n".join(table(header, rows)))
    return results


if __name__ == "__main__":
    main()
