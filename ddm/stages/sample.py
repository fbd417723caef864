"""Stage ``sample``: draw a labelled grid (and optional evaluation samples) from the expert ensemble.

``sample.model=distilled`` samples the run's distilled student instead (``distilled/expert.pt``
of ``ddm distill``: one model, no router, so no usage files), refused when it is missing or
was distilled from other experts than the run's current ones.

Reads ``router/router.pt`` and ``experts/expert-KK/expert.pt``; ``sample.router=clusters`` routes by the
run's clusters instead (``ddm.cluster_router``: clusters/, partitions/ and the clustering encoder, no
router.pt). Writes, in ``samples/``::

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

Sample i's noise, label and routing draws come from (seed, i) alone (``ddm.sampling.indexed``), so
``sample.parts=P`` jobs, each with its ``sample.part=J``, draw the same images one job would, and
``ddm sample sample.parts=P`` joins them into these outputs (``ddm.sampling.parts``; the parts' own files
in ``samples/parts/`` are removed once joined). ``ddm submit submit.stage=sample`` starts them.

A rerun with the same settings returns the existing record (however many parts drew it); other settings (or
``redo=true``) sample again. ``sample.experts=available`` samples with the
experts that exist (a lost island), renormalising the router over them;
the record's ``experts_missing`` names the others, and a rerun after more
experts appeared samples again.
"""

from __future__ import annotations

import logging
import shutil
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
from ddm.sampling.draw import DISTILLED, draw, merge_usage, offloaded, requested_settings, rerouted
from ddm.sampling.ensemble_loading import router_options
from ddm.sampling.fit import check_guidance
from ddm.sampling.grid import class_names, grid_classes, plan_labels
from ddm.sampling.parts import PARTS, check_parts, join_parts, part_done, part_files, part_range, write_part
from ddm.sampling.record import SamplesRecord
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.text.encoder import OpenClipTextEncoder, PromptBatches
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
    """Sample from the run's ensemble as ``cfg.sample`` says; return the record.

    ``sample.parts=P`` with ``sample.part=J``: draw part J's range of samples only (``ddm.sampling.parts``);
    with no ``sample.part``: join the P parts into the outputs one job would have written.
    """
    rd = RunDir(cfg.run_dir)
    sc = cfg.sample
    parts, part = check_parts(sc.parts, sc.part)
    settings = requested_settings(sc)
    if rd.samples_record.exists() and not cfg.redo:  # the samples are the same however many parts drew them
        made = SamplesRecord.read(rd.samples_record)
        if _still_valid(made, settings, rd):
            log.info("sample: done already (%d images, %s) -> %s", made.num_images, settings["strategy"], rd.samples)
            return StageResult(read_json(rd.samples_record), skipped=True)
    if parts > 1 and part is None:
        return _join(rd, settings, parts)
    if parts > 1 and not cfg.redo:
        done = part_done(rd.samples, part, parts, dict(settings=settings, models=models_identity(rd)))
        if done is not None:
            log.info("sample: part %d of %d done already -> %s", part, parts, part_files(rd.samples, part, parts)[1])
            return StageResult(done, skipped=True)

    start = time.perf_counter()
    device = resolve_device(sc.device, "sample.device")
    autocast_dtype(settings["precision"], device, "sample.precision")  # a bad value fails before loading
    allow_tf32(device)
    seed = int(settings["seed"])
    distilled = settings.get("model") == DISTILLED
    routing = {} if distilled else router_options(settings, int(cfg.seed))
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
            **routing,
        )
        ensemble = rerouted(
            ensemble, threshold=settings["threshold"], top_p=settings["top_p"], cfg_routing=settings["cfg_routing"]
        )
        ensemble = offloaded(ensemble, sc, device)
        check_guidance(info, settings["cfg_scale"], cfg_routing=settings["cfg_routing"])
    num_classes = int(info.num_classes)
    prompts = sample_prompts(cfg, rd) if info.text else None
    grid_rows = settings["grid_rows"]
    gen_labels = seeds.generator(seed + seeds.SAMPLE_LABELS_OFFSET)  # every part draws the same labels
    # text runs: one grid row per prompt (at most grid_rows); the extra samples draw prompts at random, and
    # `labels` index the prompts
    choices = num_classes if prompts is None else len(prompts)
    labels, num_grid = plan_labels(
        choices,
        int(sc.per_class),
        int(settings["num_samples"]),
        gen_labels,
        grid_rows,
        settings.get("label_order", "random"),
    )
    total = num_grid + int(settings["num_samples"]) if labels is None else len(labels)
    shown = grid_classes(choices, grid_rows) if choices else None
    if prompts is None:
        rows = [class_names(rd, num_classes)[c] for c in shown] if num_classes else None
    else:
        rows = [prompts[c] for c in shown]
    span = part_range(total, int(sc.batch_size), parts, part or 0)
    mine = None if labels is None else labels[span.start : span.stop]
    conditions = mine
    if prompts is not None:
        encoder = OpenClipTextEncoder.from_record(
            info.text, "the experts", pretrained=text_weights_override(cfg), device=device
        )
        conditions = PromptBatches(encoder, [prompts[i] for i in mine.tolist()])  # encoded a batch at a time
    shape = (info.in_channels, info.image_size, info.image_size)
    decode = latent_decoder(cfg, info.latents, device)
    if routing:  # the cluster router embeds its x0 estimates as images: a latent run decodes them first
        routing["decode"].fn = decode

    images, usage = draw(
        ensemble, path, shape, conditions, len(span), int(sc.batch_size), settings, seed, device, decode, span.start
    )
    label_array = np.full(len(span), -1, np.int64) if mine is None else mine.numpy()
    cache = getattr(ensemble, "offload", None)
    moved = None if cache is None else cache.summary()  # sample.offload: the experts' moves and peak on the device
    # what every part must share with the others to be joined, and what the outputs need beside the images
    plan = dict(
        total=total,
        num_grid=num_grid,
        per_class=int(sc.per_class),
        rows=rows,
        grid_prompts=prompts,  # text runs: the prompts used, which samples.npz's labels index
        grid_classes=shown,  # the classes (text runs: indices of grid_prompts) of the grid's rows, top to bottom
        clustering_id=info.clustering_id,
        num_experts=info.num_experts,
        experts_loaded=info.experts,
        experts_missing=info.missing_experts,
        flow=info.flow,
        distilled_from=info.distilled_from,  # sample.model=distilled: the experts the student learnt from
        model=DISTILLED if distilled else "ensemble",
    )
    wall = round(time.perf_counter() - start, 2)
    if parts > 1:
        record = dict(
            settings=settings,
            models=models_identity(rd),
            plan=plan,
            range=[span.start, span.stop],
            usage=usage,
            device=str(device),
            wall_s=wall,
            offload=moved,
        )
        record = write_part(rd.samples, part, parts, images, label_array, record)
        log.info(
            "sample: part %d of %d, samples %d..%d, %.1fs -> %s; once every part is done, `ddm sample "
            "sample.parts=%d` joins them",
            part,
            parts,
            span.start,
            span.stop - 1,
            wall,
            part_files(rd.samples, part, parts)[1],
            parts,
        )
        return record
    return _finish(rd, settings, plan, images, label_array, usage, device=str(device), wall_s=wall, offload=moved)


