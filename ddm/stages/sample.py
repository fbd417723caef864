"""Stage ``sample``: draw a labelled grid (and optional evaluation samples) from the expert ensemble.

``sample.model=distilled`` samples the run's distilled student instead (``distilled/expert.pt``
of ``ddm distill``: one model, no router, so no usage files), refused when it is missing or
was distilled from other experts than the run's current ones.

Reads ``router/router.pt`` and ``experts/expert-KK/expert.pt``; writes, in ``samples/``::

    grid.png      one row per class (class names from data/manifest.json when known), at most
                  sample.grid_rows rows: evenly spaced classes when there are more
    samples.npz   images (uint8 [N, H, W] or [N, H, W, C]), labels (-1: unconditional),
                  num_grid (the first num_grid images are the grid)
    usage.json    one record per solver evaluation: t, samples per expert, mean routing weight
                  (sample.cfg_routing=separate with guidance: also those of the null input, uncond_*)
    usage.png     each expert's share of the routing weight against t
    record.json   settings and summary, written last (the stage's "done" marker)

A rerun with the same settings returns the existing record; other settings (or
``redo=true``) sample again. ``sample.experts=available`` samples with the
experts that exist (a lost island), renormalising the router over them;
the record's ``experts_missing`` names the others, and a rerun after more
experts appeared samples again.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from ddm import seeds
from ddm.artifacts import RunDir
from ddm.devices import allow_tf32, autocast_dtype, resolve_device
from ddm.ensemble import ROUTING_DEFAULTS, Ensemble, check_routing, experts_per_sample
from ddm.errors import BadInput
from ddm.images import to_uint8
from ddm.io import atomic_path, read_json, write_json
from ddm.sampling import load_ensemble, num_evaluations, sample
from ddm.sampling.checkpoints import AVAILABLE, expert_ids_on_disk, models_identity
from ddm.sampling.distilled import DISTILLED, check_model, check_student_guidance, load_distilled
from ddm.sampling.fit import check_guidance
from ddm.sampling.grid import check_grid_rows, grid_classes, plan_labels
from ddm.sampling.solvers import check_cfg_interval
from ddm.stages.conditioning import text_weights_override
from ddm.stages.encode import latent_decoder
from ddm.stages.prompts import sample_prompts
from ddm.stages.runner import note_skipped
from ddm.text.encoder import OpenClipTextEncoder
from ddm.viz import plot_usage, save_grid

log = logging.getLogger("ddm")

# The options that change what is sampled: a record with other values is stale (and `model`, when it is
# not the ensemble: see requested_settings).
SETTINGS = (
    "strategy",
    "top_k",
    "threshold",
    "top_p",
    "cfg_routing",
    "experts",
    "temperature",
    "solver",
    "steps",
    "cfg_scale",
    "cfg_interval",
    "per_class",
    "grid_rows",
    "num_samples",
    "seed",
    "precision",
    "prompts",
    "prompts_file",
)


def requested_settings(sc) -> dict:
    sc = OmegaConf.to_container(sc, resolve=True) if OmegaConf.is_config(sc) else dict(sc)
    out = {k: sc.get(k, ROUTING_DEFAULTS.get(k)) for k in SETTINGS}
    # checked here, so a bad value fails before any network is loaded (the evaluate stage's settings too)
    out["threshold"], out["top_p"], out["cfg_routing"] = check_routing(
        out["threshold"], out["top_p"], out["cfg_routing"]
    )
    out["grid_rows"] = check_grid_rows(out["grid_rows"])
    interval = check_cfg_interval(out["cfg_interval"])
    out["cfg_interval"] = None if interval is None else list(interval)
    experts = out["experts"]
    if isinstance(experts, str):
        if experts != AVAILABLE:
            raise BadInput(
                f"sample.experts={experts!r}: use null (all experts), a list of ids such as "
                f"[0,2], or {AVAILABLE!r} (the experts that exist)"
            )
    elif experts is not None:
        out["experts"] = sorted(int(k) for k in experts)
    # only when it is not the ensemble: records made before sample.model existed stay valid
    model = check_model(sc.get("model"))
    if model != "ensemble":
        out["model"] = model
    return out


def _still_valid(record: dict, settings: dict, rd: RunDir) -> bool:
    """The existing samples answer these settings with the same models (for ``available``: the same experts
    on disk)."""
    if record.get("settings") != settings or record.get("models") != models_identity(rd):
        return False  # other settings, or a model retrained since
    if settings["experts"] == AVAILABLE:
        return record.get("experts_loaded") == [
            k for k in expert_ids_on_disk(rd) if k < int(record.get("num_experts", 0))
        ]
    return True


def class_names(rd: RunDir, num_classes: int) -> list[str]:
    """Names from the data manifest's ``class_names`` when present, else the class indices."""
    names = read_json(rd.data_manifest).get("class_names") if rd.data_manifest.exists() else None
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def run(cfg) -> dict:
    """Sample from the run's ensemble as ``cfg.sample`` says; return the record."""
    rd = RunDir(cfg.run_dir)
    sc = cfg.sample
    settings = requested_settings(sc)
    if rd.samples_record.exists() and not cfg.get("redo", False):
        record = read_json(rd.samples_record)
        if _still_valid(record, settings, rd):
            note_skipped()
            log.info(
                "sample: done already (%d images, %s) -> %s", record["num_images"], settings["strategy"], rd.samples
            )
            return record

    start = time.perf_counter()
    device = resolve_device(sc.device, "sample.device")
    autocast_dtype(settings["precision"], device, "sample.precision")  # a bad value fails before loading
    allow_tf32(device)
    seed = int(settings["seed"])
    # CPU generators: the same seed gives the same noise and routing draws on any device.
    gen_noise = seeds.generator(seed)
    gen_route = seeds.generator(seed + seeds.ROUTING_OFFSET)
    distilled = settings.get("model") == DISTILLED
    if distilled:  # the student alone: no router, no expert (the routing options do not apply)
        ensemble, path, info = load_distilled(cfg.run_dir, device=device)
        check_student_guidance(info, settings["cfg_scale"])
    else:
        ensemble, path, info = load_ensemble(
            cfg.run_dir,
            strategy=settings["strategy"],
            top_k=settings["top_k"],
            subset=settings["experts"],
            device=device,
            temperature=float(settings["temperature"]),
            generator=gen_route,
        )
        ensemble = with_routing(ensemble, settings)
        check_guidance(info, settings["cfg_scale"], cfg_routing=settings["cfg_routing"])
    num_classes = int(info["num_classes"])
    prompts = sample_prompts(cfg, rd) if info.get("text") else None
    grid_rows = settings["grid_rows"]
    if prompts is None:
        labels, num_grid = plan_labels(
            num_classes, int(sc.per_class), int(settings["num_samples"]), gen_noise, grid_rows
        )
        total = num_grid + int(settings["num_samples"]) if labels is None else len(labels)
        shown = grid_classes(num_classes, grid_rows) if num_classes else None
        conditions, rows = labels, ([class_names(rd, num_classes)[c] for c in shown] if num_classes else None)
    else:
        # one grid row per prompt (at most grid_rows); the extra samples draw prompts at random. `labels` index
        # the prompts.
        labels, num_grid = plan_labels(
            len(prompts), int(sc.per_class), int(settings["num_samples"]), gen_noise, grid_rows
        )
        shown = grid_classes(len(prompts), grid_rows)
        total, rows = len(labels), [prompts[c] for c in shown]
        encoder = OpenClipTextEncoder.from_record(
            info["text"], "the experts", pretrained=text_weights_override(cfg), device=device
        )
        conditions = encoder(prompts).index_select(0, labels.to(device))
    shape = (info["in_channels"], info["image_size"], info["image_size"])
    decode = latent_decoder(cfg, info.get("latents"), device)

    images, usage = draw(
        ensemble, path, shape, conditions, total, int(sc.batch_size), settings, gen_noise, device, decode
    )
    out = _write(rd, images, labels, num_grid, usage, rows, int(sc.per_class), settings)

    used = [
        k
        for k in range(info["num_experts"])
        if any(r["counts"][k] or r.get("uncond_counts", r["counts"])[k] for r in usage)
    ]
    # settings twice: flat for readers (the report), nested for the skip check
    record = dict(
        settings=settings,
        **settings,
        models=models_identity(rd),  # the weights these images came from
        num_images=total,
        num_grid=num_grid,
        clustering_id=info["clustering_id"],
        num_experts=info["num_experts"],
        experts_loaded=info["experts"],
        experts_used=used,
        experts_missing=info["missing_experts"],
        # mean experts per sample and model call (data-dependent under threshold and nucleus)
        experts_per_sample=experts_per_sample(usage, total),
        evaluations_per_batch=num_evaluations(int(settings["steps"]), settings["solver"]),
        flow=info["flow"],
        device=str(device),
        grid_prompts=prompts,  # text runs: the prompts used, which samples.npz's labels index
        grid_classes=shown,  # the classes (text runs: indices of grid_prompts) of the grid's rows, top to bottom
        distilled_from=info.get("distilled_from"),  # sample.model=distilled: the experts the student learnt from
        wall_s=round(time.perf_counter() - start, 2),
        outputs=out,
    )
    record["model"] = DISTILLED if distilled else "ensemble"
    write_json(rd.samples_record, record)
    log.info(
        "sample: %d images, %s, %s x%d, cfg %.2g, experts used %s, %.1fs -> %s",
        total,
        "the distilled model" if distilled else f"{settings['strategy']} routing",
        settings["solver"],
        settings["steps"],
        settings["cfg_scale"],
        used,
        record["wall_s"],
        rd.samples,
    )
    if settings["experts"] == AVAILABLE and info["missing_experts"]:
        log.warning(
            "sample: made without experts %s (missing); recorded in %s", info["missing_experts"], rd.samples_record
        )
    return record


