"""Stage ``plan``: what a config would train, before anything runs.

    ddm plan experiment=imagenet256
    ddm plan experiment=imagenet256 island=gpu8_ddp               # the same experts on 8-GPU DDP islands
    ddm plan experiment=imagenet256 plan.images_per_s=310    # a throughput bench_train printed

prints the island layout (jobs x GPUs per job, the GPUs in all) and the batch
each GPU computes per step, ``batch_size / (devices x nodes x
accumulate_grad_batches)``; then, for the experts and the router: network
size, parameters, forward FLOPs per sample, training FLOPs per step and in
all, the state memory per GPU (weights, EMA, gradients and AdamW moments,
fp32; FSDP divides it over the devices it shards on) and the GPU-days on the
chosen island.

The time comes from a measured throughput when ``plan.images_per_s`` is given
(images/s per GPU from ``scripts/bench_train.py``, at the batch it was measured
at: it is used as given, and the output says which per-GPU batch to measure it
at). Otherwise from the FLOPs at an assumed utilisation, with a stated model of
how a small per-GPU batch wastes a GPU:

* compute: ``plan.mfu`` of ``plan.peak_tflops`` is reached at ``plan.mfu_batch``
  (16) images per GPU per step or more; below it the MFU falls in proportion,
  ``mfu x per_gpu_batch / mfu_batch`` (a GPU fed 4 images of DiT-XL/2 is mostly
  waiting on kernel launches and small matrix products);
* communication: a job on n > 1 GPUs all-reduces its fp32 gradients once per
  optimizer step, a ring all-reduce of ``2 (n-1)/n x 4 x params`` bytes at the
  bus bandwidth ``plan.nvlink_gb_s`` (one node) or ``plan.network_gb_s`` (an
  island of several nodes), not overlapped with the backward pass, so an upper
  bound on its cost. FSDP's reduce-scatter and all-gathers move at least as
  much, so it is charged the same.

A network of ``LARGE_MODEL_PARAMS`` (100M, DiT-B/2 size) or more on a GPU
island that gives a GPU fewer than ``plan.mfu_batch`` images per step is
warned about, in the log and in the printed output: the same GPUs would train
more experts side by side, one each (``island=gpu``). Activation memory is not
estimated: ``bench_train`` measures the peak. Reads the config only; the
networks are built on the ``meta`` device, so no memory is allocated.
"""

from __future__ import annotations

import logging
import math

import torch

from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput, Unusable
from ddm.eval.flops import count_flops
from ddm.io import read_json
from ddm.markdown import fmt_flops, num, table
from ddm.models.conditioning import example_condition
from ddm.models.dit import DiT, DiTClassifier, count_params
from ddm.ranks import island_processes
from ddm.settings import Island, Plan, Settings
from ddm.text.spec import conditioning_args, router_conditioning_args, text_spec

log = logging.getLogger("ddm")

STATE_BYTES_PER_PARAM = 4 + 4 + 4 + 8  # fp32 weights, EMA, gradients, AdamW's two moments
SD_VAE_DOWNSAMPLE = 8  # the SD VAE: 256 px -> 32x32x4
GRAD_BYTES_PER_PARAM = 4  # bf16-mixed keeps fp32 gradients: what data parallelism all-reduces
LARGE_MODEL_PARAMS = 100e6  # DiT-B/2 size and up: a network this large is worth a GPU's full attention


def input_shape(cfg: Settings) -> tuple[int, int]:
    """(channels, side) the networks see: the data's pixels, or the VAE's latents."""
    data = cfg.data
    if str(cfg.vae.kind) == "none":
        return int(data.channels), int(data.image_size)
    # the VAE's own factors when its folder is here, else the SD VAE's
    try:
        from ddm.latent.run_latents import current_identity, vae_spec

        identity = current_identity(vae_spec(cfg))
        down, channels = identity["downsample"], identity["latent_channels"]
    except (BadInput, MissingInput, Unusable):  # no VAE here to read: plan with the SD VAE's shape
        down, channels = SD_VAE_DOWNSAMPLE, 4
    return channels, int(data.image_size) // down


