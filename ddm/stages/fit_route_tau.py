"""Stage ``fit-route-tau``: the temperature of the router of the run's clusters (``sample.router=clusters``).

The cluster router's one parameter, tau, scales the distances from the embedding
of the x0 estimate to the centroids. Fitted here, it minimises the negative
log-likelihood of the true cluster of ``CALIBRATION_PER_CLUSTER`` (32) held-out
images per cluster, each noised to every time of the sampler but t = 1 and
denoised by the experts weighted by p(k | y), guided as the sampler guides
(``ddm.cluster_router.calibration`` says why not by the image's own expert). The images are the evaluation's held-out
set (``eval.heldout``), each given its cluster by the clustering's rule: the
job reads no island's partition, only the experts' ``expert.pt`` (which the
machine that samples holds anyway).

Writes ``router/route_tau.json`` (tau, the clustering's own ``2 * inertia /
dim`` beside it, the NLL of both on the calibration data, how many images of
each cluster, the times, and the clustering and the experts it was fitted for).
``ddm sample sample.router=clusters sample.route_tau=fitted`` reads it and
refuses it when the clustering or an expert has changed since. Done already:
the same settings, clustering and experts (``redo=true`` fits again).
"""

from __future__ import annotations

import logging
import time

import torch

from ddm.artifacts import RunDir
from ddm.cluster_router import CALIBRATION_PER_CLUSTER, fit_temperature
from ddm.cluster_router.calibration import calibration_indices, denoised_calibration
from ddm.cluster_router.temperature import temperature_nll
from ddm.devices import resolve_device
from ddm.errors import BadInput
from ddm.eval.heldout import load_images
from ddm.eval.run.clusters import cluster_labels
from ddm.eval.run.heldout import heldout_dir, prepare_heldout
from ddm.images import batch_to_model_space
from ddm.io import read_json, write_json
from ddm.latent.run_latents import run_latents
from ddm.sampling import load_ensemble
from ddm.sampling.ensemble_loading import DeferredDecode
from ddm.sampling.route_tau import tau_identity
from ddm.sampling.solvers import check_cfg_interval, evaluation_times, in_interval
from ddm.settings import Settings
from ddm.stages import StageResult

log = logging.getLogger("ddm")

SEPARABLE_NLL = 0.01  # nats: the calibration NLL the softest temperature keeps when the clusters separate cleanly


def fit_settings(cfg: Settings, rd: RunDir) -> dict:
    """What the fitted tau depends on: the sampler's times and guidance, the images, the clustering, the experts."""
    sc = cfg.sample
    interval = check_cfg_interval(sc.cfg_interval)
    return dict(
        per_cluster=CALIBRATION_PER_CLUSTER,
        steps=int(sc.steps),
        solver=str(sc.solver),
        cfg_scale=float(sc.cfg_scale),
        cfg_interval=None if interval is None else list(interval),
        seed=int(cfg.eval.seed),
        **tau_identity(rd),
    )


