"""The router that needs no training: class composition at t = 1, the embedding of the ensemble's x0 estimate
later, the hook that feeds it, its temperature and where it reads a run's clusters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ddm.cluster_router import (
    ClusterRouter,
    EncoderAsModel,
    ModelSpaceEmbedder,
    class_composition,
    denoised_embeddings,
    fit_temperature,
    report_temperature,
    router_flops_per_call,
    routing_calls,
)
from ddm.ensemble import Ensemble
from ddm.errors import BadInput, MissingInput
from ddm.eval.flops import measured_sampling_flops, model_forward_flops, sampling_flops_per_image
from ddm.flow import FlowPath
from ddm.sampling import sample
from tests.test_gaussian_mixture import CLUSTER_WEIGHTS, CLUSTERS, MixtureFlow, MixtureRouter
from tests.test_offload import AffineExpert

COUNTS = [[30, 0, 10, 60], [5, 5, 5, 5], [0, 0, 0, 0]]  # class 2 has no image: it gets the prior
SIZES = [35, 5, 15, 65]


def identity(x):
    return x.flatten(1)


def router(**kw) -> ClusterRouter:
    args = dict(embed=identity, path=FlowPath(), tau=1.0, class_counts=COUNTS)
    args.update(kw)
    return ClusterRouter(SIZES, torch.eye(4), **args)


# ---- 1. the first call: log p(k | y) ---------------------------------------------------------------------------
def test_the_first_call_is_the_class_composition_and_the_null_label_the_prior():
    r = router()
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])  # 3 is the null label (num_classes)
    logits = r(x, torch.ones(5), y)
    composition = torch.tensor(COUNTS[0]) / 100.0, torch.full((4,), 0.25)
    prior = torch.tensor(SIZES) / 120.0
    want = torch.stack([composition[0], composition[1], prior, prior, composition[0]])
    torch.testing.assert_close(logits.exp(), want.float(), rtol=1e-6, atol=0)
    assert logits[0, 1] == -math.inf  # no image of class 0 in cluster 1: never routed there
    torch.testing.assert_close(logits.softmax(-1), want.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(r(x, torch.ones(5), None).exp(), prior.expand(5, -1).float(), rtol=1e-6, atol=0)
    assert r.encoder_calls == 0


def test_an_unconditional_router_gives_the_prior_to_every_label():
    r = router(class_counts=None)
    logits = r(torch.randn(3, 4), torch.ones(3), torch.tensor([0, 1, 7]))
    torch.testing.assert_close(logits.exp(), (torch.tensor(SIZES) / 120.0).expand(3, -1).float(), rtol=1e-6, atol=0)
    assert r.num_classes == 0


def test_class_composition_table():
    table = class_composition(COUNTS, SIZES)
    assert table.shape == (4, 4)
    assert torch.equal(table[0], torch.tensor([0.3, 0.0, 0.1, 0.6], dtype=torch.float64))
    assert torch.equal(table[2], table[3]) and torch.equal(table[3], torch.tensor(SIZES, dtype=torch.float64) / 120)


# ---- 2. later calls: the embedding of an exact x0 estimate -----------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_an_exact_x0_estimate_is_routed_to_its_component(schedule):
    g = torch.Generator().manual_seed(0)
    D, N = 8, 300
    means = 4 * torch.randn(3, D, generator=g)
    comp = torch.arange(N) % 3
    x0 = means[comp] + 0.5 * torch.randn(N, D, generator=g)
    path = FlowPath(schedule)
    r = ClusterRouter([1, 1, 1], means, embed=identity, path=path, tau=0.5)

    x1 = torch.randn(N, D, generator=g)
    first = r(x1, torch.ones(N))
    torch.testing.assert_close(first.exp(), torch.full((N, 3), 1 / 3))  # t = 1: the prior
    assert r.encoder_calls == 0
    for t_obs, t_next in [(1.0, 0.9), (0.5, 0.3), (0.1, 0.05)]:
        t = torch.full((N,), t_obs)
        eps = torch.randn(N, D, generator=g)
        x_t = path.interpolate(x0, eps, t)
        r.observe(x_t, t, None, path.velocity(x0, eps, t))  # the true velocity: x0_hat is x0
        torch.testing.assert_close(r._x0, x0, rtol=1e-4, atol=1e-4)
        logits = r(path.interpolate(x0, eps, torch.full((N,), t_next)), torch.full((N,), t_next))
        assert (logits.argmax(1) == comp).float().mean() == 1.0
    assert r.encoder_calls == 3
    # a new trajectory (t = 1 again) starts from the prior, whatever it observed
    torch.testing.assert_close(r(x1, torch.ones(N)).exp(), torch.full((N, 3), 1 / 3))


def test_fine_centroids_route_to_their_cluster():
    # two-stage clustering: the mixture's components are the fine centroids, its clusters the coarse ones
    g = torch.Generator().manual_seed(1)
    means = torch.tensor([m for comps in CLUSTERS for m, _, _ in comps])
    stds = torch.tensor([s for comps in CLUSTERS for _, s, _ in comps])
    owner = torch.tensor([k for k, comps in enumerate(CLUSTERS) for _ in comps])
    pick = torch.randint(len(means), (600,), generator=g)
    x0 = means[pick] + stds[pick, None] * torch.randn(600, 2, generator=g)
    path = FlowPath()
    r = ClusterRouter([500, 300, 200], means, owner, embed=identity, path=path, tau=0.5)
    eps = torch.randn(600, 2, generator=g)
    r(eps, torch.ones(600))
    r.observe(eps, torch.ones(600), None, path.velocity(x0, eps, torch.ones(600)))
    logits = r(eps, torch.full((600,), 0.9))
    assert (logits.argmax(1) == owner[pick]).float().mean() >= 0.99


def test_log_likelihood_is_the_mean_over_the_clusters_centroids():
    centroids = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    r = ClusterRouter([1, 1], centroids, [0, 0, 0, 1], embed=identity, path=FlowPath(), tau=2.0)
    lik = r.log_likelihood(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(lik, torch.tensor([[-1 / 2.0, -4 / 2.0]]))  # three equal centroids: no log 3 bonus


# ---- 3. inside an Ensemble ----------------------------------------------------------------------------------------
class CountingEmbed:
    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.flatten(1)


def mixture_ensemble(strategy="sample", every=1, schedule="linear", tau=0.5):
    path = FlowPath(schedule)
    means = torch.tensor([m for comps in CLUSTERS for m, _, _ in comps])
    owner = [k for k, comps in enumerate(CLUSTERS) for _ in comps]
    embed = CountingEmbed()
    r = ClusterRouter([1000 * w for w in CLUSTER_WEIGHTS], means, owner, embed=embed, path=path, tau=tau, every=every)
    experts = [MixtureFlow(path, comps) for comps in CLUSTERS]
    return path, Ensemble(experts, r, strategy, generator=torch.Generator().manual_seed(1)), embed


def nearest_cluster(x):
    centres = torch.tensor([[sum(w * m[d] for m, _, w in comps) for d in range(2)] for comps in CLUSTERS])
    return torch.cdist(x.float(), centres).argmin(1)


@pytest.mark.parametrize("schedule,solver", [("linear", "euler"), ("cosine", "heun")])
def test_sampling_one_expert_drawn_at_t1_reproduces_the_mixture(schedule, solver):
    # strategy=sample draws p(k) at t = 1, then the x0 estimate keeps each sample with its expert: ancestral sampling
    # of the mixture, exact with exact experts. A wrong x0 estimate switches experts and lands samples between.
    path, ens, _ = mixture_ensemble("sample", schedule=schedule)
    N = 2000
    x1 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sample(ens, path, x1.shape, steps=20, solver=solver, x_init=x1)
    first = ens.usage[0]["counts"]
    assert all(rec["counts"] == first for rec in ens.usage)  # no sample ever changes expert
    share = torch.bincount(nearest_cluster(out), minlength=3).double() / N
    assert torch.allclose(share, torch.tensor(CLUSTER_WEIGHTS, dtype=torch.float64), atol=0.03)
    assert torch.equal(torch.bincount(nearest_cluster(out), minlength=3), torch.tensor(first))


def test_a_schedule_that_draws_at_t1_then_takes_the_top_cluster_keeps_the_mixture():
    """sample:0.5:top1: drawn from p(k) at t = 1, then top-1 of the x0 estimate's likelihood; the exact experts'
    estimates stay in their own cluster, so top-1 keeps every sample's expert and the shares stay the mixture's."""
    path, ens, _ = mixture_ensemble("sample:0.5:top1")
    N = 2000
    x1 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sample(ens, path, x1.shape, steps=20, x_init=x1)
    first = ens.usage[0]["counts"]
    assert all(rec["counts"] == first for rec in ens.usage)
    share = torch.bincount(nearest_cluster(out), minlength=3).double() / N
    assert torch.allclose(share, torch.tensor(CLUSTER_WEIGHTS, dtype=torch.float64), atol=0.03)
    # top-1 from t = 1 instead: every sample in the most probable cluster (the collapse the schedule avoids)
    path, ens, _ = mixture_ensemble("top1")
    sample(ens, path, x1.shape, steps=20, x_init=x1)
    assert max(ens.usage[0]["counts"]) == N


def test_the_hook_is_called_once_per_model_call_and_every_n_calls_the_encoder_n_times_fewer():
    N, steps = 64, 7
    encoder = {}
    for every in (1, 2, 3):
        path, ens, embed = mixture_ensemble("top1", every=every)
        seen = []
        ens.router.observe = _recording(ens.router.observe, seen)
        x1 = torch.randn(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        sample(ens, path, x1.shape, steps=steps, x_init=x1)
        assert len(seen) == len(ens.usage) == steps
        assert embed.calls == ens.router.encoder_calls == routing_calls(steps, every)
        encoder[every] = embed.calls
        sample(ens, path, x1.shape, steps=steps, x_init=x1)  # a second trajectory starts again from the prior
        assert embed.calls == 2 * encoder[every]
    assert encoder == {1: 6, 2: 3, 3: 2}


def _recording(observe, seen):
    def recorded(x, t, y, v):
        seen.append(t)
        observe(x, t, y, v)

    return recorded


@pytest.mark.parametrize("cfg_routing,solver", [("shared", "euler"), ("separate", "heun")])
def test_class_conditional_guided_sampling_runs_end_to_end(cfg_routing, solver):
    K, C, B, D = 4, 3, 12, 5
    counts = [[10, 0, 0, 0], [0, 5, 5, 0], [1, 1, 1, 7]]
    g = torch.Generator().manual_seed(0)
    r = ClusterRouter(
        [11, 6, 6, 7],
        torch.randn(6, D, generator=g),
        [0, 1, 2, 3, 3, 0],
        embed=CountingEmbed(),
        path=FlowPath(),
        tau=1.0,
        class_counts=counts,
    )
    ens = Ensemble([AffineExpert(10 + k) for k in range(K)], r, "top1", cfg_routing=cfg_routing)
    y = torch.arange(B) % C
    x1 = torch.randn(B, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = sample(ens, FlowPath(), x1.shape, y=y, steps=5, solver=solver, cfg_scale=2.0, x_init=x1)
    assert torch.isfinite(out).all()
    calls = 5 if solver == "euler" else 9
    assert len(ens.usage) == calls and r.embed.calls == calls - 1
    # the first call: each class to the cluster holding most of it (class 1's tie: the lower id)
    assert ens.usage[0]["counts"] == [4, 4, 0, 4]
    if cfg_routing == "separate":  # the null rows: the prior's largest cluster
        assert ens.usage[0]["uncond_counts"] == [B, 0, 0, 0]


def test_the_trained_router_path_is_unchanged_by_the_hook():
    # a router without observe: Ensemble behaves as before (its own tests cover it in full)
    path = FlowPath()
    ens = Ensemble(
        [MixtureFlow(path, c) for c in CLUSTERS],
        MixtureRouter([MixtureFlow(path, c) for c in CLUSTERS], CLUSTER_WEIGHTS),
        "full",
    )
    assert getattr(ens.router, "observe", None) is None
    x = torch.randn(4, 2, dtype=torch.float64)
    ens(x, torch.full((4,), 0.5))


# ---- 4. temperature, FLOPs, the run's files --------------------------------------------------------------------
def test_fit_temperature_has_the_closed_form_answer():
    # 1-D, centroids -1 and +1: the logit difference at e is 4 e / tau. Points at +a labelled +1 with probability
    # p (and mirrored) are fitted best when sigmoid(4 a / tau) = p: tau = 4 a / logit(p).
    a, p = 0.5, 0.8
    e = torch.tensor([[a]] * 10 + [[-a]] * 10)
    labels = [1] * 8 + [0] * 2 + [0] * 8 + [1] * 2
    tau = fit_temperature(e, labels, torch.tensor([[-1.0], [1.0]]))
    assert tau == pytest.approx(4 * a / math.log(p / (1 - p)), rel=1e-6)


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(12, 4, generator=g)
    owner = torch.arange(12) % 3  # three clusters of four fine centroids
    e = torch.randn(6000, 4, generator=g) * 1.5
    r = ClusterRouter([1, 1, 1], centroids, owner, embed=identity, path=FlowPath(), tau=0.7)
    labels = torch.multinomial(r.log_likelihood(e).softmax(-1), 1, generator=g).squeeze(1)
    assert fit_temperature(e, labels, centroids, owner) == pytest.approx(0.7, rel=0.05)


def test_fit_temperature_refuses_clean_images_labelled_by_their_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(3, 4, generator=g)
    e = torch.randn(200, 4, generator=g)
    nearest = torch.cdist(e, centroids).argmin(1)
    with pytest.raises(BadInput, match="tau goes to 0"):
        fit_temperature(e, nearest, centroids)


def test_a_cleanly_separated_fit_gives_the_softest_temperature_at_the_target_nll():
    """Every embedding nearest its own centroid: the NLL falls as tau -> 0, so the fit returns the largest tau whose
    mean NLL is the target (and refuses without one)."""
    from ddm.cluster_router.temperature import temperature_nll

    torch.manual_seed(0)
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    clusters = torch.arange(3).repeat(20)
    e = centroids[clusters] + 0.5 * torch.randn(60, 2)
    assert (torch.cdist(e, centroids).argmin(1) == clusters).all()
    with pytest.raises(BadInput, match="keeps falling as tau goes to 0"):
        fit_temperature(e, clusters, centroids)
    tau = fit_temperature(e, clusters, centroids, separable_nll=0.01)
    assert temperature_nll(e, clusters, centroids, tau) == pytest.approx(0.01, abs=1e-6)
    assert temperature_nll(e, clusters, centroids, tau * 1.1) > 0.01


def test_denoised_embeddings_of_the_exact_flow_fit_a_finite_temperature():
    path = FlowPath()
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([m for comps in CLUSTERS for m, _, _ in comps], dtype=torch.float64)
    owner = torch.tensor([k for k, comps in enumerate(CLUSTERS) for _ in comps])
    exact = MixtureFlow(path, [(m, s, pi * w) for pi, comps in zip(CLUSTER_WEIGHTS, CLUSTERS) for m, s, w in comps])
    k = torch.arange(96) % 3  # 32 per cluster, drawn from its components
    comps = [torch.tensor([m for m, _, _ in CLUSTERS[j]], dtype=torch.float64) for j in range(3)]
    x0 = torch.stack([comps[j][i % len(comps[j])] for i, j in enumerate(k.tolist())])
    x0 = x0 + 0.4 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    e = denoised_embeddings(exact, path, x0, torch.full((96,), 0.8), identity, generator=g)
    tau = fit_temperature(e, k, means, owner)
    assert 0 < tau < math.inf


def test_report_temperature_and_flops():
    assert report_temperature(dict(inertia=0.3, fine_inertia=0.1), 10) == pytest.approx(0.02)
    assert report_temperature(dict(inertia=0.3, fine_inertia=None), 10) == pytest.approx(0.06)
    w = torch.randn(3 * 4 * 4, 7)
    assert model_forward_flops(EncoderAsModel(lambda x: x.flatten(1) @ w), (3, 4, 4), conditional=False) == 2 * 48 * 7
    assert [routing_calls(c, 1) for c in (0, 1, 2, 7)] == [0, 0, 1, 6]
    assert routing_calls(7, 2) == 3 and routing_calls(9, 3) == 3


@pytest.mark.parametrize("every,cfg_routing", [(1, "shared"), (2, "separate")])
def test_the_router_flops_formula_matches_a_counted_sampling_run(every, cfg_routing):
    # the affine experts cost no counted FLOPs (elementwise only): what the counter sees is the router's
    K, D, E, M, steps = 4, 5, 6, 7, 5
    w = torch.randn(D, E)
    embed = lambda x: x @ w  # noqa: E731
    r = ClusterRouter(
        [1] * K,
        torch.randn(M, E),
        [k % K for k in range(M)],
        embed=embed,
        path=FlowPath(),
        tau=1.0,
        every=every,
        class_counts=[[1, 1, 1, 1]] * 3,
    )
    ens = Ensemble([AffineExpert(10 + k) for k in range(K)], r, "top1", cfg_routing=cfg_routing)
    y = torch.arange(6) % 3
    counted = measured_sampling_flops(ens, FlowPath(), (D,), y, steps, cfg_scale=2.0)
    enc = model_forward_flops(EncoderAsModel(embed), (D,), conditional=False)
    assert enc == 2 * D * E
    per_call = router_flops_per_call(enc, M, E, steps, every)
    assert counted == pytest.approx(steps * per_call)
    assert counted > 0
    # the sampling FLOP formula (experts: 0 counted FLOPs) charges it once per call, separate guidance routing too
    formula = sampling_flops_per_image(
        0, per_call, "top1", steps, cfg_scale=2.0, cfg_routing=cfg_routing, router_once=True
    )
    assert formula["per_image"] == pytest.approx(counted, abs=1)


def test_model_space_embedder_feeds_the_encoder_8_bit_images_as_the_embed_stage_did():
    from ddm.embed import PixelEncoder
    from ddm.images import to_uint8

    encoder = PixelEncoder(channels=3, size=4)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    got = ModelSpaceEmbedder(encoder, stored_dtype="float16")(x)
    want = encoder(to_uint8(x)).astype(np.float16).astype(np.float32)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)


def _fake_run(tmp_path, two_stage=True, counts=True):
    clusters = tmp_path / "clusters"
    clusters.mkdir(parents=True)
    report = dict(method="two_stage" if two_stage else "flat", k=2, sizes=[6, 4], inertia=0.6, clustering_id="abc")
    report["fine_inertia"] = 0.3 if two_stage else None
    (clusters / "report.json").write_text(json.dumps(report))
    if two_stage:
        np.save(clusters / "fine_centroids.npy", np.eye(3, dtype=np.float32))
        np.save(clusters / "fine_to_coarse.npy", np.array([0, 1, 1], dtype=np.int32))
    else:
        np.save(clusters / "centroids.npy", np.eye(2, 3, dtype=np.float32))
    for k, cc in enumerate([{"0": 5, "1": 1, "-1": 9}, {"1": 4}]):
        folder = tmp_path / "partitions" / f"cluster-{k:02d}"
        folder.mkdir(parents=True)
        manifest = dict(shards=[], num_samples=sum(cc.values()), clustering_id="abc")
        if counts:
            manifest["class_counts"] = cc
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.mark.parametrize("two_stage", [True, False])
def test_from_run_reads_the_composition_and_the_centroids(tmp_path, two_stage):
    run = _fake_run(tmp_path, two_stage)
    r = ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)
    want = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4]])  # label -1 (no label) left out
    torch.testing.assert_close(r.log_composition.exp(), want)
    assert len(r.centroids) == (3 if two_stage else 2)
    assert r.tau == pytest.approx(2 * (0.3 if two_stage else 0.6) / 3)  # the fine centroids' spread when two-stage
    assert ClusterRouter.from_run(run, identity, FlowPath(), num_classes=0, tau=0.3).num_classes == 0


def test_from_run_names_what_is_missing_and_what_to_run(tmp_path):
    with pytest.raises(MissingInput, match=r"clusters/report.json.*ddm cluster"):
        ClusterRouter.from_run(tmp_path, identity, FlowPath(), num_classes=2)
    run = _fake_run(tmp_path / "a")
    (run / "clusters" / "fine_to_coarse.npy").unlink()
    with pytest.raises(MissingInput, match=r"fine_to_coarse.npy.*ddm cluster"):
        ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)
    run = _fake_run(tmp_path / "b")
    (run / "partitions" / "cluster-01" / "manifest.json").unlink()
    with pytest.raises(MissingInput, match=r"cluster-01/manifest.json.*ddm partition"):
        ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)
    ClusterRouter.from_run(run, identity, FlowPath(), num_classes=0)  # unconditional: no partition needed
    run = _fake_run(tmp_path / "c", counts=False)
    with pytest.raises(MissingInput, match="class_counts"):
        ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)
    run = _fake_run(tmp_path / "d")
    report = json.loads((run / "clusters" / "report.json").read_text())
    (run / "clusters" / "report.json").write_text(json.dumps(dict(report, clustering_id="new")))
    with pytest.raises(BadInput, match="ddm partition"):
        ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)
    (run / "clusters" / "report.json").write_text(json.dumps(dict(report, method="random")))
    with pytest.raises(BadInput, match="random partition"):
        ClusterRouter.from_run(run, identity, FlowPath(), num_classes=2)


def test_bad_arguments_are_refused():
    with pytest.raises(BadInput, match="tau"):
        router(tau=0.0)
    with pytest.raises(BadInput, match="route_every"):
        router(every=0)
    with pytest.raises(BadInput, match="no centroid"):
        ClusterRouter([1, 1, 1], torch.eye(2), [0, 0], embed=identity, path=FlowPath(), tau=1.0)
    r = router()
    r(torch.randn(2, 4), torch.ones(2))
    r.observe(torch.randn(2, 4), torch.ones(2), None, torch.randn(2, 4))
    with pytest.raises(BadInput, match="encoder the run clustered with"):
        r.log_likelihood(torch.randn(2, 5))


def test_a_finished_run_routes_its_own_images_to_their_clusters_and_samples(tiny_run):
    # the run's encoder through model space gives the embed stage's rows, so an exact x0 estimate of a training
    # image goes to the cluster the clustering gave it; and the run's experts sample with the router end to end
    from ddm.cluster import load_assignments
    from ddm.cluster_router import run_embedder
    from ddm.eval.heldout import load_images
    from ddm.images import batch_to_model_space
    from ddm.sampling.draw import rerouted
    from ddm.sampling.ensemble_loading import load_ensemble

    rd, cfg = tiny_run.rd, tiny_run.settings()
    images, labels, keys = load_images(rd.data, limit=200)
    x0 = batch_to_model_space(images)
    ens, path, info = load_ensemble(rd.root)
    embed = run_embedder(rd.root, int(cfg.seed))
    r = ClusterRouter.from_run(rd.root, embed, path, num_classes=info.num_classes)
    assert r.num_outputs == info.num_experts and r.num_classes == info.num_classes
    n = len(x0)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    r(eps, torch.ones(n), torch.as_tensor(labels))
    r.observe(eps, torch.ones(n), None, path.velocity(x0, eps, torch.ones(n)))
    logits = r(eps, torch.full((n,), 0.5), torch.as_tensor(labels))
    known = load_assignments(rd.assignments).cluster_of()
    want = torch.tensor([known[k] for k in keys])
    assert (logits.argmax(1) == want).float().mean() >= 0.95  # the class composition may outweigh a close call

    ens = rerouted(ens, strategy="sample", generator=torch.Generator().manual_seed(0))
    ens.router = r
    y = torch.arange(8) % info.num_classes
    shape = (8, info.in_channels, info.image_size, info.image_size)
    before = r.encoder_calls
    out = sample(ens, path, shape, y=y, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all() and len(ens.usage) == 4 and r.encoder_calls - before == 3
