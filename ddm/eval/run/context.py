"""``EvaluationContext``: a run loaded once for its evaluation, and one method per section of metrics.json.

The context holds what every section shares: the ensemble's modules, the flow
path, the held-out images and one seeded order of them (each metric takes a
prefix, so the metrics of one evaluation see the same images). Its methods read
``cfg.eval`` and the run directory and call the plain functions of ``ddm.eval``.

A strategy becomes a model in ``ensemble`` and a cost in ``forward_per_call``:
a subclass that adds a strategy overrides those two, and every section follows
(``ddm.experiments.paper_table`` adds a fixed per-class expert this way).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ddm.artifacts import RunDir
from ddm.cluster_router import ClusterRouter
from ddm.devices import allow_tf32, resolve_device
from ddm.ensemble import DATA_DEPENDENT, Ensemble
from ddm.eval import flops as flop_count
from ddm.eval.fm_loss import fm_loss_summary
from ddm.eval.heldout import load_images
from ddm.eval.quality import sample_quality
from ddm.eval.router_diag import router_diagnostics
from ddm.eval.run import evaluation_dir
from ddm.eval.run.clusters import cluster_labels
from ddm.eval.run.feature_spaces import classifier_info, train_classifier
from ddm.eval.run.generated import from_samples_stage, labels_to_sample, sample_now
from ddm.eval.run.heldout import heldout_dir, prepare_heldout
from ddm.eval.run.text import HeldoutText
from ddm.images import batch_to_model_space
from ddm.io import read_json
from ddm.job_names import ROUTER_JOB, ensemble_name, expert_job
from ddm.latent.run_latents import run_latents
from ddm.routing_schedule import canonical_label
from ddm.sampling import load_ensemble, num_evaluations
from ddm.sampling.draw import offloaded, rerouted
from ddm.sampling.ensemble_loading import router_options
from ddm.sampling.fit import check_guidance
from ddm.sampling.offload import FetchedExpert
from ddm.seeds import ROUTING_OFFSET, generator
from ddm.settings import Settings
from ddm.text.encoder import PromptBatches


class EvaluationContext:
    """The run's ensemble, the held-out set and its fixed subsets, shared by every part of the evaluation.

    ``settings`` is the stage's ``settings_of(cfg)``; ``redo`` rewrites the held-out shards.
    """

    def __init__(self, cfg: Settings, rd: RunDir, settings: dict, redo: bool):
        self.cfg, self.rd, self.ec = cfg, rd, cfg.eval
        self.sc = settings["sample"]
        self.seed = int(self.ec.seed)
        self.batch = int(self.ec.batch_size)
        self.device = resolve_device(self.ec.device, "eval.device")
        allow_tf32(self.device)
        # schedules in one spelling (full:0.6:top1), the labels of every section
        self.strategies = [canonical_label(s) for s in (self.ec.strategies or [self.sc["strategy"]])]
        routing = router_options(self.sc, int(cfg.seed))  # sample.router=clusters: no router.pt
        self.base, self.path, self.info = load_ensemble(
            rd.root,
            strategy="top1",
            subset=self.sc["experts"],
            # sample.offload: the experts wait in host memory, each moved to the device when routed
            device="cpu" if cfg.sample.offload else self.device,
            **routing,
        )
        self.base = offloaded(self.base, cfg.sample, self.device)
        # latent runs: samples are decoded for every image metric; the FM loss and the router see encoded images
        self.latents = run_latents(cfg, self.info.latents, self.device)
        if routing and self.latents:  # the cluster router embeds its x0 estimates as images
            routing["decode"].fn = self.latents.decode
        check_guidance(self.info, self.sc["cfg_scale"], cfg_routing=self.sc["cfg_routing"])
        self.text = self.info.text  # text runs: the networks take captions, not labels
        self.num_classes = int(self.info.num_classes)
        # the data's classes: the networks' own, or (text runs) those the captions may be made from
        self.data_classes = self.num_classes or (int(read_json(rd.data_manifest)["num_classes"]) if self.text else 0)
        self.conditional = self.num_classes > 0 or bool(self.text)
        self.shape = (int(self.info.in_channels), int(self.info.image_size), int(self.info.image_size))
        # the channels of the images themselves (what the feature net sees): the latents' own in a latent run
        self.image_channels = self.latents.image_channels if self.latents else self.shape[0]
        self.heldout = prepare_heldout(cfg, redo=redo)
        self.real_x, self.real_y, self.real_keys = load_images(heldout_dir(rd))
        self.heldout_text = (
            HeldoutText(cfg, rd, self.text, self.real_y, self.real_keys, self.device, self.seed) if self.text else None
        )
        # One seeded order of the held-out set: every metric takes a prefix of it.
        self.order = np.random.default_rng(self.seed).permutation(len(self.real_x))
        self._clusters = None

    # ---- the run and its held-out set ----------------------------------------------
    def run_info(self) -> dict:
        """metrics.json ``run``: run_dir, clustering_id, num_experts, experts, num_classes, image_shape,
        flow, expert_steps, router_steps, expert_models ({id: {size, target}})."""
        i = self.info
        return dict(
            run_dir=str(self.rd.root),
            clustering_id=i.clustering_id,
            num_experts=i.num_experts,
            experts=i.experts,
            num_classes=self.num_classes,
            image_shape=list(self.shape),
            flow=i.flow,
            expert_steps=i.expert_steps,
            router_steps=i.router_steps,
            expert_models=i.expert_models,
        )

    def heldout_info(self) -> dict:
        """metrics.json ``heldout``: mode (split | slice), num_images, keys_sha256, note, labelled, path."""
        h = self.heldout
        return dict(
            mode=h["mode"],
            num_images=h["num_samples"],
            keys_sha256=h["keys_sha256"],
            note=h["note"],
            labelled=bool((self.real_y >= 0).any()),
            path=str(heldout_dir(self.rd)),
        )

    def ensemble(self, strategy: str, cfg_routing: str | None = None) -> Ensemble:
        """The run's experts and router under another strategy (sharing the loaded modules).

        ``cfg_routing``: guidance routing other than ``sample.cfg_routing`` (None: that).
        """
        return rerouted(
            self.base,  # the experts loaded: sample.experts may be a list or a rule (all, or those on disk)
            strategy=strategy,
            top_k=int(self.sc["top_k"]),
            temperature=float(self.sc["temperature"]),
            generator=generator(self.seed + ROUTING_OFFSET),
            threshold=self.sc["threshold"],
            top_p=self.sc["top_p"],
            cfg_routing=cfg_routing or self.sc["cfg_routing"],
        )

    def subset(self, n) -> np.ndarray:
        """Indices of the first ``n`` held-out images in the seeded order, sorted."""
        return np.sort(self.order[: min(int(n), len(self.order))])

    def clusters(self) -> tuple[np.ndarray | None, str]:
        """Cluster of every held-out image in the prefix any metric uses (-1 elsewhere), computed once."""
        if self._clusters is None:
            need = self.subset(max(int(self.ec.router.num_samples), int(self.ec.num_samples)))
            labels, how = cluster_labels(
                self.rd, [self.real_keys[i] for i in need], self.real_x[need], int(self.cfg.seed)
            )
            full = None
            if labels is not None:
                full = np.full(len(self.real_x), -1, dtype=np.int64)
                full[need] = labels
            self._clusters = (full, how)
        return self._clusters

    def labels_for_model(self, idx):
        """Held-out labels as model input (unlabelled images get the null label); text runs: their captions."""
        if self.text:
            return self.heldout_text.encoder(self.heldout_text.of(idx))
        if not self.conditional:
            return None
        y = torch.from_numpy(self.real_y[idx])
        return torch.where(y < 0, torch.full_like(y, self.num_classes), y)

    def model_space(self, idx) -> torch.Tensor:
        """Held-out images as the networks see them: in [-1, 1], or their latents in a latent run."""
        if self.latents:  # uint8 pixels cross to the VAE's device and are scaled there
            return self.latents.encode(self.real_x[idx])
        return batch_to_model_space(self.real_x[idx])

    def excluded_from_training(self) -> set | None:
        """Keys of held-out images that are in ``data/`` (a slice) and must stay out of training data."""
        return set(self.real_keys) if self.heldout.get("excluded_from_training") else None

    # ---- FLOPs ---------------------------------------------------------------------
    @functools.cached_property
    def forward(self) -> dict:
        """Measured forward FLOPs per sample of each expert and of the router (``flop_count.forward_flops``)."""
        calls = num_evaluations(int(self.sc["steps"]), self.sc["solver"])  # a cluster router's cost is per call
        return flop_count.forward_flops(self.base.experts, self.base.router, self.shape, self.conditional, calls)

    def forward_per_call(self, strategy: str | None, experts_per_call: float | None = None) -> int:
        """Forward FLOPs of one model call (no guidance) of an ensemble strategy, or of one expert (None).

        ``experts_per_call``: the measured mean of a data-dependent strategy (None: its bound, K experts).
        """
        return flop_count.forward_per_call(self.forward, strategy, int(self.sc["top_k"]), experts_per_call)

    # ---- generated images ----------------------------------------------------------
    def generated(self, strategy: str) -> dict:
        """``eval.num_samples`` images of ``strategy``: from samples/ when it has them, else sampled now."""
        n = int(self.ec.num_samples)
        # a text run's samples/ are labelled by prompt, not class: its own prompts are sampled here
        reused = None if self.text else from_samples_stage(self.rd, strategy, n, self.sc, self.seed)
        if reused is not None:
            return reused
        labels = labels_to_sample(self.real_y, self.data_classes, n, self.seed)
        conditions, prompts = labels, None
        if self.text:
            prompts = self.heldout_text.prompts(labels, n)
            conditions = PromptBatches(self.heldout_text.encoder, prompts)  # encoded a batch at a time
        out = sample_now(
            self.ensemble(strategy),
            self.path,
            self.shape,
            labels,
            n,
            int(self.cfg.sample.batch_size),
            self.sc,
            self.seed,
            self.device,
            evaluation_dir(self.rd) / f"samples-{strategy}.npz",
            self.rd.root,
            decode=self.latents.decode if self.latents else None,
            conditions=conditions,
        )
        return out if prompts is None else dict(out, prompts=prompts)

    # ---- feature spaces ------------------------------------------------------------
    def feature_net(self):
        """``(net, info)``: the classifier feature net and its description (see ``classifier_info``)."""
        labelled = self.data_classes > 0 and (self.real_y >= 0).any()
        target = "class" if labelled else "cluster"
        num_classes = self.data_classes if labelled else int(self.info.num_experts)
        net = train_classifier(
            self.rd,
            self.ec.feature_net,
            self.heldout,
            self.excluded_from_training(),
            target,
            num_classes,
            self.image_channels,
            int(self.cfg.seed),
            self.device,
        )
        if target == "class":
            test_x, test_y = self.real_x, self.real_y
        else:
            clusters, _ = self.clusters()
            keep = clusters >= 0 if clusters is not None else np.zeros(len(self.real_x), bool)
            test_x, test_y = self.real_x[keep], (clusters[keep] if clusters is not None else np.zeros(0))
        return net, classifier_info(net, target, test_x, test_y, self.batch)

    def quality(self, extract, generated: dict, classify=None, reference_stats=None) -> dict:
        """FD, precision and recall of each strategy (and of training images) against held-out images
        (and, with ``reference_stats``, the FD against those statistics).

        ``generated`` maps strategies to ``generated(strategy)`` results; see
        ``ddm.eval.quality.sample_quality`` for what is returned.
        """
        idx = self.subset(self.ec.num_samples)
        reference, _, _ = load_images(self.rd.data, limit=len(idx), exclude=self.excluded_from_training())
        return sample_quality(
            extract,
            self.real_x[idx],
            self.real_y[idx],
            {s: (g["images"], g["labels"]) for s, g in generated.items()},
            reference,
            k=int(self.ec.prdc_k),
            per_class_min=int(self.ec.per_class_min),
            classify=classify,
            reference_stats=reference_stats,
        )

    # ---- flow-matching loss and router -------------------------------------------
    def fm_loss(self) -> dict:
        """metrics.json ``fm_loss`` of each ``eval.fm_loss.strategies`` ensemble and, with ``per_expert``, each expert.

        See ``ddm.eval.fm_loss.fm_loss_summary``; models are named ``ensemble-<strategy>`` and ``expert-KK``.
        """
        return self.fm_loss_of([str(s) for s in self.ec.fm_loss.strategies])

    def fm_loss_of(self, strategies: list[str], others: dict | None = None) -> dict:
        """``fm_loss`` of the ensembles of ``strategies``, each expert (``per_expert``), and ``others``
        (name: (model, forward FLOPs per call)), on the same images, t grid and noise."""
        fc = self.ec.fm_loss
        idx = self.subset(fc.num_samples)
        skipped = None
        if isinstance(self.base.router, ClusterRouter) and strategies:
            # it routes by the velocity of the call before on the same trajectory; the loss's batches of
            # unrelated images at one t are no trajectory, so its ensembles are not measured here
            skipped, strategies = [ensemble_name(s) for s in strategies], []
        models = {ensemble_name(s): (self.ensemble(s), self.forward_per_call(s)) for s in strategies}
        if fc.per_expert:
            cache = self.base.offload  # offloaded: each expert fetched to the device when called
            models.update(
                {
                    expert_job(k): (m if cache is None else FetchedExpert(cache, int(k)), self.forward[expert_job(k)])
                    for k, m in self.base.experts.items()
                }
            )
        models.update(others or {})
        out = fm_loss_summary(
            models,
            self.path,
            self.model_space(idx),
            self.labels_for_model(idx),
            fc.t_grid,
            self.seed,
            self.batch,
            self.device,
        )
        for s in (s for s in strategies if s in DATA_DEPENDENT):
            row = out["models"][ensemble_name(s)]  # its cost at the experts it ran on these images
            row["forward_flops_per_call"] = self.forward_per_call(s, row.get("experts_per_call"))
        if skipped:
            out["skipped"] = dict(models=skipped, why="sample.router=clusters routes along sampling trajectories")
        return out

    def router(self) -> dict:
        """metrics.json ``router``, or ``{skipped: why}`` when held-out images have no cluster::

        cluster_labels            assignments | nearest_centroid (how the images got their cluster)
        num_images, forward_flops_per_sample
        buckets                   [{t_lo, t_hi, n, accuracy, entropy, confidence, ece, nll,
                                    prior_accuracy, prior_entropy, max_entropy}]  (ddm.eval.router_diag)
        """
        if isinstance(self.base.router, ClusterRouter):
            return dict(skipped="sample.router=clusters: no trained router to diagnose")
        rc = self.ec.router
        clusters, how = self.clusters()
        if clusters is None:
            return dict(skipped=how)
        idx = self.subset(rc.num_samples)
        idx = idx[clusters[idx] >= 0]
        x0 = self.model_space(idx)
        rows = router_diagnostics(
            self.base.router,
            self.path,
            x0,
            self.labels_for_model(idx),
            torch.from_numpy(clusters[idx]),
            int(rc.t_buckets),
            self.seed,
            self.batch,
            int(rc.ece_bins),
            device=self.device,
        )
        return dict(
            cluster_labels=how, num_images=len(idx), buckets=rows, forward_flops_per_sample=self.forward[ROUTER_JOB]
        )
