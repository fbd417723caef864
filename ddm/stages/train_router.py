"""Stage ``train-router``: a classifier of which cluster a noisy sample came from.

Trained with cross-entropy against the cluster of the clean sample that the
shared ``FlowPath`` noised, over (a fraction of) every partition, drawn in
proportion to cluster size so its optimum is the posterior p(k | x_t, t, y).
Needs no expert. One shard of each partition (when it has more than one), drawn
with the run's seed, is held out to measure accuracy in buckets of t, and
``router.sample_fraction`` of the others, drawn too, are trained on (see
``ddm.data.router_data``).

The router draws its training t from its own distribution, ``router.time_sampling``
(``uniform`` by default; ``logit_normal`` with ``router.logit_mean`` /
``router.logit_std``), not the experts' ``flow.time_sampling``: the sampler routes
at every t, high t on every image, where a logit-normal draw seldom falls. The
rest of the path (``flow.schedule``, ``flow.t_eps``) is the experts', so the
router sees x_t exactly as the sampler makes it (``router_flow``). The record
states the path it trained on (``flow``); a finished router of another time
sampling is kept, with a warning, until ``redo=true``.

With ``router.preview_every`` > 0 the accuracy by t of the current weights on a
fixed batch of those held-out samples goes to the logger and ``router/previews/``
every so many steps (see ``ddm.train.router_preview``).

Faults are handled as for an expert (see ``ddm.stages.train_expert``):
resume from the newest complete checkpoint, save and requeue on a signal,
``router/failed.json`` when training raises.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ddm.artifacts import RunDir
from ddm.data.loader import batch_loader, mixed_stream
from ddm.data.router_data import eval_set, load_partitions, split_shards
from ddm.data.shards import shard_paths
from ddm.data.verified import verified_shard_sets
from ddm.errors import BadInput
from ddm.eval.router_diag import heldout_diagnostics
from ddm.flow import FlowPath
from ddm.io import read_json
from ddm.job_names import ROUTER_JOB
from ddm.latent.run_latents import latent_manifest, latent_meta, stored_text_length, vae_spec
from ddm.launch.lock import check_free, is_global_rank_zero
from ddm.lineage import check_partition_of_run, cluster_ids, lineage_sizes
from ddm.ranks import island_processes
from ddm.seeds import data_stream_seed, router_seed, router_shards_seed
from ddm.settings import Settings
from ddm.stages import StageResult
from ddm.stages.runner import done_already
from ddm.text.spec import captions_for, router_conditioning_args, router_text_spec
from ddm.train.checkpoint_upload import checkpoint_uploads
from ddm.train.job import Job, Schedule, Trained, run_job
from ddm.train.modules import RouterModule
from ddm.train.router_preview import RouterPreview

log = logging.getLogger("ddm")

# The keys of ``cfg.router`` that set the router's own t distribution, as FlowPath names them.
TIME_KEYS = ("time_sampling", "logit_mean", "logit_std")


def router_time_sampling(cfg: Settings) -> dict:
    """``router.time_sampling`` and its logit-normal parameters.

    A ``BadInput`` naming ``router.time_sampling`` when it is not one of ``FlowPath.TIME_SAMPLINGS``.
    """
    rc = cfg.router
    kind = str(rc.time_sampling)
    if kind not in FlowPath.TIME_SAMPLINGS:
        raise BadInput(
            f"router.time_sampling={kind!r} is not one of {FlowPath.TIME_SAMPLINGS} (the router's own "
            f"training distribution of t; flow.time_sampling is the experts')"
        )
    return dict(time_sampling=kind, logit_mean=float(rc.logit_mean), logit_std=float(rc.logit_std))


def router_flow(cfg: Settings) -> dict:
    """The router's ``FlowPath`` settings: the experts' path (``cfg.flow``) with the router's own t distribution."""
    return dict(cfg.flow.to_dict(), **router_time_sampling(cfg))


def accuracy_by_t(
    net, path: FlowPath, x0, y, k, prior: torch.Tensor, buckets: int, seed: int, device=None
) -> list[dict]:
    """Accuracy, entropy and calibration gap of the router in equal buckets of t, with fixed noise.

    ``ddm.eval.router_diag.heldout_diagnostics`` (each sample weighted so the
    figures are those of the clusters' proportions ``prior``) of the router in
    eval mode on ``device`` (the CPU when None).
    """
    net.eval().to(device or "cpu")
    return heldout_diagnostics(net, path, x0, y, k, prior, buckets, seed, device)