def with_routing(ensemble: Ensemble, settings: dict) -> Ensemble:
    """``ensemble`` with the settings' ``threshold``, ``top_p`` and ``cfg_routing`` (its modules shared).

    ``load_ensemble`` builds the ensemble with its strategy and top-k; the routing
    options the loader does not take are set here, through ``Ensemble``'s own checks.
    """
    return Ensemble(
        {int(k): m for k, m in ensemble.experts.items()},
        ensemble.router,
        strategy=ensemble.strategy,
        top_k=ensemble.top_k,
        subset=ensemble.active_ids,
        generator=ensemble.generator,
        temperature=ensemble.temperature,
        num_experts=ensemble.num_experts,
        threshold=settings["threshold"],
        top_p=settings["top_p"],
        cfg_routing=settings["cfg_routing"],
    ).eval()


# The per-expert fields of a usage record, summed (counts) or image-weighted (weights) over batches.
USAGE_FIELDS = ("counts", "weights", "uncond_counts", "uncond_weights")


def draw(ensemble, path, shape, labels, total, batch_size, settings, generator, device, decode=None):
    """Sample ``total`` images in batches; usage records merged per solver evaluation.

    ``decode`` turns a latent run's samples into images (``latent_decoder``); None: they are images.
    A model that records no usage (one network: the distilled student) gives ``usage=[]``.
    """
    precision = autocast_dtype(settings.get("precision"), torch.device(device), "sample.precision")
    n_eval = num_evaluations(int(settings["steps"]), settings["solver"])
    routed = hasattr(ensemble, "reset_usage")
    merged = {f: np.zeros((n_eval, ensemble.num_experts if routed else 0)) for f in USAGE_FIELDS}
    present = {"counts", "weights"}
    ts = np.zeros(n_eval)
    chunks = []
    for lo in range(0, total, batch_size):
        n = min(batch_size, total - lo)
        y = None if labels is None else labels[lo : lo + n].to(device)  # labels, or a TextCondition
        if routed:
            ensemble.reset_usage()
        x = sample(
            ensemble,
            path,
            (n, *shape),
            y=y,
            steps=int(settings["steps"]),
            solver=settings["solver"],
            cfg_scale=float(settings["cfg_scale"]),
            cfg_interval=settings.get("cfg_interval"),
            generator=generator,
            device=device,
            autocast=precision,
        )
        chunks.append(to_uint8(x if decode is None else decode(x)))
        for i, rec in enumerate(ensemble.usage if routed else []):
            for f in USAGE_FIELDS:
                if f in rec:
                    present.add(f)
                    # counts summed; weights a batch-size weighted mean over batches
                    merged[f][i] += np.asarray(rec[f]) * (1 if f.endswith("counts") else n)
            ts[i] = rec["t"]
    usage = []
    for i in range(n_eval if routed else 0):
        rec = dict(t=float(ts[i]))
        for f in (f for f in USAGE_FIELDS if f in present):
            rec[f] = [int(c) for c in merged[f][i]] if f.endswith("counts") else (merged[f][i] / total).tolist()
        usage.append(rec)
    return np.concatenate(chunks), usage


def _write(rd, images, labels, num_grid, usage, rows, per_class, settings) -> list[str]:
    """Every artefact but record.json, each atomically; ``rows`` label the grid's rows (classes or prompts)."""
    out = rd.samples
    save_grid(images[:num_grid], per_class, out / "grid.png", row_labels=rows)
    label_array = np.full(len(images), -1, np.int64) if labels is None else labels.numpy()
    with atomic_path(out / "samples.npz") as tmp:
        np.savez(tmp, images=images, labels=label_array, num_grid=np.int64(num_grid))
    if not usage:  # one model (the distilled student): nothing was routed; no usage of an earlier run stays
        for name in ("usage.json", "usage.png"):
            (out / name).unlink(missing_ok=True)
        return ["grid.png", "samples.npz", "record.json"]
    write_json(out / "usage.json", usage)
    plot_usage(
        usage,
        out / "usage.png",
        title=f"expert usage: {settings['strategy']}, {settings['solver']} x{settings['steps']}",
    )
    return ["grid.png", "samples.npz", "usage.json", "usage.png", "record.json"]
