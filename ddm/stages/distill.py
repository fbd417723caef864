"""Stage ``distill``: one student trained to match the top-1 teacher, so a run can sample with a single model.

Reads every partition (their latents in a latent run) as the router does, drawn in
proportion to cluster size and tagged with their cluster k, and every expert's
``expert.pt`` (EMA weights, frozen). For a sample of cluster k the student regresses
expert k's velocity at (x_t, t, y), mixed with the data's own conditional velocity by
``distill.data_weight`` (see ``ddm.distill.training``). The student keeps the
experts' label dropout scheme, so it can be guided: a dropped-label sample's target is
its expert's unconditional velocity.

Writes only ``distilled/``: checkpoints, logs, ``expert.pt`` (the student's EMA, in an
expert's layout plus ``distilled_from``: the clustering and each teacher's sha256) and
``record.json`` (last). Faults as for an expert: resume from the newest complete
checkpoint (whose identity includes the teachers' sha256s), save and requeue on a signal,
``failed.json`` when training raises. ``ddm sample sample.model=distilled`` samples it.

FLOPs in the record: the student's training (3 x its forward per sample seen) and the
teachers' forwards (one expert forward per sample seen, none when ``data_weight`` is 1),
and with the experts' own training the distilled model's total.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, mixed_stream
from ddm.data.router_data import load_partitions
from ddm.data.shards import shard_paths
from ddm.data.verified import verified_shard_sets
from ddm.distill.student import check_distilled_current, distilled_from
from ddm.distill.training import DistillModule
from ddm.errors import BadInput
from ddm.eval.flops import count_flops
from ddm.io import read_json
from ddm.job_names import expert_job
from ddm.latent.run_latents import latent_manifest, latent_meta, stored_text_length, vae_spec
from ddm.launch.lock import check_free, is_global_rank_zero
from ddm.lineage import check_member, check_partition_of_run
from ddm.models.conditioning import CLIP_CONTEXT
from ddm.models.dit import parse_size
from ddm.ranks import island_processes
from ddm.sampling.checkpoints import load_expert, verify_weights
from ddm.sampling.draw import DISTILLED
from ddm.seeds import data_stream_seed, distill_seed
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import done_already
from ddm.text.spec import captions_for, text_spec
from ddm.train.checkpoint_upload import checkpoint_uploads
from ddm.train.job import Job, Schedule, Trained, example_inputs, run_job

log = logging.getLogger("ddm")


def run(cfg: Settings) -> dict:
    """Distil the run's experts into one student; return its record (at once if it is already finished)."""
    rd = RunDir(cfg.run_dir)
    if done_already(rd.distilled_record, cfg):
        record = read_json(rd.distilled_record)
        check_distilled_current(record.get("distilled_from"), rd, rd.distilled_record)
        log.info("distill: already done (%d steps) -> %s", record["steps"], rd.distilled)
        return StageResult(record, skipped=True)
    # Only global rank 0 starts over: the other ranks of a DDP job run this too, beside it.
    if cfg.redo and rd.distilled.exists() and is_global_rank_zero():
        check_free(rd.distilled, "distill redo=true")  # never delete the folder of a job that still runs
        shutil.rmtree(rd.distilled)

    index, manifests = load_partitions(rd)
    K = len(manifests)
    source = distilled_from(rd, K, index["clustering_id"])
    teachers, metas = load_teachers(rd, index, cfg)
    if vae_spec(cfg) is not None:  # a latent run: the same samples, encoded by `ddm encode`
        folders = [rd.latent(k) for k in range(K)]
        data = [latent_manifest(rd, k, m, verify_shards=False) for k, m in enumerate(manifests)]
    else:
        folders, data = [rd.partition(k) for k in range(K)], manifests
    check_teachers_fit(metas, cfg, data[0])
    for k, m in enumerate(manifests):  # whole shard sets of another run's clustering are refused here
        check_partition_of_run(rd, k, m)
    verified_shard_sets(folders, data, rd.distilled, cfg.distill, "distill", island_processes(cfg.island))
    record = run_job(
        _job(cfg, rd, index, manifests, folders, data, teachers, metas, source),
        lambda trained: _record(trained, cfg, rd, index, manifests, metas, source),
    )
    if record:
        log.info(
            "distill: %s student of %d experts, %d steps, loss %.4f, %.3g FLOPs (student %.3g, teachers %.3g), "
            "%.0fs -> %s",
            record["size"],
            K,
            record["steps"],
            record["final_loss"] or float("nan"),
            record["distill_flops"],
            record["train_flops"],
            record["teacher_flops"],
            record["wall_s"],
            rd.distilled,
        )
    return record