def per_gpu_batch(batch: int, island: Island, what: str) -> int:
    """Images one device computes per forward pass: ``batch / (devices x nodes x accumulate_grad_batches)``.

    The trainer splits the batch the same way and refuses a remainder (``ddm.train.trainer.per_device_batch``);
    so does the plan, before anyone waits for a job to fail.
    """
    devices, nodes = int(island.devices), int(island.num_nodes)
    accumulate = int(island.accumulate_grad_batches)
    shards = devices * nodes * accumulate
    if batch < 1 or batch % shards:
        raise BadInput(
            f"{what}.batch_size={batch} is not a positive multiple of devices x nodes x accumulate_grad_batches "
            f"= {devices} x {nodes} x {accumulate} = {shards} (island.*): each device must get the same whole "
            f"number of images; choose a batch size that is, or an island with fewer devices"
        )
    return batch // shards


def assumed_mfu(mfu: float, per_gpu: int, mfu_batch: int) -> float:
    """The utilisation assumed at ``per_gpu`` images per step: ``mfu`` from ``mfu_batch`` images up, in
    proportion below (4 images where 16 fill the GPU: a quarter of ``mfu``)."""
    return mfu * min(1.0, per_gpu / mfu_batch)


def allreduce_seconds(params: int, ranks: int, bus_gb_s: float | None) -> float:
    """One ring all-reduce of the fp32 gradients over ``ranks`` GPUs at bus bandwidth ``bus_gb_s`` (GB/s).

    Each GPU sends and receives ``2 (ranks-1)/ranks`` times the gradient bytes; nccl-tests' ``busbw`` is
    defined so that this over ``busbw`` is the time, so a measured busbw can be passed as it is. None (or
    one GPU): nothing is charged.
    """
    if ranks <= 1 or bus_gb_s is None:
        return 0.0
    return 2 * (ranks - 1) / ranks * params * GRAD_BYTES_PER_PARAM / (float(bus_gb_s) * 1e9)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _network_row(name: str, net, batch: int, steps: int, count: int, island: Island, plan: dict) -> dict:
    channels, side = net.trunk.in_channels, net.trunk.image_size
    x = torch.zeros(1, channels, side, side, device="meta")
    y = example_condition(net, 1, "meta")
    forward = count_flops(net, x, torch.zeros(1, device="meta"), y)
    params = count_params(net)
    on_gpu = str(island.accelerator) != "cpu"
    nodes = int(island.num_nodes)
    gpus = int(island.devices) * nodes if on_gpu else 1
    shards = 1
    if str(island.strategy) == "fsdp":
        shards = int(island.devices) if str(island.sharding) == "hybrid" else gpus
    per_gpu = per_gpu_batch(batch, island, name)
    step_flops = 3 * forward * batch
    mfu, compute_s, allreduce_s = None, None, 0.0
    if plan["images_per_s"]:
        seconds = steps * batch / (float(plan["images_per_s"]) * gpus)
        basis = (
            f"{plan['images_per_s']:g} images/s per GPU (measured), used as given: it holds at the per-GPU batch "
            f"it was measured at; this plan runs {per_gpu} per GPU (scripts/bench_train.py --batch {per_gpu}), "
            f"no all-reduce added"
        )
    else:
        mfu = assumed_mfu(plan["mfu"], per_gpu, plan["mfu_batch"])
        compute_s = step_flops / (mfu * plan["peak_tflops"] * 1e12 * gpus)
        bus = plan["network_gb_s"] if nodes > 1 else plan["nvlink_gb_s"]
        allreduce_s = allreduce_seconds(params, gpus, bus) if on_gpu else 0.0
        seconds = steps * (compute_s + allreduce_s)
        basis = f"{mfu:.0%} MFU of {plan['peak_tflops']:g} TFLOP/s (assumed"
        if mfu < plan["mfu"]:
            basis += f": {plan['mfu']:.0%} from {plan['mfu_batch']} images per GPU up, x {per_gpu}/{plan['mfu_batch']}"
        basis += f"), {compute_s * 1e3:.3g} ms compute per step"
        if allreduce_s:
            link = "between nodes, plan.network_gb_s" if nodes > 1 else "in one node, plan.nvlink_gb_s"
            basis += (
                f" + {allreduce_s * 1e3:.3g} ms to all-reduce {params * GRAD_BYTES_PER_PARAM / 1e9:.3g} GB of "
                f"fp32 gradients over {gpus} GPUs at {bus:g} GB/s ({link}, assumed, not overlapped)"
            )
    warning = None
    if on_gpu and params >= LARGE_MODEL_PARAMS and per_gpu < plan["mfu_batch"]:
        warning = (
            f"{name}: each GPU computes {per_gpu} images per step of a {params / 1e6:.0f}M-parameter {net.trunk.size} "
            f"({name}.batch_size={batch} over {gpus} GPUs); a GPU needs about {plan['mfu_batch']} (plan.mfu_batch) "
            f"to be used well, so these GPUs would train more side by side: one GPU per job (island=gpu), or a "
            f"larger {name}.batch_size on this island"
        )
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
        per_gpu_batch=per_gpu,
        mfu=mfu,
        compute_s_per_step=compute_s,
        allreduce_s_per_step=allreduce_s,
        gpu_days=seconds * gpus * count / 86400,
        days_per_job=seconds / 86400,
        basis=basis,
        warning=warning,
    )