def run(cfg: Settings) -> dict:
    """Train the router over all partitions; return its record (at once if it is already finished).

    Fault handling as for an expert: resume from the newest complete checkpoint,
    save and requeue (``router.requeue``) or exit non-zero on SIGUSR1/SIGTERM,
    ``failed.json`` when training raises.
    """
    rd = RunDir(cfg.run_dir)
    job_dir = rd.router
    router_time_sampling(cfg)  # a bad router.time_sampling fails before anything is read or deleted
    if done_already(rd.router_record, cfg):
        record = read_json(rd.router_record)
        _check_still_current(record, rd)
        _note_other_time_sampling(record, cfg)
        log.info("train-router: already done (%d steps) -> %s", record["steps"], job_dir)
        return StageResult(record, skipped=True)
    # Only global rank 0 starts over: the other ranks of a DDP job run this too, beside it.
    if cfg.redo and job_dir.exists() and is_global_rank_zero():
        check_free(job_dir, "train-router redo=true")  # never delete the folder of a job that still runs
        shutil.rmtree(job_dir)

    index, manifests = load_partitions(rd)
    for k, m in enumerate(manifests):  # whole shard sets of another run's clustering are refused here
        check_partition_of_run(rd, k, m)
    if vae_spec(cfg) is not None:  # a latent run: the same samples, encoded by `ddm encode`
        folders = [rd.latent(k) for k in range(len(manifests))]
        manifests = [latent_manifest(rd, k, m, verify_shards=False) for k, m in enumerate(manifests)]
    else:
        folders = [rd.partition(k) for k in range(len(manifests))]
    # what the router reads, checked against the manifests once per island and once per change
    verified_shard_sets(folders, manifests, job_dir, cfg.router, "router", island_processes(cfg.island))
    splits = [
        split_shards(
            shard_paths(folders[k], m),
            [s["num_samples"] for s in m["shards"]],
            float(cfg.router.sample_fraction),
            seed=router_shards_seed(cfg.seed, k),
        )
        for k, m in enumerate(manifests)
    ]
    record = run_job(
        _job(cfg, rd, index, manifests, [train for train, _ in splits], [held for _, held in splits]),
        lambda trained: _record(trained, cfg, index, manifests, [held for _, held in splits]),
    )
    if record:
        acc = ", ".join(f"{r['accuracy']:.2f}" for r in record["accuracy_by_t"])
        log.info(
            "train-router: %d steps, K=%d, accuracy by t [%s] -> %s", record["steps"], len(manifests), acc, job_dir
        )
    return record


def _check_still_current(record: dict, rd: RunDir) -> None:
    """A finished router of an older clustering must not pass for one of the current partitions."""
    index_path = rd.partitions_index
    if not index_path.exists():
        return
    current = read_json(index_path).get("clustering_id")
    if record.get("clustering_id") != current:
        raise BadInput(
            f"{rd.router_record} was trained on clustering {record.get('clustering_id')} but "
            f"{index_path} is clustering {current}: retrain it with `ddm train-router redo=true`"
        )


def _trained_time_sampling(record: dict) -> dict:
    """The t distribution a finished router trained on: its record's ``flow``, or (records written before the
    router had its own) the run's ``flow`` in the config it kept."""
    flow = record.get("flow") or (record.get("config") or {}).get("flow") or {}
    return {key: flow.get(key) for key in TIME_KEYS}


def _note_other_time_sampling(record: dict, cfg: Settings) -> None:
    """A finished router is kept as it is: say so when the config now asks for another t distribution."""
    was, now = _trained_time_sampling(record), router_time_sampling(cfg)
    if was["time_sampling"] is None:
        return  # not known: nothing to compare
    # logit_mean / logit_std only mean something for a logit-normal t
    keys = TIME_KEYS if "logit_normal" in (was["time_sampling"], now["time_sampling"]) else TIME_KEYS[:1]
    if any(was[key] != now[key] for key in keys):
        log.warning(
            "train-router: the finished router trained on t %s, the config asks for %s (router.time_sampling); "
            "it is kept as it is (retrain it with `ddm train-router redo=true`)",
            _describe(was),
            _describe(now),
        )


def _describe(time_sampling: dict) -> str:
    kind = time_sampling["time_sampling"]
    if kind == "logit_normal":
        return f"logit_normal(mean={time_sampling['logit_mean']}, std={time_sampling['logit_std']})"
    return str(kind)