def load_teachers(rd: RunDir, index: dict, cfg: Settings) -> tuple[list, list[dict]]:
    """Every expert's EMA network and metadata, checked to be the run's experts of the partition index ``index``'s
    clustering (cluster by cluster, for a grown run) and of this flow path."""
    teachers, metas = [], []
    for k in range(int(index["num_clusters"])):
        verify_weights(rd.expert_weights(k), rd.expert_record(k))
        net, meta = load_expert(rd.expert_weights(k))
        where = rd.expert_weights(k)
        if int(meta.get("expert_id", k)) != k:
            raise BadInput(
                f"{where} holds expert {meta.get('expert_id')}, not expert {k}: retrain it with "
                f"`ddm train-expert expert.id={k} redo=true`"
            )
        check_member(meta, k, index, where)  # this clustering's, or the ancestor a grown run kept it from
        if meta["flow"].get("schedule") != cfg.flow.schedule:
            raise BadInput(
                f"{where} was trained on flow.schedule={meta['flow'].get('schedule')}, this run's config says "
                f"{cfg.flow.schedule}: a teacher's velocity is only a target on its own path; set flow.schedule"
            )
        teachers.append(net)
        metas.append(meta)
    shapes = {m["path"]: _conditioning(m) for m in metas}
    if len(set(shapes.values())) > 1:
        raise BadInput(f"the experts take different inputs (image size, channels, classes, text by file: {shapes})")
    return teachers, metas


def _conditioning(meta: dict) -> tuple:
    c, text = meta["model_config"], meta.get("text") or {}
    return c["image_size"], c["in_channels"], c.get("num_classes", 0), c.get("text_dim", 0), text.get("model")


def check_teachers_fit(metas: list[dict], cfg: Settings, data: dict) -> None:
    """The teachers take what the loader gives: the data's shape, and the run's text tower and latent space."""
    c = metas[0]["model_config"]
    if (int(c["image_size"]), int(c["in_channels"])) != (int(data["image_size"]), int(data["channels"])):
        raise BadInput(
            f"the experts take {c['in_channels']}x{c['image_size']}px inputs, the training data are "
            f"{data['channels']}x{data['image_size']}px: distil on the data (and vae setting) they trained on"
        )
    vae = lambda m: ((m or {}).get("vae") or {}).get("weights_sha256")  # noqa: E731
    if vae(metas[0].get("latents")) != vae(latent_meta(data)):
        raise BadInput("the experts were trained in another latent space (or on pixels) than this run's vae setting")
    tower = lambda t: None if not t else (t.get("model"), t.get("weights_sha256"))  # noqa: E731
    if tower(metas[0].get("text")) != tower(text_spec(cfg)):
        raise BadInput("the experts were trained with another text tower than this run's text setting")


def student_config(cfg: Settings, metas: list[dict]) -> dict:
    """The student's ``DiT`` arguments: the experts' inputs and conditioning, ``distill.size`` (default theirs)."""
    config = dict(metas[0]["model_config"])
    size = cfg.distill.size or config["size"]
    parse_size(str(size))  # an unknown size fails here, naming the sizes there are
    return dict(config, size=str(size))


