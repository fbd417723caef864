"""A rough wall-time estimate of the table's work left, from a few training steps timed on this machine."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ddm.artifacts import RunDir
from ddm.devices import resolve_device
from ddm.eval.flops import experts_bound
from ddm.models.dit import DiT, DiTClassifier
from ddm.sampling import num_evaluations
from ddm.sampling.draw import DISTILLED
from ddm.settings import Island, Settings

from .cluster_routed import is_cluster_routed, routed_strategy
from .grid import CLASS_EXPERT, SEPARATE_CFG, SINGLE, Plan
from .guidance_sweep import SWEEP_FILE
from .layout import clustering_dir, data_dir

# Rough costs the estimate cannot time in advance (seconds).
# A Lightning step (data loading, EMA, logging) against the bare step timed here. Measured on 2 CPU cores
# (paper_small): 0.76-0.88x, the bare timing taken at start-up being the slower; 1.0 keeps it conservative.
TRAINER_FACTOR = 1.0
JOB_OVERHEAD_S = 8.0  # a Lightning job: start, loader worker, checkpoint, export
EVAL_OVERHEAD_S = 20.0  # held-out shards, loading, features, router diagnostics
DATA_S = 60.0  # prepare + embed of the whole dataset, once
CLUSTERING_S = 20.0  # cluster + partition of one configuration
FEATURE_NET_STEP_S = 0.1  # a feature-net training step: unknown until the data exists

# island.accelerator values whose training jobs run on a GPU when one is visible.
GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def training_device(island: Island) -> torch.device:
    """Where the training jobs will run: the island's GPU when it asks for one and one is visible, else the CPU.

    Unlike ``resolve_device`` on ``cuda``, a GPU island on a machine without one
    estimates on the CPU instead of failing: the estimate is only advice.
    """
    return resolve_device("auto" if str(island.accelerator) in GPU_ACCELERATORS else "cpu")


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn()`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _inputs(batch: int, shape, classes: int, device):
    x, t = torch.randn(batch, *shape, device=device), torch.rand(batch, device=device)  # (N, C, H, W), (N,)
    return x, t, (torch.randint(0, classes, (batch,), device=device) if classes else None)


def train_step_s(model: nn.Module, batch: int, shape, classes: int, device, bf16: bool, repeats: int = 3) -> float:
    """Seconds of one forward + backward + AdamW step at ``batch``."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = _inputs(batch, shape, classes, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t, y).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _timed(step, device, repeats)


def forward_s_per_image(model: nn.Module, batch: int, shape, classes: int, device) -> float:
    """Seconds of one no-grad forward per image, at ``batch``."""
    model = model.to(device).eval()
    x, t, y = _inputs(batch, shape, classes, device)
    with torch.no_grad():
        return _timed(lambda: model(x, t, y), device, 1) / batch


def estimate(cfg: Settings, plan: Plan) -> dict:
    """A rough wall-time estimate of what is left to do, from a few timed steps on this machine.

    Work whose result is on disk (an expert's or router's record, a run's metrics,
    the data, a clustering) counts zero, so a rerun estimates only what it will do.
    """
    torch.manual_seed(0)  # the timed networks' initial weights: only torch's stream is drawn here
    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    classes, rb = int(cfg.data.num_classes), int(cfg.router.batch_size)
    device = training_device(cfg.island)
    bf16 = device.type == "cuda" and str(cfg.island.precision).startswith("bf16")
    expert = DiT(str(cfg.model.size), shape[1], shape[0], classes)
    step_s = {
        b: train_step_s(expert, b, shape, classes, device, bf16) * TRAINER_FACTOR
        for b in sorted({r.expert_batch for r in plan.runs})
    }
    router_s = TRAINER_FACTOR * train_step_s(
        DiTClassifier(2, str(cfg.router.size), shape[1], shape[0], classes), rb, shape, classes, device, bf16
    )
    fwd_s = forward_s_per_image(expert, min(1024, 2 * int(cfg.sample.batch_size)), shape, classes, device)
    del expert
    distill_s = 0.0  # a distillation step: the student's training step and one teacher forward per sample
    if any(DISTILLED in r.strategies for r in plan.runs):
        db = int(cfg.distill.batch_size)
        student = DiT(str(cfg.distill.size or cfg.model.size), shape[1], shape[0], classes)
        distill_s = TRAINER_FACTOR * train_step_s(student, db, shape, classes, device, bf16) + db * fwd_s
    sc, ec = cfg.sample, cfg.eval
    calls = num_evaluations(int(sc.steps), str(sc.solver))
    cfg_factor = 2 if classes and float(sc.cfg_scale) != 1.0 else 1
    n, fm_n = int(ec.num_samples), len(ec.fm_loss.t_grid) * int(ec.fm_loss.num_samples)

    train = evaluation = 0.0
    for r in plan.runs:
        rd = RunDir(r.folder)
        for k in range(r.config.k):
            if not rd.expert_record(k).exists():
                train += r.expert_steps * step_s[r.expert_batch] + JOB_OVERHEAD_S
        if r.config.k > 1 and r.router_from is None and not rd.router_record.exists():
            train += r.router_steps * router_s + JOB_OVERHEAD_S
        if DISTILLED in r.strategies and not rd.distilled_record.exists():
            train += int(cfg.distill.steps) * distill_s + JOB_OVERHEAD_S
        if r.cfg_sweep and not (rd.root / "evaluation" / SWEEP_FILE).exists():
            # top-1 (one expert per call) at each scale but the table's own; unguided at scale 1
            for scale in (s for s in r.cfg_sweep if s != float(sc.cfg_scale)):
                evaluation += n * calls * (1 if scale == 1.0 or not classes else 2) * fwd_s
        if rd.evaluation_metrics.exists():
            continue
        for s in r.rows:
            # one model per call: the monolith, the fixed per-class expert, top-1 with separate guidance routing
            # (its null input's expert in place of the doubled batch) and the distilled student; threshold and
            # nucleus: their bound K, so the estimate errs long
            one = (SINGLE, CLASS_EXPERT, SEPARATE_CFG, DISTILLED)
            routed = routed_strategy(s) if is_cluster_routed(s) else s  # no FM loss, but the estimate errs long
            experts = 1 if s in one else experts_bound(routed, r.config.k, int(sc.top_k))
            evaluation += (n * calls * cfg_factor + fm_n) * experts * fwd_s
        evaluation += EVAL_OVERHEAD_S
    data = 0.0 if RunDir(data_dir(cfg)).data_manifest.exists() else DATA_S
    folders = {clustering_dir(cfg, c) for c in plan.configs}  # a mixed-kind DDM shares its K's clustering
    data += sum(CLUSTERING_S for f in folders if not RunDir(f).cluster_report.exists())
    feature = float(ec.feature_net.steps) * FEATURE_NET_STEP_S
    total = train + evaluation + data + feature
    return dict(
        total_s=round(total),
        train_s=round(train),
        eval_s=round(evaluation),
        data_s=round(data),
        feature_net_s=round(feature),
        device=str(device),
        expert_step_s={str(b): round(s, 4) for b, s in step_s.items()},
        router_step_s=round(router_s, 4),
        forward_s_per_image=round(fwd_s, 6),
    )
