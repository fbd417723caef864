"""Stage ``train-expert``: train expert ``expert.id`` on its own partition, in isolation.

Reads only ``partitions/cluster-<id>/`` (in a latent run its manifest and
``latents/cluster-<id>/``), the run's clustering report to check that the
partition is this run's (``verified_inputs``), and, fine-tuning after ``ddm extend``,
its own earlier ``expert.pt`` under ``history/`` (``ddm.train.fine_tune``);
writes only ``experts/expert-<id>/``. The shards it reads are checked against
their manifest by global rank 0 alone, rereading only what changed since the
last start (``verified.json``: ``ddm.data.verified``).
No process group, lock or file is shared with another expert: inside the
island Lightning may use DDP/FSDP across the island's own devices, nothing more.
Resumes from the newest complete checkpoint (``checkpoints/last.ckpt`` or a
``step-*.ckpt``); on SIGUSR1/SIGTERM it saves ``last.ckpt`` and requeues its
SLURM job (``expert.requeue``) or exits non-zero; when training raises it writes
``failed.json``. The finished expert is ``expert.pt`` (EMA weights) plus
``record.json``, written last; a finished expert is never trained again
(unless ``redo=true``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, sample_stream
from ddm.data.shards import load_manifest, shard_paths
from ddm.data.verified import verified_shards, wait_seconds
from ddm.errors import BadInput, MissingInput
from ddm.flow import check_prediction
from ddm.io import read_json
from ddm.job_names import expert_job
from ddm.latent.run_latents import latent_decoder, latent_manifest, latent_meta, stored_text_length, vae_spec
from ddm.launch.lock import check_free, is_global_rank_zero
from ddm.lineage import check_partition_of_run
from ddm.ranks import island_processes
from ddm.sampling.grid import class_names
from ddm.seeds import data_stream_seed, expert_seed
from ddm.settings import Model, Settings
from ddm.stages import StageResult
from ddm.stages.runner import done_already
from ddm.text.prompts import sample_prompts
from ddm.text.spec import captions_for, conditioning_args, text_spec
from ddm.train.checkpoint_upload import checkpoint_uploads
from ddm.train.fine_tune import initial_weights, start_from
from ddm.train.job import Job, Schedule, Trained, run_job
from ddm.train.modules import ExpertModule
from ddm.train.preview import Preview

log = logging.getLogger("ddm")


def model_config(cfg_model: Model, meta: dict, text: dict | None = None) -> dict:
    """The network's arguments: its size (and head) from the config, its input shape and conditioning from the
    data."""
    head = int(cfg_model.conv_head)
    return dict(
        size=cfg_model.size,
        image_size=int(meta["image_size"]),
        in_channels=int(meta["channels"]),
        **conditioning_args(text, meta),
        **({"conv_head": head} if head else {}),  # written only when used: older files have no such key
    )


def expert_target(cfg: Settings) -> str:
    """``expert.target``: what the expert regresses, checked."""
    return check_prediction(str(cfg.expert.target))


def run(cfg: Settings) -> dict:
    """Train expert ``cfg.expert.id``; return its record (at once if it is already finished).

    Survives faults: resumes from the newest complete checkpoint, saves and
    requeues (or exits non-zero) on SIGUSR1/SIGTERM, and writes ``failed.json``
    when training raises.
    """
    rd = RunDir(cfg.run_dir)
    k = int(cfg.expert.id)
    expert_target(cfg)  # a bad expert.target fails before anything is read or deleted
    job_dir = rd.expert(k)
    if done_already(rd.expert_record(k), cfg):
        record = read_json(rd.expert_record(k))
        _check_still_current(record, rd, k)
        _note_other_kind(record, cfg, k)
        log.info("train-expert %d: already done (%d steps) -> %s", k, record["steps"], job_dir)
        return StageResult(record, skipped=True)
    # Only global rank 0 starts over: the other ranks of a DDP job run this too, beside it.
    if cfg.redo and job_dir.exists() and is_global_rank_zero():
        check_free(job_dir, f"train-expert {k} redo=true")  # never delete the folder of a job that still runs
        shutil.rmtree(job_dir)

    manifest, data_dir, data = verified_inputs(cfg, rd, k)
    record = run_job(_job(cfg, rd, k, manifest, data_dir, data), lambda trained: _record(trained, k, manifest))
    if record:
        log.info(
            "train-expert %d: %d steps on %d samples, loss %.4f, %.0fs -> %s",
            k,
            record["steps"],
            record["partition_samples"],
            record["final_loss"] or float("nan"),
            record["wall_s"],
            job_dir,
        )
    return record


def verified_inputs(cfg: Settings, rd: RunDir, k: int) -> tuple[dict, Path, dict]:
    """``(partition manifest, folder the expert reads, its manifest)``, shown to be this run's and whole.

    Shards travel between islands and people, and a set that is whole can still come from another
    run: the partition must be cluster ``k`` of this run's clustering (``clusters/report.json``, else
    the partition index), and in a latent run the latents must be encoded from that partition with
    the run's VAE. Then the shards the job reads are checked against their manifest: in a latent run
    the latents only (the partition's manifest is read for its identity, its pixel shards are not
    read by the job and not hashed). Only global rank 0 hashes, and only what changed since the
    job's last check (``ddm.data.verified``); streamed shards (``expert.shard_url``) are not read twice.
    """
    part_dir = rd.partition(k)
    if not rd.partition_manifest(k).exists():
        raise MissingInput(
            f"expert.id={k}: no partition at {part_dir} (run `ddm partition` first, or check that "
            f"expert.id is below the number of clusters)"
        )
    manifest = load_manifest(part_dir)
    if int(manifest.get("cluster", -1)) != k:
        raise BadInput(
            f"{part_dir}/manifest.json says cluster {manifest.get('cluster')}, expected {k}: rerun "
            f"`ddm partition redo=true`"
        )
    check_partition_of_run(rd, k, manifest)
    data_dir, data = part_dir, manifest
    spec = vae_spec(cfg)
    if spec is not None:  # a latent run: the same samples, encoded by `ddm encode`
        data_dir = rd.latent(k)
        data = latent_manifest(rd, k, manifest, verify_shards=False, vae=spec)
    if not cfg.expert.shard_url:
        verified_shards(
            data_dir,
            rd.expert(k),
            manifest=data,
            wait_s=wait_seconds(cfg.expert),
            processes=island_processes(cfg.island),
        )
    return manifest, data_dir, data


def _check_still_current(record: dict, rd: RunDir, k: int) -> None:
    """A finished expert of an older clustering must not pass for one of the current partitions."""
    path = rd.partition_manifest(k)
    if not path.exists():
        return
    current = read_json(path)
    if (record.get("clustering_id"), record.get("partition_keys_sha256")) != (
        current.get("clustering_id"),
        current.get("keys_sha256"),
    ):
        raise BadInput(
            f"{rd.expert_record(k)} was trained on clustering {record.get('clustering_id')} but "
            f"{path} is now clustering {current.get('clustering_id')} (or other keys): retrain it with "
            f"`ddm train-expert expert.id={k} redo=true`"
        )


def _note_other_kind(record: dict, cfg: Settings, k: int) -> None:
    """A finished expert is kept as it is: say so when the config now asks for another size or target."""
    was = (record.get("model_size"), record.get("target", "velocity"))
    now = (str(cfg.model.size), expert_target(cfg))
    if was[0] is not None and was != now:
        log.warning(
            "train-expert %d: the finished expert is a %s predicting %s, the config asks for a %s predicting %s; "
            "it is kept as it is (retrain it with redo=true)",
            k,
            *was,
            *now,
        )


def _job(cfg: Settings, rd: RunDir, k: int, manifest: dict, data_dir=None, data: dict | None = None) -> Job:
    """Expert ``k``'s training job: its own partition, seed and folder, nothing shared with another expert.

    ``data_dir`` / ``data``: the shard set it reads, (latent runs) the partition's latents; None: the partition.
    """
    data_dir, data = (rd.partition(k), manifest) if data is None else (data_dir, data)
    ex = cfg.expert
    target = expert_target(cfg)
    seed = expert_seed(cfg.seed, k)
    text = text_spec(cfg)
    start = initial_weights(cfg, rd, manifest)  # None: random init
    captions = captions_for(cfg, manifest)
    stored_text = stored_text_length(cfg, data, data_dir)  # text.store=true: encodings from the shards

    def build_module() -> ExpertModule:
        module = ExpertModule(
            model=model_config(cfg.model, data, text),
            flow=cfg.flow.to_dict(),
            lr=ex.lr,
            weight_decay=ex.weight_decay,
            betas=tuple(ex.betas),
            warmup_steps=ex.warmup_steps,
            total_steps=ex.steps,
            label_dropout=ex.label_dropout,
            ema_decay=ex.ema_decay,
            expert_id=k,
            nan_check_every=int(ex.nan_check_every),
            compile=bool(cfg.model.compile),
            text=text,
            target=target,
        )
        if start is not None:
            start_from(module, start, target)
        return module

    def build_loader(batch: int, start_step: int, rank: int | None = None):
        # Inside the job: a bad shard_url is a failure of this job, recorded in its failed.json.
        urls = shard_paths(data_dir, data, url=ex.shard_url)
        stream = sample_stream(
            urls,
            int(data["channels"]),
            seed=data_stream_seed(seed, start_step),
            shuffle_buffer=ex.shuffle_buffer,
            captions=captions,
            stored_text=stored_text,
            rank=rank,
        )
        return batch_loader(stream, batch, int(cfg.island.num_workers))

    return Job(
        name=expert_job(k),
        title=f"train-expert {k}",
        folder=rd.expert(k),
        # the target too: a resume must not continue another target's weights
        identity=dict(
            job=expert_job(k),
            clustering_id=manifest["clustering_id"],
            partition_keys_sha256=manifest["keys_sha256"],
            target=target,
            # a fine-tune must not resume a checkpoint of another starting point
            init_sha256=start and start["sha256"],
        ),
        seed=seed,
        build_module=build_module,
        build_loader=build_loader,
        schedule=Schedule.from_config("expert", ex),
        island=cfg.island,
        logger=cfg.logger,
        run_dir=rd.root,
        weights=rd.expert_weights(k),
        record=rd.expert_record(k),
        export_meta=dict(
            expert_id=k,
            num_experts=int(manifest["num_clusters"]),
            clustering_id=manifest["clustering_id"],
            # guidance needs the null label trained: the sampler refuses cfg_scale != 1 when this is 0
            label_dropout=float(ex.label_dropout),
            # what the network predicts: the sampler converts eps and x0 to the velocity
            target=target,
            # the sampler rebuilds this text encoder for prompts (None: class labels)
            text=text,
            # latent runs: the VAE that decodes samples, and the pixels it decodes to (None: pixels)
            latents=latent_meta(data),
            # the expert.pt training started from (`ddm extend`'s fine-tune), None: random
            initialised_from=start and {f: start[f] for f in ("path", "sha256", "clustering_id")},
        ),
        config=cfg.to_dict(),
        callbacks=_preview(cfg, rd, k, data, text) + checkpoint_uploads(cfg.store, rd.root, rd.expert(k)),
    )


def _preview(cfg: Settings, rd: RunDir, k: int, data: dict, text: dict | None) -> tuple:
    """The expert's preview grid callback (``expert.preview_every`` > 0), or nothing."""
    ex = cfg.expert
    every = int(ex.preview_every)
    if every <= 0:
        return ()
    per_row = int(ex.preview_per_row)
    num_classes = int(data.get("num_classes") or 0)
    if text is not None:
        rows = sample_prompts(cfg, rd)[: int(ex.preview_rows)]
        captions = [p for p in rows for _ in range(per_row)]

        def condition(module):
            return module.conditioning(None, captions)
    elif num_classes:
        rows = class_names(rd, num_classes)[: int(ex.preview_rows)]
        labels = torch.arange(len(rows)).repeat_interleave(per_row)

        def condition(module):
            return labels
    else:
        rows = None

        def condition(module):
            return None

    decoder = None
    latents = latent_meta(data)

    def decode(z):
        nonlocal decoder
        if decoder is None:  # the VAE, loaded where the samples are, on the first preview only
            decoder = latent_decoder(cfg, latents, z.device)
        return decoder(z)

    return (
        Preview(
            every,
            rd.expert(k) / "previews",
            (int(data["channels"]), int(data["image_size"]), int(data["image_size"])),
            rows,
            per_row,
            condition,
            steps=int(ex.preview_steps),
            cfg_scale=float(cfg.sample.cfg_scale) if float(ex.label_dropout) > 0 else 1.0,
            cfg_interval=cfg.sample.cfg_interval,
            seed=expert_seed(cfg.seed, k),
            decode=decode if latents else None,
        ),
    )


def _record(trained: Trained, k: int, manifest: dict) -> dict:
    """The common fields plus the partition the expert trained on and what it is (size, target); hardware adds
    how the island split the job."""
    return dict(
        expert_id=k,
        num_experts=int(manifest["num_clusters"]),
        clustering_id=manifest["clustering_id"],
        partition_keys_sha256=manifest["keys_sha256"],
        partition_samples=int(manifest["num_samples"]),
        model_size=trained.export_net.config().get("size"),
        target=trained.module.target,
        **trained.common_record(parallelism=True),
    )