def _join(rd: RunDir, settings: dict, parts: int) -> dict:
    """Join the ``parts`` parts (each checked: ``join_parts``) into the outputs one job writes."""
    start = time.perf_counter()
    first = part_files(rd.samples, 0, parts)[1]
    if not first.exists():
        join_parts(rd.samples, parts, {})  # names the parts not done
    plan = read_json(first)["plan"]
    images, labels, records = join_parts(
        rd.samples, parts, dict(settings=settings, models=models_identity(rd), plan=plan)
    )
    usage = merge_usage([(r["usage"], r["range"][1] - r["range"][0]) for r in records])
    devices = sorted({r["device"] for r in records})
    wall = round(sum(float(r["wall_s"]) for r in records) + time.perf_counter() - start, 2)
    joined = dict(count=parts, wall_s=[r["wall_s"] for r in records])
    moved = [r.get("offload") for r in records]
    moved = moved if any(moved) else None
    record = _finish(
        rd, settings, plan, images, labels, usage, device=",".join(devices), wall_s=wall, parts=joined, offload=moved
    )
    shutil.rmtree(rd.samples / PARTS)  # joined into samples.npz, whose record is written: no second copy is kept
    return record


def _finish(
    rd: RunDir, settings, plan, images, labels, usage, device: str, wall_s: float, parts=None, offload=None
) -> dict:
    """Write the outputs and, last, the record of every sample of the run (one job's, or the parts' joined)."""
    total, distilled = plan["total"], plan["model"] == DISTILLED
    # text runs' labels index prompts, not classes: ADM's arr_1 is for class labels only
    out = _write(
        rd,
        images,
        labels,
        plan["num_grid"],
        usage,
        plan["rows"],
        plan["per_class"],
        settings,
        classes=plan["grid_prompts"] is None,
    )
    used = [
        k
        for k in range(plan["num_experts"])
        if any(r["counts"][k] or r.get("uncond_counts", r["counts"])[k] for r in usage)
    ]
    record = dict(
        settings=settings,  # what decided what was drawn: the skip check, the evaluate stage and the report read it
        models=models_identity(rd),  # the weights these images came from
        num_images=total,
        num_grid=plan["num_grid"],
        clustering_id=plan["clustering_id"],
        num_experts=plan["num_experts"],
        experts_loaded=plan["experts_loaded"],
        experts_used=used,
        experts_missing=plan["experts_missing"],
        # mean experts per sample and model call (data-dependent under threshold and nucleus)
        experts_per_sample=experts_per_sample(usage, total),
        evaluations_per_batch=num_evaluations(int(settings["steps"]), settings["solver"]),
        flow=plan["flow"],
        device=device,
        grid_prompts=plan["grid_prompts"],
        grid_classes=plan["grid_classes"],
        distilled_from=plan["distilled_from"],
        wall_s=wall_s,  # with parts: the parts' own seconds summed, and the join's
        outputs=out,
    )
    if parts is not None:
        record["parts"] = parts
    if offload is not None:  # moves, calls, max_moves_per_call, peak_resident_gb and _params, budget_gb (per part)
        record["offload"] = offload
    record["model"] = plan["model"]
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
    if settings["experts"] == AVAILABLE and plan["experts_missing"]:
        log.warning(
            "sample: made without experts %s (missing); recorded in %s", plan["experts_missing"], rd.samples_record
        )
    return record


def _write(rd, images, labels, num_grid, usage, rows, per_class, settings, classes=True) -> list[str]:
    """Every artefact but record.json, each atomically; ``rows`` label the grid's rows (classes or prompts);
    ``classes``: ``labels`` are class labels (they go into the ADM file's arr_1)."""
    out = rd.samples
    save_grid(images[:num_grid], per_class, out / "grid.png", row_labels=rows)
    label_array = labels
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