def layout(row: dict, island: Island) -> str:
    """``experts: 8 jobs x 8 GPUs (ddp); 64 GPUs in all; 4 images per GPU per step (...)``."""
    on_gpu = str(island.accelerator) != "cpu"
    unit = "GPU" if on_gpu else "CPU device"
    gpus, count = row["gpus_per_job"], row["count"]
    jobs = f"{row['network']}s" if count > 1 else row["network"]
    text = f"{jobs}: {_plural(count, 'job')} x {_plural(gpus, unit)}"
    if gpus > 1:
        text += f" ({island.strategy})"
    if count > 1:
        text += f"; {_plural(count * gpus, unit)} in all"
    devices, nodes = int(island.devices), int(island.num_nodes)
    accumulate = int(island.accumulate_grad_batches)
    batch = row["per_gpu_batch"] * devices * nodes * accumulate
    return (
        f"{text}; {row['per_gpu_batch']} images per {unit} per step ({row['network']}.batch_size {batch} / "
        f"({_plural(devices, 'device')} x {_plural(nodes, 'node')} x accumulate_grad_batches {accumulate}))"
    )


def plan_settings(pc: Plan) -> dict:
    """``cfg.plan`` as a dict, checked: a bad value is named before any number is computed from it."""
    plan = pc.to_dict()
    optional = ("images_per_s", "nvlink_gb_s", "network_gb_s")  # null: nothing measured / no all-reduce charged
    for key in ("mfu", "mfu_batch", "peak_tflops", *optional):
        value = plan[key]
        if value is None and key in optional:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if key == "mfu":
            ok, want = 0 < number <= 1, "in (0, 1]"
        elif key == "mfu_batch":
            ok, want = number >= 1 and number == int(number), "a whole number of images, at least 1"
        else:
            ok, want = number > 0, "above 0" + (" (or null)" if key in optional else "")
        if not ok or not math.isfinite(number) or isinstance(value, bool):
            raise BadInput(f"plan.{key}={value!r} must be {want}")
        plan[key] = int(number) if key == "mfu_batch" else number
    return plan


def run(cfg: Settings) -> dict:
    plan = plan_settings(cfg.plan)
    if island_processes(cfg.island) is None:
        raise BadInput(
            f"island.devices={cfg.island.devices!r}, island.num_nodes={cfg.island.num_nodes!r}: the "
            f"plan counts GPUs per job, so give both as numbers (e.g. island.devices=8), as the job will get them"
        )
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
    header += ["state / GPU", "GPUs / job", "batch / GPU", "days / job", "GPU-days"]
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
                r["per_gpu_batch"],
                num(r["days_per_job"], ".3g"),
                num(r["gpu_days"], ".3g"),
            ]
            for r in rows
        ],
    )
    print(f"plan for {cfg.name} on island {cfg.island.accelerator} x{rows[0]['gpus_per_job']} ({cfg.island.strategy})")
    print("\n".join(layout(r, cfg.island) for r in rows))
    print("\n".join(lines))
    for r in rows:
        print(f"{r['network']} time: {r['basis']}")
    warnings = [r["warning"] for r in rows if r["warning"]]
    for w in warnings:
        log.warning("plan: %s", w)
        print(f"WARNING {w}")
    print("state excludes activations (scripts/bench_train.py measures the peak)")
    return dict(stage="plan", rows=rows, warnings=warnings)
