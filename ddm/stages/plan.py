"""Stage ``plan``: what a config would train, before anything runs.

    ddm plan experiment=imagenet256
    ddm plan experiment=imagenet256 plan.images_per_s=310    # a throughput bench_train printed

prints, for the experts and the router: network size, parameters, forward
FLOPs per sample, training FLOPs per step and in all, the state memory per
GPU (weights, EMA, gradients and AdamW moments, fp32; FSDP divides it over the
devices it shards on) and the GPU-days on the chosen island. The time comes
from a measured throughput when ``plan.images_per_s`` is given (images/s per
GPU from ``scripts/bench_train.py``), else from the FLOPs at an assumed
``plan.mfu`` of ``plan.peak_tflops`` (stated in the output). Activation memory
is not estimated: ``bench_train`` measures the peak. Reads the config only;
the networks are built on the ``meta`` device, so no memory is allocated.
"""

from __future__ import annotations

import logging

import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.eval.flops import count_flops
from ddm.io import read_json
from ddm.markdown import fmt_flops, num, table
from ddm.models.conditioning import example_condition
from ddm.models.dit import DiT, DiTClassifier, count_params
from ddm.stages.conditioning import conditioning_args, router_conditioning_args, text_spec

log = logging.getLogger("ddm")

STATE_BYTES_PER_PARAM = 4 + 4 + 4 + 8  # fp32 weights, EMA, gradients, AdamW's two moments
SD_VAE_DOWNSAMPLE = 8  # the SD VAE: 256 px -> 32x32x4


def input_shape(cfg) -> tuple[int, int]:
    """(channels, side) the networks see: the data's pixels, or the VAE's latents."""
    data = cfg.data
    if str((cfg.get("vae") or {}).get("kind") or "none") == "none":
        return int(data.channels), int(data.image_size)
    # the VAE's own factors when its folder is here, else the SD VAE's
    try:
        from ddm.stages.encode import current_identity, vae_spec

        identity = current_identity(vae_spec(cfg))
        down, channels = identity["downsample"], identity["latent_channels"]
    except (BadInput, MissingInput, Unusable):  # no VAE here to read: plan with the SD VAE's shape
        down, channels = SD_VAE_DOWNSAMPLE, 4
    return channels, int(data.image_size) // down


def _network_row(name: str, net, batch: int, steps: int, count: int, island, plan) -> dict:
    channels, side = net.trunk.in_channels, net.trunk.image_size
    x = torch.zeros(1, channels, side, side, device="meta")
    y = example_condition(net, 1, "meta")
    forward = count_flops(net, x, torch.zeros(1, device="meta"), y)
    params = count_params(net)
    gpus = int(island.devices) * int(island.get("num_nodes", 1) or 1) if island.accelerator != "cpu" else 1
    shards = 1
    if str(island.strategy) == "fsdp":
        shards = int(island.devices) if str(island.get("sharding", "full")) == "hybrid" else gpus
    step_flops = 3 * forward * batch
    if plan.get("images_per_s"):
        seconds = steps * batch / (float(plan.images_per_s) * gpus)
        basis = f"{plan.images_per_s} images/s per GPU (measured)"
    else:
        seconds = steps * step_flops / (float(plan.mfu) * float(plan.peak_tflops) * 1e12 * gpus)
        basis = f"{float(plan.mfu):.0%} MFU of {plan.peak_tflops} TFLOP/s (assumed)"
    return dict(
        network=name,
        size=net.trunk.size,
        count=count,
        params=params,
        input=f"{channels}x{side}x{side}",
        forward_flops=forward,
        step_flops=step_flops,
        total_flops=step_flops * steps * count,
        state_gib_per_gpu=params * STATE_BYTES_PER_PARAM / shards / 2**30,
        gpus_per_job=gpus,
        gpu_days=seconds * gpus * count / 86400,
        days_per_job=seconds / 86400,
        basis=basis,
    )


def run(cfg) -> dict:
    plan = cfg.get("plan") or {}
    if float(plan.get("mfu", 0.4)) <= 0 or float(plan.get("mfu", 0.4)) > 1:
        raise BadInput(f"plan.mfu={plan.get('mfu')} must be in (0, 1]")
    channels, side = input_shape(cfg)
    num_classes = int(cfg.data.num_classes)
    manifest = RunDir(cfg.run_dir).data_manifest
    if manifest.exists():  # prepared already: the classes the data really has
        num_classes = int(read_json(manifest).get("num_classes", num_classes))
    meta = dict(num_classes=num_classes, image_size=side, channels=channels)
    k = int(cfg.cluster.k)
    with torch.device("meta"):
        expert = DiT(cfg.model.size, side, channels, **conditioning_args(text_spec(cfg), meta))
        router = DiTClassifier(k, cfg.router.size, side, channels, **router_conditioning_args(cfg, meta))
    rows = [
        _network_row("expert", expert, int(cfg.expert.batch_size), int(cfg.expert.steps), k, cfg.island, plan),
        _network_row("router", router, int(cfg.router.batch_size), int(cfg.router.steps), 1, cfg.island, plan),
    ]
    header = ["network", "size", "count", "params", "input", "forward / sample", "train / step", "train total"]
    header += ["state / GPU", "GPUs / job", "days / job", "GPU-days"]
    lines = table(
        header,
        [
            [
                r["network"],
                r["size"],
                r["count"],
                f"{r['params'] / 1e6:.1f}M",
                r["input"],
                fmt_flops(r["forward_flops"]),
                fmt_flops(r["step_flops"]),
                fmt_flops(r["total_flops"]),
                f"{num(r['state_gib_per_gpu'], '.2f')} GiB",
                r["gpus_per_job"],
                num(r["days_per_job"], ".3g"),
                num(r["gpu_days"], ".3g"),
            ]
            for r in rows
        ],
    )
    print(f"plan for {cfg.name} on island {cfg.island.accelerator} x{rows[0]['gpus_per_job']} ({cfg.island.strategy})")
    print("\n".join(lines))
    print(f"time at {rows[0]['basis']}; state excludes activations (scripts/bench_train.py measures the peak)")
    return dict(stage="plan", rows=rows)