def _job(cfg: Settings, rd, index, manifests, folders, data, teachers, metas, source) -> Job:
    """The student's training job: every partition, mixed in proportion to cluster size, tagged with its cluster."""
    dc, meta = cfg.distill, data[0]
    text = text_spec(cfg)
    captions = captions_for(cfg, manifests[0]) if text else None
    stored = [stored_text_length(cfg, m, f"cluster {k}'s latents") for k, m in enumerate(data)] if text else [0]
    seed = distill_seed(cfg.seed)
    model = student_config(cfg, metas)

    def build_module() -> DistillModule:
        return DistillModule(
            model=model,
            flow=cfg.flow.to_dict(),
            teachers=teachers,
            lr=dc.lr,
            weight_decay=dc.weight_decay,
            betas=tuple(dc.betas),
            warmup_steps=dc.warmup_steps,
            total_steps=dc.steps,
            label_dropout=dc.label_dropout,
            ema_decay=dc.ema_decay,
            data_weight=float(dc.data_weight),
            nan_check_every=int(dc.nan_check_every),
            compile=bool(dc.compile),
            text=text,
        )

    def build_loader(batch: int, start_step: int, rank: int | None = None):
        parts = [(shard_paths(f, m), float(m["num_samples"])) for f, m in zip(folders, data)]
        stream = mixed_stream(
            parts,
            int(meta["channels"]),
            data_stream_seed(seed, start_step),
            dc.shuffle_buffer,
            captions,
            stored_text=stored[0],
            rank=rank,
        )
        return batch_loader(stream, batch, int(cfg.island.num_workers))

    schedule = Schedule.from_config("expert", dc)  # it exports an expert's file: load_expert reads the student
    return Job(
        name=DISTILLED,
        title="distill",
        folder=rd.distilled,
        identity=dict(
            job=DISTILLED,
            clustering_id=index["clustering_id"],
            partition_keys_sha256=[m["keys_sha256"] for m in manifests],
            # a resume refuses a checkpoint distilled from other experts
            teachers_sha256=[source["experts"][expert_job(k)] for k in range(len(manifests))],
        ),
        seed=seed,
        build_module=build_module,
        build_loader=build_loader,
        schedule=replace(schedule, section="distill"),
        island=cfg.island,
        logger=cfg.logger,
        run_dir=rd.root,
        weights=rd.distilled_weights,
        record=rd.distilled_record,
        export_meta=dict(
            num_experts=len(manifests),
            clustering_id=index["clustering_id"],
            label_dropout=float(dc.label_dropout),
            text=text,
            latents=latent_meta(meta),
            distilled_from=source,
            data_weight=float(dc.data_weight),
        ),
        config=cfg.to_dict(),
        callbacks=checkpoint_uploads(cfg.store, rd.root, rd.distilled),
    )


def teacher_forward_flops(teachers: list, text_tokens: int = CLIP_CONTEXT) -> dict:
    """Forward FLOPs per sample of each teacher, counted as a training record counts its network's."""
    return {expert_job(k): count_flops(net, *example_inputs(net, text_tokens)) for k, net in enumerate(teachers)}


def distill_flops(
    student_forward: int,
    teacher_forward: dict,
    cluster_sizes: list[float],
    samples_seen: int,
    data_weight: float,
    experts_train: list[int | None],
) -> dict:
    """The FLOP fields of the record.

    ``train_flops``: the student's training, 3 x its forward per sample seen. ``teacher_flops``: one forward of
    the sample's own expert per sample seen, at the experts' forward FLOPs weighted by cluster size (the rate
    samples are drawn at; exact when the experts have one size), 0 when ``data_weight`` is 1 (no teacher runs).
    ``distill_flops``: both. ``total_flops``: that plus the experts' own training (None if a record lacks it).
    """
    sizes = np.asarray(cluster_sizes, dtype=float)
    per = np.asarray([teacher_forward[expert_job(k)] for k in range(len(sizes))], dtype=float)
    mean = float((sizes * per).sum() / sizes.sum())
    train = 3 * int(student_forward) * int(samples_seen)
    teacher = 0 if float(data_weight) == 1.0 else int(round(mean * int(samples_seen)))
    experts = None if any(f is None for f in experts_train) else int(sum(experts_train))
    return dict(
        train_flops=train,
        teacher_forward_flops_per_sample=dict(teacher_forward),
        teacher_forward_flops_mean=mean,
        teacher_flops=teacher,
        distill_flops=train + teacher,
        experts_train_flops=experts,
        total_flops=None if experts is None else experts + train + teacher,
    )


def _record(trained: Trained, cfg: Settings, rd: RunDir, index, manifests, metas, source) -> dict:
    """The common fields, the student's size and teachers, and the FLOPs of distillation and in total."""
    common = trained.common_record(parallelism=True)
    encoder = getattr(trained.module, "_text_encoder", None)
    teachers = teacher_forward_flops(trained.module.teachers, getattr(encoder, "context_length", CLIP_CONTEXT))
    experts_train = [
        read_json(rd.expert_record(k)).get("train_flops") if rd.expert_record(k).exists() else None
        for k in range(len(manifests))
    ]
    flops = distill_flops(
        common["forward_flops_per_sample"],
        teachers,
        [float(m["num_samples"]) for m in manifests],
        common["samples_seen"],
        float(cfg.distill.data_weight),
        experts_train,
    )
    record = dict(
        num_experts=len(manifests),
        clustering_id=index["clustering_id"],
        partition_keys_sha256=[m["keys_sha256"] for m in manifests],
        partition_samples=[int(m["num_samples"]) for m in manifests],
        size=trained.export_net.config()["size"],
        experts_size=metas[0]["model_config"]["size"],
        data_weight=float(cfg.distill.data_weight),
        label_dropout=float(cfg.distill.label_dropout),
        distilled_from=source,
        **common,
    )
    record.update(flops)  # train_flops as common_record counts it: the student's own training
    return record
