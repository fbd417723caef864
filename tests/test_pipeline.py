"""End to end: the tiny experiment through every stage, from the library and from the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.io import read_json
from ddm.stages import pipeline

STAGE_OUTPUTS = (
    "data/manifest.json",
    "embeddings/manifest.json",
    "clusters/report.json",
    "partitions/manifest.json",
    "experts/expert-00/record.json",
    "experts/expert-01/record.json",
    "router/record.json",
    "samples/record.json",
    "samples/grid.png",
    "samples/usage.png",
    "montage.png",
    "report.md",
    "timings/prepare.json",
    "experts/expert-01/timing.json",
)


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """The shared finished tiny run (tests/conftest.py): its settings and folder."""
    return tiny_run.settings(), tiny_run.rd


def test_every_stage_leaves_its_artefact(tiny):
    _, rd = tiny
    for rel in STAGE_OUTPUTS:
        assert (rd.root / rel).exists(), rel


def test_partitions_hold_exactly_the_assigned_keys(tiny):
    _, rd = tiny
    assignments = np.load(rd.assignments)
    data_keys = [s["key"] for s in iter_samples(shard_paths(rd.data), decode=False)]
    assert list(assignments["keys"]) == data_keys
    seen = []
    for k in range(2):
        keys = [s["key"] for s in iter_samples(shard_paths(rd.partition(k)), decode=False)]
        assert set(keys) == {key for key, c in zip(assignments["keys"], assignments["cluster"]) if c == k}
        seen += keys
    assert sorted(seen) == sorted(data_keys)  # each sample in exactly one partition


def test_every_artefact_records_the_same_clustering(tiny):
    _, rd = tiny
    cid = read_json(rd.cluster_report)["clustering_id"]
    assert all(load_manifest(rd.partition(k))["clustering_id"] == cid for k in range(2))
    assert all(read_json(rd.expert_record(k))["clustering_id"] == cid for k in range(2))
    assert read_json(rd.router_record)["clustering_id"] == cid
    assert read_json(rd.samples_record)["clustering_id"] == cid


def test_samples_grid_has_one_row_per_class_and_usage_per_step(tiny):
    cfg, rd = tiny
    npz = np.load(rd.samples / "samples.npz")
    assert npz["images"].shape[1:] == (8, 8) and npz["images"].dtype == np.uint8
    assert list(npz["labels"][:20]) == [c for c in range(10) for _ in range(2)]
    usage = read_json(rd.samples / "usage.json")
    usage = usage["records"] if isinstance(usage, dict) else usage
    assert len(usage) == cfg.sample.steps  # euler: one routed model call per step
    assert all(sum(u["counts"]) == 20 for u in usage)


def test_report_names_each_part(tiny):
    _, rd = tiny
    text = rd.report.read_text()
    for heading in ("## Clusters", "## Experts", "## Router", "## Samples", "## Wall time"):
        assert heading in text
    assert "| 0.9-1.0 |" in text  # router accuracy by t, ten buckets
    # the sampling settings, read back from samples/record.json (stored once, under "settings")
    shown = "Settings: strategy=top1, experts=None, solver=euler, steps=4, cfg_scale=2.0, cfg_routing=shared, seed=0."
    assert shown in text


def test_rerun_skips_every_stage(tiny):
    cfg, rd = tiny
    watched = [rd.data_manifest, rd.cluster_report, rd.expert_weights(0), rd.router_weights, rd.samples_record]
    before = [p.stat().st_mtime_ns for p in watched]
    pipeline.run(cfg)
    assert [p.stat().st_mtime_ns for p in watched] == before


def _ddm(*args, cwd):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "ddm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_runs_a_stage_alone(tmp_path):
    out = _ddm("prepare", "data=digits", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert read_json(tmp_path / "r" / "data" / "manifest.json")["num_samples"] == 1797
    assert read_json(tmp_path / "r" / "timings" / "prepare.json")["wall_s"] > 0


def test_cli_rejects_a_config_key_that_does_not_exist(tmp_path):
    out = _ddm("prepare", "data=digits", "expert.stepz=3", f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode != 0
    assert "stepz" in out.stderr
    assert not (tmp_path / "r" / "data").exists()


def test_cli_rejects_an_unknown_stage(tmp_path):
    out = _ddm("trian-expert", cwd=tmp_path)
    assert out.returncode == 2 and "unknown stage 'trian-expert'" in out.stderr


def test_a_library_user_needs_no_config(tiny):
    """A notebook can load the experts and the ensemble with plain torch."""
    _, rd = tiny
    from ddm.sampling.ensemble_loading import load_ensemble
    from ddm.sampling.solvers import sample

    ensemble, path, _ = load_ensemble(rd.root, strategy="topk", top_k=2)
    x = sample(
        ensemble, path, (3, 1, 8, 8), y=torch.tensor([0, 1, 2]), steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_the_pipeline_ends_with_where_the_grid_is_and_how_good_it_is(tmp_path):
    rd = RunDir(tmp_path / "run")
    text = pipeline.headline(rd, None, "name=demo")
    assert str(rd.samples / "grid.png") in text and "`ddm evaluate name=demo`" in text
    metrics = {
        "feature_spaces": {
            "classifier:abc": {
                "strategies": {"top1": dict(num_generated=500, fd=12.345, classifier_accuracy=0.8766)},
            },
            "inception:def": {"strategies": {"top1": dict(num_generated=500, fd=99.0)}},
        }
    }
    text = pipeline.headline(rd, metrics, "name=demo").splitlines()[1]
    assert text.startswith("quality (top1, 500 samples, classifier:abc): FD 12.35")
    assert "the requested class 87.7% of the time" in text and str(rd.evaluation_metrics) in text
    unlabelled = {"feature_spaces": {"classifier:abc": {"strategies": {"top1": dict(num_generated=9, fd=1.0)}}}}
    assert "requested class" not in pipeline.headline(rd, unlabelled, "name=demo")


def test_the_evaluate_hint_names_the_run_as_it_was_given(make_cfg, tmp_path):
    at_default = make_cfg("name=demo", run_dir="${paths.runs}/${name}")
    assert pipeline.run_argument(at_default) == "name=demo"
    elsewhere = make_cfg("name=demo", run_dir=tmp_path / "elsewhere")
    assert pipeline.run_argument(elsewhere) == f"run_dir={tmp_path / 'elsewhere'}"
