"""Stage ``evaluate``: sample quality, held-out flow-matching loss, router diagnostics and FLOPs of a run.

Reads the run's experts and router, ``samples/`` (reused when it holds enough
images made with the settings asked for; otherwise images are sampled here) and
the training data; writes, in ``<run>/evaluation/``::

    heldout/                held-out real images as shards + manifest (see ddm.eval.heldout)
    samples-<strategy>.npz  images sampled by this stage (when samples/ had too few)
    report.md               one table per feature space; every comparison states its FLOPs
    metrics.json            written last (the stage's "done" marker), holding:

    settings        eval config, sampling settings, size/mtime of each network file (the skip check)
    run             run_dir, clustering_id, num_experts, experts, num_classes, image_shape, flow, steps
    heldout         mode (split | slice), num_images, keys_sha256, note, labelled, path
    feature_spaces  {"classifier:<checksum[:12]>": {kind, target (class | cluster), checksum, cache_file,
                      cached, test_accuracy, test_images, feature_dim, train, num_real,
                      reference_training_images: {num_images, fd, precision, recall},
                      strategies: {<strategy>: {num_generated, fd, precision, recall,
                                                classifier_accuracy, per_class: {<c>: {num_real,
                                                num_generated, fd, precision, recall}}}}},
                     "inception:<sha[:12]>": {kind, file, sha256, num_real, reference..., strategies...}}
    generated       {<strategy>: {num_images, source}}
    usage           {<strategy>: [{step, t, selected: [K], weight: [K]}]}   (per solver evaluation)
    fm_loss         {t_grid, num_samples, seed, note, models: {"ensemble-<strategy>" | "expert-KK":
                      {per_t: [{t, loss}], mean, num_samples, forward_flops_per_call}}}
    router          {cluster_labels (assignments | nearest_centroid), num_images, forward_flops_per_sample,
                     buckets: [{t_lo, t_hi, n, accuracy, entropy, confidence, ece, nll, prior_accuracy,
                                prior_entropy, max_entropy}]}  or {skipped: why}
    flops           {forward_per_sample: {"expert-KK", "router"}, counter,
                     train: {jobs: {"expert-KK" | "router": {flops, estimated, samples_seen}}, total, router_share},
                     sampling: {<strategy> | "single_model": {per_image, per_call, calls, experts_per_call,
                                cfg_factor, router_per_call, expert_forward, measured_per_image, measured_images}}}
    wall_s

Feature spaces: ``classifier:<checksum>``, a small CNN trained on the training
split and cached by content (ddm.eval.feature_net), always; ``inception:<sha>``
when ``eval.inception_weights`` names a local file. Each space is its own entry
and its own table: numbers from different spaces are never mixed.

A rerun with the same settings and networks returns the existing metrics; other
settings (or ``redo=true``) evaluate again. ``redo`` rebuilds the held-out shards
but reuses a cached feature net: its cache is keyed by content, so it is the same net.
"""
from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from ddm.artifacts import RunDir
from ddm.ensemble import Ensemble
from ddm.eval import feature_net as fnet
from ddm.eval.fid import frechet_distance_features
from ddm.eval.flops import (measured_sampling_flops, model_forward_flops, sampling_flops_per_image,
                            training_flops, EXPERTS_PER_CALL)
from ddm.eval.fm_loss import heldout_fm_loss
from ddm.eval.heldout import (cluster_labels, heldout_dir, load_images, prepare_heldout, training_data_sha)
from ddm.eval.prdc import precision_recall
from ddm.eval.router_diag import router_diagnostics, usage_per_step
from ddm.eval.tables import render_report
from ddm.images import batch_to_model_space
from ddm.io import atomic_path, read_json, write_json, write_text
from ddm.sampling import load_ensemble
from ddm.stages.runner import note_skipped
from ddm.devices import resolve_device
from ddm.stages.sample import draw, requested_settings

log = logging.getLogger("ddm")

