"""Stage ``sample``: draw a labelled grid (and optional evaluation samples) from the expert ensemble.

``sample.model=distilled`` samples the run's distilled student instead (``distilled/expert.pt``
of ``ddm distill``: one model, no router, so no usage files), refused when it is missing or
was distilled from other experts than the run's current ones.

Reads ``router/router.pt`` and ``experts/expert-KK/expert.pt``; writes, in ``samples/``::

    grid.png      one row per class (class names from data/manifest.json when known), at most
                  sample.grid_rows rows: evenly spaced classes when there are more
    samples.npz   images (uint8 [N, H, W] or [N, H, W, C]), labels (-1: unconditional),
                  num_grid (the first num_grid images are the grid)
    samples_adm.npz the same images in ADM's interchange layout (ddm.sampling.adm): arr_0 uint8
                  [N, H, W, 3] (grayscale repeated to RGB), arr_1 the class labels when the run has classes
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

from ddm import seeds
from ddm.artifacts import RunDir
from ddm.devices import allow_tf32, autocast_dtype, resolve_device
from ddm.distill.student import check_student_guidance, load_distilled
from ddm.ensemble import experts_per_sample
from ddm.io import atomic_path, read_json, write_json
from ddm.latent.run_latents import latent_decoder
from ddm.sampling import load_ensemble, num_evaluations
from ddm.sampling.adm import write_adm_npz
from ddm.sampling.checkpoints import AVAILABLE, expert_ids_on_disk, models_identity
from ddm.sampling.draw import DISTILLED, draw, offloaded, requested_settings, rerouted
from ddm.sampling.fit import check_guidance
from ddm.sampling.grid import class_names, grid_classes, plan_labels
from ddm.sampling.record import SamplesRecord
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.text.encoder import OpenClipTextEncoder
from ddm.text.prompts import sample_prompts
from ddm.text.spec import text_weights_override
from ddm.viz import plot_usage, save_grid

log = logging.getLogger("ddm")


def _still_valid(made: SamplesRecord, settings: dict, rd: RunDir) -> bool:
    """The existing samples answer these settings with the same models (for ``available``: the same experts
    on disk)."""
    if made.settings != settings or made.models != models_identity(rd):
        return False  # other settings, or a model retrained since
    if settings["experts"] == AVAILABLE:
        return made.experts_loaded == [k for k in expert_ids_on_disk(rd) if k < made.num_experts]
    return True


def run(cfg: Settings) -> dict:
    """Sample from the run's ensemble as ``cfg.sample`` says; return the record."""
    rd = RunDir(cfg.run_dir)
    sc = cfg.sample
    settings = requested_settings(sc)
    if rd.samples_record.exists() and not cfg.redo:
        made = SamplesRecord.read(rd.samples_record)
        if _still_valid(made, settings, rd):
            log.info("sample: done already (%d images, %s) -> %s", made.num_images, settings["strategy"], rd.samples)
            return StageResult(read_json(rd.samples_record), skipped=True)

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
            # offloaded experts wait in host memory: loading them on the device would need room for all of them
            device="cpu" if sc.offload else device,
            temperature=float(settings["temperature"]),
            generator=gen_route,
        )
        ensemble = rerouted(
            ensemble, threshold=settings["threshold"], top_p=settings["top_p"], cfg_routing=settings["cfg_routing"]
        )
        ensemble = offloaded(ensemble, sc, device)
        check_guidance(info, settings["cfg_scale"], cfg_routing=settings["cfg_routing"])
    num_classes = int(info.num_classes)
    prompts = sample_prompts(cfg, rd) if info.text else None
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
            info.text, "the experts", pretrained=text_weights_override(cfg), device=device
        )
        conditions = encoder(prompts).index_select(0, labels.to(device))
    shape = (info.in_channels, info.image_size, info.image_size)
    decode = latent_decoder(cfg, info.latents, device)

    images, usage = draw(
        ensemble, path, shape, conditions, total, int(sc.batch_size), settings, gen_noise, device, decode
    )
    # text runs' labels index prompts, not classes: ADM's arr_1 is for class labels only
    out = _write(rd, images, labels, num_grid, usage, rows, int(sc.per_class), settings, classes=prompts is None)

    used = [
        k
        for k in range(info.num_experts)
        if any(r["counts"][k] or r.get("uncond_counts", r["counts"])[k] for r in usage)
    ]
    record = dict(
        settings=settings,  # what decided what was drawn: the skip check, the evaluate stage and the report read it
        models=models_identity(rd),  # the weights these images came from
        num_images=total,
        num_grid=num_grid,
        clustering_id=info.clustering_id,
        num_experts=info.num_experts,
        experts_loaded=info.experts,
        experts_used=used,
        experts_missing=info.missing_experts,
        # mean experts per sample and model call (data-dependent under threshold and nucleus)
        experts_per_sample=experts_per_sample(usage, total),
        evaluations_per_batch=num_evaluations(int(settings["steps"]), settings["solver"]),
        flow=info.flow,
        device=str(device),
        grid_prompts=prompts,  # text runs: the prompts used, which samples.npz's labels index
        grid_classes=shown,  # the classes (text runs: indices of grid_prompts) of the grid's rows, top to bottom
        distilled_from=info.distilled_from,  # sample.model=distilled: the experts the student learnt from
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
    if settings["experts"] == AVAILABLE and info.missing_experts:
        log.warning(
            "sample: made without experts %s (missing); recorded in %s", info.missing_experts, rd.samples_record
        )
    return record


def _write(rd, images, labels, num_grid, usage, rows, per_class, settings, classes=True) -> list[str]:
    """Every artefact but record.json, each atomically; ``rows`` label the grid's rows (classes or prompts);
    ``classes``: ``labels`` are class labels (they go into the ADM file's arr_1)."""
    out = rd.samples
    save_grid(images[:num_grid], per_class, out / "grid.png", row_labels=rows)
    label_array = np.full(len(images), -1, np.int64) if labels is None else labels.numpy()
    with atomic_path(out / "samples.npz") as tmp:
        np.savez(tmp, images=images, labels=label_array, num_grid=np.int64(num_grid))
    write_adm_npz(out / "samples_adm.npz", images, label_array if classes else None)
    if not usage:  # one model (the distilled student): nothing was routed; no usage of an earlier run stays
        for name in ("usage.json", "usage.png"):
            (out / name).unlink(missing_ok=True)
        return ["grid.png", "samples.npz", "samples_adm.npz", "record.json"]
    write_json(out / "usage.json", usage)
    plot_usage(
        usage,
        out / "usage.png",
        title=f"expert usage: {settings['strategy']}, {settings['solver']} x{settings['steps']}",
    )
    return ["grid.png", "samples.npz", "samples_adm.npz", "usage.json", "usage.png", "record.json"]