def run(cfg: Settings) -> dict:
    """Fit tau on the held-out images of every cluster; return ``router/route_tau.json``'s record."""
    rd = RunDir(cfg.run_dir)
    settings = fit_settings(cfg, rd)
    if rd.route_tau.exists() and not cfg.redo:
        done = read_json(rd.route_tau)
        if done.get("settings") == settings:
            log.info("fit-route-tau: done already (tau %.4g) -> %s", done["tau"], rd.route_tau)
            return StageResult(done, skipped=True)
    start = time.perf_counter()
    device = resolve_device(cfg.eval.device, "eval.device")
    decode = DeferredDecode()
    ensemble, path, info = load_ensemble(rd.root, router="clusters", seed=int(cfg.seed), decode=decode, device=device)
    if info.text:
        raise BadInput(
            "fit-route-tau fits on class-labelled or unlabelled images; a text run's cluster router takes the "
            "prior at t = 1 and tau from sample.route_tau=<number> or null (the clustering's own)"
        )
    latents = run_latents(cfg, info.latents, device)
    if latents:
        decode.fn = latents.decode  # the router embeds images, not latents
    router, K = ensemble.router, int(info.num_experts)
    prepare_heldout(cfg)
    real_x, real_y, keys = load_images(heldout_dir(rd))
    clusters, how = cluster_labels(rd, keys, real_x, int(cfg.seed))
    if clusters is None:
        raise BadInput(f"fit-route-tau: the held-out images have no cluster ({how})")
    picked = calibration_indices(clusters, K, CALIBRATION_PER_CLUSTER, settings["seed"])
    num_classes = int(info.num_classes)

    def condition(idx):
        if not num_classes:
            return None
        y = torch.from_numpy(real_y[idx]).to(device)
        return torch.where(y < 0, torch.full_like(y, num_classes), y)  # unlabelled: the null label

    images = {
        k: (latents.encode(real_x[idx]) if latents else batch_to_model_space(real_x[idx]).to(device), condition(idx))
        for k, idx in picked.items()
    }
    times = evaluation_times(path, settings["steps"], settings["solver"])[1:]  # t = 1: p(k | y) alone
    experts = {int(k): m for k, m in ensemble.experts.items()}
    interval = check_cfg_interval(settings["cfg_interval"])
    scales = [settings["cfg_scale"] if in_interval(t, interval) else None for t in times]  # as the sampler guides

    def prior(y, n):  # p(k | y): the router's posterior at t = 1, the weights of the experts' estimates
        return router.prior_logits(y, n, device).softmax(dim=-1)

    emb, own = denoised_calibration(
        experts, path, images, times, router.embed, scales, settings["seed"], int(cfg.eval.batch_size), prior
    )
    try:
        # when the likelihood alone classifies every calibration image (a clean split), the NLL falls as tau -> 0:
        # then the softest tau that still does so with a mean NLL of SEPARABLE_NLL nats
        tau = fit_temperature(emb, own, router.centroids, router.centroid_cluster, separable_nll=SEPARABLE_NLL)
    except BadInput as error:
        raise BadInput(
            f"fit-route-tau found no temperature on {len(own)} denoised held-out images: {error}. If the experts "
            f"are trained little, their x0 estimates may not tell the clusters apart; sample with "
            f"sample.route_tau=null (the clustering's own) or a number"
        ) from error
    own_tau = router.tau  # the clustering's 2 * inertia / dim (route_tau null)
    nearest_owner = router.centroid_cluster.cpu()[torch.cdist(emb, router.centroids.cpu()).argmin(1)]
    record = dict(
        tau=tau,
        clustering_tau=own_tau,
        nll=temperature_nll(emb, own, router.centroids, tau, router.centroid_cluster),
        # every estimate nearest a centroid of its own cluster: tau is the softest at SEPARABLE_NLL, not a minimum
        separable=bool((nearest_owner == own).all()),
        clustering_tau_nll=temperature_nll(emb, own, router.centroids, own_tau, router.centroid_cluster),
        images_per_cluster={str(k): len(idx) for k, idx in picked.items()},
        # its cost: K expert calls per image and time (doubled inside the guidance interval), and one encode each
        expert_calls=int(K * sum(len(i) for i in picked.values()) * sum(1 if s is None else 2 for s in scales)),
        times=[float(t) for t in times],
        cluster_labels=how,
        heldout_images=int(len(real_x)),
        settings=settings,
        wall_s=round(time.perf_counter() - start, 2),
        note="held-out images (eval.heldout) noised to the sampler's times and denoised by the experts weighted "
        "by p(k | y); no partition was read",
    )
    write_json(rd.route_tau, record)
    log.info(
        "fit-route-tau: tau %.4g (the clustering's %.4g; NLL %.4f against %.4f) on %d images x %d times -> %s",
        tau,
        own_tau,
        record["nll"],
        record["clustering_tau_nll"],
        int(sum(len(i) for i in picked.values())),
        len(times),
        rd.route_tau,
    )
    return StageResult(record)