# Sampling settings that must match for samples/samples.npz to stand for a strategy.
SAME_SAMPLING = ("top_k", "experts", "temperature", "solver", "steps", "cfg_scale")


def evaluation_dir(rd: RunDir):
    return rd.root / "evaluation"


def settings_of(cfg) -> dict:
    """What the metrics depend on: the eval config, the sampling settings and the trained networks' files."""
    if "eval" not in cfg:
        raise KeyError("the config has no `eval` group: add `- eval: default` to the defaults of conf/config.yaml "
                       "or pass +eval=default on the command line")
    return dict(eval=OmegaConf.to_container(cfg.eval, resolve=True), sample=requested_settings(cfg.sample),
                networks=_network_files(RunDir(cfg.run_dir)))


def _network_files(rd: RunDir) -> dict:
    """Size and modification time of router.pt and every expert.pt: a retrained network is evaluated again."""
    files = sorted(rd.experts.glob("expert-*/expert.pt")) + [rd.router_weights]
    return {str(p.relative_to(rd.root)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}


def run(cfg) -> dict:
    """Evaluate the run at ``cfg.run_dir`` as ``cfg.eval`` says; return the metrics."""
    rd = RunDir(cfg.run_dir)
    ec, redo = cfg.eval, bool(cfg.get("redo", False))
    out = evaluation_dir(rd)
    settings = settings_of(cfg)
    if (out / "metrics.json").exists() and not redo:
        metrics = read_json(out / "metrics.json")
        if metrics.get("settings") == settings:
            note_skipped()
            log.info("evaluate: done already -> %s", out / "metrics.json")
            return metrics

    start = time.perf_counter()
    inception = _load_inception(ec)  # fail on a missing file before any slow work
    ctx = EvaluationContext(cfg, rd, settings, redo)
    metrics = dict(stage="evaluate", settings=settings, run=ctx.run_info(), heldout=ctx.heldout_info())
    metrics["flops"] = ctx.flops()
    generated = {s: ctx.generated(s) for s in ctx.strategies}
    metrics["feature_spaces"] = spaces = _feature_spaces(ctx, generated, inception)
    metrics["generated"] = {s: dict(num_images=len(g["images"]), source=g["source"]) for s, g in generated.items()}
    metrics["usage"] = {s: usage_per_step(g["usage"], g["usage_images"]) for s, g in generated.items()
                        if g["usage"]}
    metrics["fm_loss"] = ctx.fm_loss()
    metrics["router"] = ctx.router()
    metrics["wall_s"] = round(time.perf_counter() - start, 2)

    write_text(out / "report.md", render_report(metrics))
    write_json(out / "metrics.json", metrics)
    metrics = read_json(out / "metrics.json")  # what a rerun returns: JSON types (string keys) throughout
    name, space = next(iter(spaces.items()))
    first = space["strategies"][ctx.strategies[0]]
    log.info("evaluate: %s FD %.4g, precision %s, recall %s (%s, %d images, feature net test acc %s), "
             "FM loss %s, %.0fs -> %s", ctx.strategies[0], first["fd"], _fmt(first["precision"]),
             _fmt(first["recall"]), name, first["num_generated"], _fmt(space["test_accuracy"]),
             ", ".join(f"{k} {v['mean']:.4f}" for k, v in metrics["fm_loss"]["models"].items()
                       if not k.startswith("expert")), metrics["wall_s"], out)
    return metrics


def _feature_spaces(ctx: "EvaluationContext", generated: dict, inception) -> dict:
    """Sample quality in each feature space, keyed by the space's name (the classifier's first)."""
    net, info = ctx.feature_net()
    classify = (lambda x: fnet.predict(net.net, x, ctx.batch)) if info["target"] == "class" else None
    spaces = {net.space: dict(info, **ctx.quality(lambda x: fnet.features(net.net, x, ctx.batch), generated,
                                                  classify=classify))}
    if inception is not None:
        batch = int(ctx.ec.inception_batch_size)
        spaces[inception.space] = dict(kind=inception.kind, file=str(inception.path), sha256=inception.sha256,
                                       **ctx.quality(lambda x: inception(x, batch), generated))
    return spaces


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _load_inception(ec):
    if ec.get("inception_weights") is None:
        return None
    from ddm.eval.inception import load_inception
    return load_inception(ec.inception_weights)


class EvaluationContext:
    """What every part of the evaluation shares: the run, its ensemble, the held-out set and fixed subsets."""

    def __init__(self, cfg, rd: RunDir, settings: dict, redo: bool):
        self.cfg, self.rd, self.ec = cfg, rd, cfg.eval
        self.sc = settings["sample"]
        self.seed = int(self.ec.seed)
        self.batch = int(self.ec.batch_size)
        self.device = resolve_device(self.ec.device, "eval.device")
        self.strategies = [str(s) for s in (self.ec.strategies or [self.sc["strategy"]])]
        self.base, self.path, self.info = load_ensemble(rd.root, strategy="top1", subset=self.sc["experts"],
                                                        device=self.device)
        self.num_classes = int(self.info["num_classes"])
        self.conditional = self.num_classes > 0
        self.shape = (int(self.info["in_channels"]), int(self.info["image_size"]), int(self.info["image_size"]))
        self.heldout = prepare_heldout(cfg, redo=redo)
        self.real_x, self.real_y, self.real_keys = load_images(heldout_dir(rd))
        # One seeded order of the held-out set: every metric takes a prefix of it.
        self.order = np.random.default_rng(self.seed).permutation(len(self.real_x))
        self._clusters = None

    # ---- the pieces ---------------------------------------------------------------
    def run_info(self) -> dict:
        i = self.info
        return dict(run_dir=str(self.rd.root), clustering_id=i["clustering_id"], num_experts=i["num_experts"],
                    experts=i["experts"], num_classes=self.num_classes, image_shape=list(self.shape),
                    flow=i["flow"], expert_steps=i["expert_steps"], router_steps=i["router_steps"])

    def heldout_info(self) -> dict:
        h = self.heldout
        return dict(mode=h["mode"], num_images=h["num_samples"], keys_sha256=h["keys_sha256"], note=h["note"],
                    labelled=bool((self.real_y >= 0).any()), path=str(heldout_dir(self.rd)))

    def ensemble(self, strategy: str) -> Ensemble:
        """The run's experts and router under another strategy (sharing the loaded modules)."""
        experts = {int(k): m for k, m in self.base.experts.items()}
        # The ids actually loaded: sample.experts may be a list or a rule (all, or those on disk).
        ids = list(self.base.active_ids)
        return Ensemble(experts, self.base.router, strategy=strategy, top_k=int(self.sc["top_k"]),
                        subset=None if ids == list(range(self.base.num_experts)) else ids,
                        temperature=float(self.sc["temperature"]),
                        generator=torch.Generator().manual_seed(self.seed + 1),
                        num_experts=self.base.num_experts).eval()

    def subset(self, n) -> np.ndarray:
        return np.sort(self.order[:min(int(n), len(self.order))])

    def clusters(self) -> tuple[np.ndarray | None, str]:
        """Cluster of every held-out image in the prefix any metric uses (-1 elsewhere), computed once."""
        if self._clusters is None:
            need = self.subset(max(int(self.ec.router.num_samples), int(self.ec.num_samples)))
            labels, how = cluster_labels(self.rd, [self.real_keys[i] for i in need], self.real_x[need],
                                         int(self.cfg.seed))
            full = None
            if labels is not None:
                full = np.full(len(self.real_x), -1, dtype=np.int64)
                full[need] = labels
            self._clusters = (full, how)
        return self._clusters

    def labels_for_model(self, idx) -> torch.Tensor | None:
        """Held-out labels as model input; unlabelled images get the null label."""
        if not self.conditional:
            return None
        y = torch.from_numpy(self.real_y[idx])
        return torch.where(y < 0, torch.full_like(y, self.num_classes), y)

    # ---- FLOPs ---------------------------------------------------------------------
    @functools.cached_property
    def forward(self) -> dict:
        """Measured forward FLOPs per sample of each expert and of the router."""
        fwd = {f"expert-{int(k):02d}": model_forward_flops(m, self.shape, self.conditional)
               for k, m in self.base.experts.items()}
        fwd["router"] = model_forward_flops(self.base.router, self.shape, self.conditional)
        return fwd

    def flops(self) -> dict:
        fwd = self.forward
        expert_mean = float(np.mean([v for k, v in fwd.items() if k != "router"]))
        train = {}
        for k in self.info["experts"]:
            rec_path = self.rd.expert_record(k)
            rec = read_json(rec_path) if rec_path.exists() else {}
            flops, estimated = training_flops(rec, fwd[f"expert-{k:02d}"])
            train[f"expert-{k:02d}"] = dict(flops=flops, estimated=estimated, samples_seen=rec.get("samples_seen"))
        rrec = read_json(self.rd.router_record) if self.rd.router_record.exists() else {}
        flops, estimated = training_flops(rrec, fwd["router"])
        train["router"] = dict(flops=flops, estimated=estimated, samples_seen=rrec.get("samples_seen"))
        known = [v["flops"] for v in train.values() if v["flops"] is not None]
        total = sum(known) if len(known) == len(train) else None
        router_share = train["router"]["flops"] / total if total and train["router"]["flops"] is not None else None

        sc, n_measure = self.sc, int(self.ec.flops.measure_images)
        common = dict(steps=int(sc["steps"]), solver=sc["solver"], cfg_scale=float(sc["cfg_scale"]),
                      conditional=self.conditional, num_experts=len(self.info["experts"]), top_k=int(sc["top_k"]))
        sampling = {}
        for s in self.strategies:
            row = sampling_flops_per_image(expert_mean, fwd["router"], s, **common)
            if n_measure > 0:
                y = self.labels_for_model(self.subset(n_measure)) if self.conditional else None
                row["measured_per_image"] = measured_sampling_flops(
                    self.ensemble(s), self.path, self.shape, y, int(sc["steps"]), sc["solver"],
                    float(sc["cfg_scale"]), seed=self.seed)
                row["measured_images"] = n_measure
            sampling[s] = row
        sampling["single_model"] = sampling_flops_per_image(expert_mean, 0, None, **common)
        return dict(forward_per_sample=fwd, train=dict(jobs=train, total=total, router_share=router_share),
                    sampling=sampling, counter="torch.utils.flop_counter (2 FLOPs per multiply-add)")

    def forward_per_call(self, strategy: str | None) -> int:
        """Forward FLOPs of one model call (no guidance) of an ensemble strategy, or of one expert (None)."""
        experts = [v for k, v in self.forward.items() if k != "router"]
        mean = float(np.mean(experts))
        if strategy is None:
            return int(mean)
        n = EXPERTS_PER_CALL[strategy](len(experts), int(self.sc["top_k"]))
        return int(self.forward["router"] + n * mean)

    # ---- generated images ----------------------------------------------------------
    def generated(self, strategy: str) -> dict:
        """``num_samples`` images of ``strategy``: from samples/ when it has them, else sampled now."""
        n = int(self.ec.num_samples)
        reused = self._from_samples_stage(strategy, n)
        if reused is not None:
            return reused
        rng = np.random.default_rng(self.seed + 2)
        labels = None
        if self.conditional:
            pool = self.real_y[self.real_y >= 0]
            # Class proportions of the held-out set, so per-class and overall figures compare like with like.
            labels = torch.from_numpy(np.resize(rng.permutation(pool), n) if len(pool)
                                      else rng.integers(self.num_classes, size=n))
        sc = self.sc
        gen = torch.Generator().manual_seed(self.seed + 3)
        images, usage = draw(self.ensemble(strategy), self.path, self.shape, labels, n,
                              int(self.cfg.sample.batch_size), sc, gen, self.device)
        label_array = np.full(n, -1, np.int64) if labels is None else labels.numpy()
        target = evaluation_dir(self.rd) / f"samples-{strategy}.npz"
        with atomic_path(target) as tmp:
            np.savez(tmp, images=images, labels=label_array)
        return dict(images=images, labels=label_array, usage=usage, usage_images=n,
                    source=str(target.relative_to(self.rd.root)))

    def _from_samples_stage(self, strategy: str, n: int) -> dict | None:
        rd = self.rd
        npz_path = rd.samples / "samples.npz"
        if not (rd.samples_record.exists() and npz_path.exists()):
            return None
        record = read_json(rd.samples_record)
        made = record.get("settings", {})
        if made.get("strategy") != strategy or any(made.get(k) != self.sc.get(k) for k in SAME_SAMPLING):
            return None
        npz = np.load(npz_path)
        if len(npz["images"]) < n:
            return None
        # A seeded subset, not the first n: the first images are the class-sorted grid.
        idx = np.sort(np.random.default_rng(self.seed + 2).permutation(len(npz["images"]))[:n])
        usage_path = rd.samples / "usage.json"
        usage = read_json(usage_path) if usage_path.exists() else []
        usage = usage.get("records", []) if isinstance(usage, dict) else usage
        return dict(images=npz["images"][idx], labels=npz["labels"][idx], usage=usage,
                    usage_images=int(record.get("num_images", len(npz["images"]))), source="samples/samples.npz")

    # ---- feature spaces ------------------------------------------------------------
    def feature_net(self):
        fc = self.ec.feature_net
        labelled = self.num_classes > 0 and (self.real_y >= 0).any()
        target = "class" if labelled else "cluster"
        num_classes = self.num_classes if labelled else int(self.info["num_experts"])
        max_train = None if fc.max_train_samples is None else int(fc.max_train_samples)
        data_sha = training_data_sha(self.rd, self.heldout, target, max_train, int(fc.seed))
        net = fnet.train_feature_net(
            lambda: self._training_images(target, max_train, int(fc.seed)), num_classes,
            cache_dir=fc.cache_dir, data_sha=data_sha, channels=self.shape[0], steps=int(fc.steps),
            batch_size=int(fc.batch_size), lr=float(fc.lr), width=int(fc.width), seed=int(fc.seed),
            device=self.device)
        if target == "class":
            test_x, test_y = self.real_x, self.real_y
        else:
            clusters, _ = self.clusters()
            keep = clusters >= 0 if clusters is not None else np.zeros(len(self.real_x), bool)
            test_x, test_y = self.real_x[keep], (clusters[keep] if clusters is not None else np.zeros(0))
        acc = fnet.accuracy(net.net, test_x, test_y, self.batch) if len(test_y) else None
        info = dict(kind="classifier", target=target, checksum=net.checksum, cache_file=str(net.path),
                    cached=net.cached, test_accuracy=acc, test_images=int((np.asarray(test_y) >= 0).sum()),
                    feature_dim=net.net.feature_dim, train=net.info)
        return net, info

    def _training_images(self, target: str, max_train, seed: int):
        exclude = set(self.real_keys) if self.heldout.get("excluded_from_training") else None
        x, y, keys = load_images(self.rd.data, exclude=exclude)
        if target == "cluster":
            y, _ = cluster_labels(self.rd, keys, x, int(self.cfg.seed))
        if max_train is not None and len(x) > max_train:
            idx = np.sort(np.random.default_rng(seed).choice(len(x), max_train, replace=False))
            x, y = x[idx], y[idx]
        return x, y

    def quality(self, extract, generated: dict, classify=None) -> dict:
        """FD, precision and recall of each strategy (and of training images) against held-out images."""
        n, k, min_class = int(self.ec.num_samples), int(self.ec.prdc_k), int(self.ec.per_class_min)
        idx = self.subset(n)
        real_f, real_y = extract(self.real_x[idx]), self.real_y[idx]
        exclude = set(self.real_keys) if self.heldout.get("excluded_from_training") else None
        train_x, _, _ = load_images(self.rd.data, limit=len(idx), exclude=exclude)
        # What a model that reproduced its training images would score: the floor for this n.
        train_f = extract(train_x)
        ref = dict(num_images=len(train_x), fd=frechet_distance_features(train_f, real_f), **_pr(real_f, train_f, k))
        out = dict(num_real=len(idx), reference_training_images=ref, strategies={})
        for s, g in generated.items():
            gen_f = extract(g["images"])
            row = dict(num_generated=len(gen_f), fd=frechet_distance_features(gen_f, real_f), **_pr(real_f, gen_f, k))
            has_labels = self.conditional and (g["labels"] >= 0).any() and (real_y >= 0).any()
            if classify is not None and has_labels:
                row["classifier_accuracy"] = float((classify(g["images"]) == g["labels"]).mean())
            if has_labels:
                row["per_class"] = _per_class(real_f, real_y, gen_f, g["labels"], k, min_class)
            out["strategies"][s] = row
        return out

    # ---- flow-matching loss and router -------------------------------------------
    def fm_loss(self) -> dict:
        fc = self.ec.fm_loss
        idx = self.subset(fc.num_samples)
        x0 = batch_to_model_space(self.real_x[idx])
        y = self.labels_for_model(idx)
        t_grid = [float(t) for t in fc.t_grid]
        models = {}
        for s in fc.strategies:
            models[f"ensemble-{s}"] = dict(
                heldout_fm_loss(self.ensemble(str(s)), self.path, x0, y, t_grid, self.seed, self.batch, self.device),
                forward_flops_per_call=self.forward_per_call(str(s)))
        if fc.per_expert:
            for k, expert in self.base.experts.items():
                models[f"expert-{int(k):02d}"] = dict(
                    heldout_fm_loss(expert, self.path, x0, y, t_grid, self.seed, self.batch, self.device),
                    forward_flops_per_call=self.forward[f"expert-{int(k):02d}"])
        return dict(t_grid=t_grid, num_samples=len(idx), seed=self.seed, models=models,
                    note="per-element MSE to the path's velocity; same noise for every model")

    def router(self) -> dict:
        rc = self.ec.router
        clusters, how = self.clusters()
        if clusters is None:
            return dict(skipped=how)
        idx = self.subset(rc.num_samples)
        idx = idx[clusters[idx] >= 0]
        x0 = batch_to_model_space(self.real_x[idx])
        rows = router_diagnostics(self.base.router, self.path, x0, self.labels_for_model(idx),
                                  torch.from_numpy(clusters[idx]), int(rc.t_buckets), self.seed, self.batch,
                                  int(rc.ece_bins), device=self.device)
        return dict(cluster_labels=how, num_images=len(idx), buckets=rows,
                    forward_flops_per_sample=self.forward["router"])


def _pr(real_f, gen_f, k: int) -> dict:
    """Precision/recall when both sets have more than k points, else None values."""
    if min(len(real_f), len(gen_f)) <= k:
        return dict(precision=None, recall=None)
    pr = precision_recall(real_f, gen_f, k)
    return dict(precision=pr["precision"], recall=pr["recall"])


def _per_class(real_f, real_y, gen_f, gen_y, k: int, min_count: int) -> dict:
    out = {}
    for c in sorted(set(real_y[real_y >= 0].tolist()) & set(gen_y[gen_y >= 0].tolist())):
        r, g = real_f[real_y == c], gen_f[gen_y == c]
        if min(len(r), len(g)) < max(min_count, 2):
            continue
        out[str(c)] = dict(num_real=len(r), num_generated=len(g), fd=frechet_distance_features(g, r), **_pr(r, g, k))
    return out
