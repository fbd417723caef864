"""``sample.router=clusters``: sampling and evaluating with the run's clusters as the router (no router.pt)."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest
import torch

from ddm.errors import BadInput
from ddm.io import read_json, sha256_file, write_json
from ddm.sampling.draw import requested_settings
from ddm.stages import sample as sample_stage

CLUSTERS = ("sample.router=clusters", "sample.strategy=sample")


def without_router(tiny_run, dest):
    """A copy of the tiny run whose router/ is gone: the cluster router must not need it."""
    run = tiny_run.copy(dest)
    shutil.rmtree(run.rd.router)
    return run


def test_cluster_routing_samples_without_a_router_file(tiny_run, tmp_path):
    run = without_router(tiny_run, tmp_path / "run")
    record = sample_stage.run(run.settings(*CLUSTERS, "sample.num_samples=6"))

    assert record["settings"]["router"] == "clusters" and record["settings"]["strategy"] == "sample"
    assert "route_every" not in record["settings"] and "route_tau" not in record["settings"]  # at their defaults
    assert "router" not in record["models"]  # no router.pt, so no router weights to name
    assert read_json(run.rd.samples_record)["settings"] == record["settings"]
    npz = np.load(run.rd.samples / "samples.npz")
    assert len(npz["images"]) == record["num_images"] > 6
    usage = read_json(run.rd.samples / "usage.json")
    # strategy=sample: every sample to exactly one expert at every call
    assert all(sum(r["counts"]) == record["num_images"] for r in usage)
    assert record["clustering_id"] == read_json(run.rd.cluster_report)["clustering_id"]

    # the same settings again: done already; another route_every samples again and records it
    assert sample_stage.run(run.settings(*CLUSTERS, "sample.num_samples=6")).skipped
    again = sample_stage.run(run.settings(*CLUSTERS, "sample.num_samples=6", "sample.route_every=2"))
    assert not getattr(again, "skipped", False) and again["settings"]["route_every"] == 2


def test_the_trained_router_is_as_before(tiny_run, tmp_path):
    # the finished run's records stay valid: the default settings hold none of the new keys
    settings = requested_settings(tiny_run.settings().sample)
    assert not {"router", "route_every", "route_tau"} & set(settings)
    assert read_json(tiny_run.rd.samples_record)["settings"] == settings
    run = tiny_run.copy(tmp_path / "run")
    assert sample_stage.run(run.settings()).skipped
    record = sample_stage.run(run.settings("sample.strategy=sample", "sample.router=trained"))
    assert "router" not in record["settings"] and "router" in record["models"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("sample.router=learned", "sample.router"),
        ("sample.route_every=0", "sample.route_every"),
        ("sample.route_tau=-1.0", "sample.route_tau"),
    ],
)
def test_a_bad_router_setting_is_refused_naming_the_key(tiny_run, tmp_path, override, key):
    with pytest.raises(BadInput, match=re.escape(key)):
        requested_settings(tiny_run.settings(override).sample)
    run = tiny_run.copy(tmp_path / "run")
    with pytest.raises(BadInput, match=re.escape(key)):
        sample_stage.run(run.settings(override, "sample.strategy=sample"))


def test_cluster_routing_with_another_strategy_warns_why(tiny_run, caplog):
    with caplog.at_level(logging.WARNING, logger="ddm"):
        requested_settings(tiny_run.settings("sample.router=clusters", "sample.strategy=top1").sample)
    assert "strategy=sample" in caplog.text and "top1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddm"):
        requested_settings(tiny_run.settings(*CLUSTERS).sample)
    assert "sample.router=clusters" not in caplog.text


def test_an_expert_of_another_clustering_is_refused_naming_its_file(tiny_run, tmp_path):
    run = without_router(tiny_run, tmp_path / "run")
    weights = run.rd.expert_weights(1)
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    payload["clustering_id"] = "another-clustering"
    torch.save(payload, weights)
    record = read_json(run.rd.expert_record(1))
    write_json(run.rd.expert_record(1), dict(record, weights_sha256=sha256_file(weights)))  # the file itself is whole
    with pytest.raises(BadInput, match=re.escape(str(weights))):
        sample_stage.run(run.settings(*CLUSTERS))


def test_evaluate_counts_the_encoder_and_skips_the_router_diagnostics(tiny_run, tmp_path):
    from ddm.cluster_router import EncoderAsModel, ModelSpaceEmbedder, router_flops_per_call, run_embedder
    from ddm.eval.flops import model_forward_flops
    from ddm.sampling import num_evaluations
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import OVERRIDES, eval_group

    run = without_router(tiny_run, tmp_path / "run")
    fast = [o for o in OVERRIDES if not o.startswith("eval.strategies=")]
    cfg = run.settings(
        *eval_group(),
        f"eval.feature_net.cache_dir={tmp_path / 'cache'}",
        *fast,
        *CLUSTERS,
        "eval.num_samples=20",
        "eval.strategies=[sample]",
        "eval.fm_loss.strategies=[sample]",
        "eval.fm_loss.per_expert=false",
        "eval.flops.measure_images=0",
    )
    metrics = evaluate.run(cfg)

    assert metrics["router"] == dict(skipped="sample.router=clusters: no trained router to diagnose")
    # its ensembles' flow-matching loss needs trajectories, which the loss's batches are not
    assert metrics["fm_loss"]["skipped"]["models"] == ["ensemble-sample"] and not metrics["fm_loss"]["models"]
    forward = metrics["flops"]["forward_per_sample"]
    embed = run_embedder(run.rd.root, int(cfg.seed))
    assert isinstance(embed, ModelSpaceEmbedder)
    shape = tuple(metrics["run"]["image_shape"])
    encoder = model_forward_flops(EncoderAsModel(embed), shape, conditional=False)
    centroids = np.load(run.rd.fine_centroids if run.rd.fine_centroids.exists() else run.rd.centroids)
    calls = num_evaluations(int(cfg.sample.steps), cfg.sample.solver)
    want = router_flops_per_call(encoder, centroids.shape[0], centroids.shape[1], calls, 1)
    assert forward["router"] == int(round(want)) > 0
    assert forward["router"] < forward["expert-00"]  # the distances (and the encoder) cost less than an expert
    assert metrics["flops"]["sampling"]["sample"]["per_image"] > 0


def test_load_ensemble_builds_the_cluster_router_from_the_run(tiny_run, tmp_path):
    from ddm.cluster_router import ClusterRouter
    from ddm.sampling import load_ensemble

    run = without_router(tiny_run, tmp_path / "run")
    ensemble, _, info = load_ensemble(run.rd.root, strategy="sample", router="clusters", route_every=3, route_tau=0.5)
    report = read_json(run.rd.cluster_report)
    assert isinstance(ensemble.router, ClusterRouter) and ensemble.router.every == 3 and ensemble.router.tau == 0.5
    assert info.num_experts == ensemble.router.num_outputs == int(report["k"])
    assert info.clustering_id == report["clustering_id"] and info.router_steps is None
    assert info.router_label_dropout is None and info.experts == list(range(int(report["k"])))
    x = torch.randn(4, info.in_channels, info.image_size, info.image_size)
    v = ensemble(x, torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(FileNotFoundError, match="train-router"):  # the trained router still needs its file
        load_ensemble(run.rd.root)