def _job(
    cfg: Settings, rd: RunDir, index: dict, manifests: list[dict], train_shards: list[list[str]], held: list[list[str]]
) -> Job:
    """The router's training job: every partition's training shards, mixed in proportion to cluster size;
    a preview of its accuracy on the held-out shards ``held`` when ``router.preview_every`` > 0."""
    rc, meta = cfg.router, manifests[0]
    text = router_text_spec(cfg)
    captions = captions_for(cfg, meta) if text else None
    # text.store=true with a router that reads captions: their encodings come from the latent shards
    stored = [stored_text_length(cfg, m, f"cluster {k}'s latents") for k, m in enumerate(manifests)] if text else [0]

    def build_module() -> RouterModule:
        model = dict(
            num_outputs=len(manifests),
            size=rc.size,
            image_size=int(meta["image_size"]),
            in_channels=int(meta["channels"]),
            **router_conditioning_args(cfg, meta),
        )
        return RouterModule(
            model=model,
            flow=router_flow(cfg),  # the experts' path, the router's own t distribution
            lr=rc.lr,
            weight_decay=rc.weight_decay,
            betas=tuple(rc.betas),
            warmup_steps=rc.warmup_steps,
            total_steps=rc.steps,
            label_dropout=rc.label_dropout,
            nan_check_every=int(rc.nan_check_every),
            compile=bool(rc.compile),
            text=text,
        )

    def build_loader(batch: int, start_step: int, rank: int | None = None):
        parts = [(urls, float(m["num_samples"])) for urls, m in zip(train_shards, manifests)]
        stream = mixed_stream(
            parts,
            int(meta["channels"]),
            data_stream_seed(cfg.seed, start_step),
            rc.shuffle_buffer,
            captions,
            stored_text=stored[0],
            rank=rank,
        )
        return batch_loader(stream, batch, int(cfg.island.num_workers))

    return Job(
        name=ROUTER_JOB,
        title="train-router",
        folder=rd.router,
        identity=dict(
            job=ROUTER_JOB,
            clustering_id=index["clustering_id"],
            partition_keys_sha256=[m["keys_sha256"] for m in manifests],
            # a checkpoint of another t distribution is not resumed as this one
            time_sampling=router_time_sampling(cfg),
        ),
        seed=router_seed(cfg.seed),
        build_module=build_module,
        build_loader=build_loader,
        schedule=Schedule.from_config("router", rc),
        island=cfg.island,
        logger=cfg.logger,
        run_dir=rd.root,
        weights=rd.router_weights,
        record=rd.router_record,
        export_meta=dict(
            num_experts=len(manifests),
            clustering_id=index["clustering_id"],
            # a grown run: the clustering each expert was trained under (ddm.lineage)
            cluster_ids=cluster_ids(index),
            lineage=lineage_sizes(index),
            # guidance routed separately (sample.cfg_routing=separate) needs the null label trained
            label_dropout=float(rc.label_dropout),
            text=text,
            latents=latent_meta(meta),
        ),
        config=cfg.to_dict(),
        callbacks=_preview(cfg, rd, manifests, held) + checkpoint_uploads(cfg.store, rd.root, rd.router),
    )


def _preview(cfg: Settings, rd: RunDir, manifests: list[dict], held: list[list[str]]) -> tuple:
    """The router's accuracy-by-t preview callback (``router.preview_every`` > 0), or nothing.

    Its batch: the first ``router.preview_samples`` (at most ``eval_samples``) of the held-out samples the
    record is measured on, read now, once, on every rank; its prior, buckets and seed are the record's.
    """
    rc = cfg.router
    every = int(rc.preview_every)
    if every <= 0:
        return ()
    total = min(int(rc.preview_samples), int(rc.eval_samples))
    if router_text_spec(cfg):
        x0, _, k, texts = eval_set(manifests, held, total, captions_for(cfg, manifests[0]))

        def condition(module):
            return module.conditioning(None, texts)  # the router's own text encoder, on its device
    else:
        x0, labels, k = eval_set(manifests, held, total)

        def condition(module):
            return labels

    return (
        RouterPreview(
            every,
            rd.router / "previews",
            x0,
            k,
            condition,
            _prior(manifests),
            int(rc.t_buckets),
            int(cfg.seed),
        ),
    )


def _prior(manifests: list[dict]) -> torch.Tensor:
    """The clusters' proportions, from their sizes: what held-out figures are weighted to."""
    sizes = torch.tensor([float(m["num_samples"]) for m in manifests])
    return sizes / sizes.sum()


def _record(trained: Trained, cfg: Settings, index: dict, manifests: list[dict], held: list[list[str]]) -> dict:
    """The common fields plus the router's accuracy by t on the held-out shards."""
    rc, module = cfg.router, trained.module
    text = router_text_spec(cfg)
    if text:
        x0, _, k, texts = eval_set(manifests, held, int(rc.eval_samples), captions_for(cfg, manifests[0]))
        y = trained.module.conditioning(None, texts)  # the router's own text encoder
    else:
        x0, y, k = eval_set(manifests, held, int(rc.eval_samples))
    # the exported network: whole even where an FSDP island sharded module.net; on the island's GPU when it
    # has one (Lightning hands the module back on the CPU after the fit)
    net = trained.export_net
    device = torch.device("cuda") if cfg.island.accelerator != "cpu" and torch.cuda.is_available() else None
    by_t = accuracy_by_t(net, module.path, x0, y, k, _prior(manifests), int(rc.t_buckets), int(cfg.seed), device)
    return dict(
        num_experts=len(manifests),
        clustering_id=index["clustering_id"],
        cluster_ids=cluster_ids(index),
        heldout_shards=[[Path(url).name for url in urls] for urls in held],
        eval_samples=len(k),
        # the path it trained on: the experts' schedule and t_eps, its own t distribution (router.time_sampling)
        flow=module.path.config(),
        accuracy_by_t=by_t,
        **trained.common_record(),
    )
