"""The evaluate stage on the tiny experiment: every part of metrics.json, the report, and skipping."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from ddm.artifacts import RunDir
from ddm.io import read_json
from ddm.stages import evaluate
from tests.real_inception import REAL_INCEPTION, needs_real_inception

# Small enough for seconds on 2 cores (the shared tiny run trains a few steps only).
OVERRIDES = [
    "eval.num_samples=40",
    "eval.per_class_min=3",
    "eval.feature_net.steps=30",
    "eval.feature_net.width=8",
    "eval.feature_net.batch_size=32",
    "eval.fm_loss.num_samples=30",
    "eval.fm_loss.t_grid=[0.25,0.75]",
    "eval.router.num_samples=60",
    "eval.router.t_buckets=4",
    "eval.strategies=[top1,full]",
]


def is_fraction_of(value: float, n: int) -> bool:
    """``value`` is a count out of ``n``: k / n for a whole k in 0..n (a rate over n unweighted items)."""
    return 0 <= value <= 1 and abs(value * n - round(value * n)) < 1e-9


def eval_group() -> list[str]:
    """``+eval=default`` while conf/config.yaml does not list the eval group in its defaults; nothing once it does."""
    from omegaconf import OmegaConf

    from ddm.config import CONF_DIR

    defaults = OmegaConf.load(CONF_DIR / "config.yaml").defaults
    listed = any(OmegaConf.is_dict(d) and "eval" in d for d in defaults)
    return [] if listed else ["+eval=default"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_run):
    """The shared tiny run (tests/conftest.py), copied and evaluated."""
    root = tmp_path_factory.mktemp("tiny-eval")
    run = tiny_run.copy(root / "run")

    def make_cfg(*extra, run_dir=None):
        overrides = [*eval_group(), f"eval.feature_net.cache_dir={root / 'cache'}", *OVERRIDES, *extra]
        return run.settings(*overrides, *([f"run_dir={run_dir}"] if run_dir else []))

    cfg = make_cfg()
    metrics = evaluate.run(cfg)
    return make_cfg, run.rd, metrics


def test_metrics_file_holds_every_part(evaluated):
    _, rd, metrics = evaluated
    assert read_json(rd.root / "evaluation" / "metrics.json") == metrics
    assert metrics["heldout"]["mode"] == "slice"  # digits has one split: a documented hold-out slice
    assert metrics["run"]["num_experts"] == 2 and metrics["run"]["num_classes"] == 10
    assert set(metrics) >= {"settings", "feature_spaces", "fm_loss", "router", "flops", "usage", "generated"}


def test_sample_quality_is_named_by_its_feature_space(evaluated):
    _, _, metrics = evaluated
    ((name, space),) = metrics["feature_spaces"].items()  # no inception file given: one space only
    assert name == f"classifier:{space['checksum'][:12]}"
    assert space["target"] == "class"
    # a count of the held-out digits it labels right, far above chance (1/10): 0.71 after its 30 steps
    assert is_fraction_of(space["test_accuracy"], space["test_images"]) and space["test_accuracy"] > 0.3
    # training digits lie on the held-out digits' manifold and it on theirs (k-NN precision and recall 1 here)
    reference = space["reference_training_images"]
    assert reference["fd"] > 0 and reference["precision"] >= 0.9 and reference["recall"] >= 0.9
    for s in ("top1", "full"):
        row = space["strategies"][s]
        # six training steps make noisy digits: farther from the held-out ones than the training digits are
        assert row["num_generated"] == 40 and row["fd"] > 2 * reference["fd"]
        # precision: the share of the generated images inside the real manifold; recall: of the real ones
        assert is_fraction_of(row["precision"], row["num_generated"]) and is_fraction_of(
            row["recall"], space["num_real"]
        )
        assert is_fraction_of(row["classifier_accuracy"], row["num_generated"])
        assert row["per_class"], "a class-conditional run reports per-class numbers"
    # samples/ held 20 images, fewer than asked for: the stage sampled its own
    assert metrics["generated"]["top1"]["source"] == "evaluation/samples-top1.npz"


def test_fm_loss_for_the_ensemble_and_each_expert(evaluated):
    _, _, metrics = evaluated
    fm = metrics["fm_loss"]
    assert set(fm["models"]) == {"ensemble-top1", "ensemble-full", "expert-00", "expert-01"}
    for row in fm["models"].values():
        assert [p["t"] for p in row["per_t"]] == [0.25, 0.75]
        assert row["mean"] > 0 and row["forward_flops_per_call"] > 0


def test_router_diagnostics_per_t_bucket(evaluated):
    _, _, metrics = evaluated
    router = metrics["router"]
    assert router["cluster_labels"] == "assignments" and len(router["buckets"]) == 4
    for b in router["buckets"]:
        # every held-out image once per bucket, unweighted: the accuracy is a count out of them
        assert b["n"] == router["num_images"] and is_fraction_of(b["accuracy"], b["n"])
        # K = 2: the entropy (nats) is at most log 2, the argmax's probability at least 1/2
        assert b["max_entropy"] == pytest.approx(math.log(2)) and 0 < b["entropy"] <= b["max_entropy"]
        assert 0.5 <= b["confidence"] <= 1
        # ECE = sum over bins of (n_b / n) |acc_b - conf_b|: at least the bucket's overall |accuracy - confidence|
        assert abs(b["accuracy"] - b["confidence"]) - 1e-12 <= b["ece"] <= 1
    steps = metrics["usage"]["top1"]
    assert len(steps) == 4  # tiny: 4 Euler steps
    assert all(sum(r["weight"]) == pytest.approx(1.0) for r in steps)


def test_flops_are_stated_and_the_formula_matches_the_counter(evaluated):
    _, rd, metrics = evaluated
    fl = metrics["flops"]
    assert set(fl["forward_per_sample"]) == {"expert-00", "expert-01", "router"}
    record = read_json(rd.expert_record(0))
    assert fl["forward_per_sample"]["expert-00"] == record["forward_flops_per_sample"]
    assert fl["train"]["jobs"]["expert-00"] == dict(
        flops=record["train_flops"], estimated=False, samples_seen=record["samples_seen"]
    )
    assert fl["train"]["total"] > 0 and 0 < fl["train"]["router_share"] < 1
    for s in ("top1", "full"):
        assert fl["sampling"][s]["per_image"] == fl["sampling"][s]["measured_per_image"]
        # a fixed number of experts per call: the bound is the count itself
        assert fl["sampling"][s]["experts_from"] == "strategy"
        assert fl["sampling"][s]["per_image_max"] == fl["sampling"][s]["per_image"]
    assert fl["sampling"]["full"]["per_image"] > fl["sampling"]["top1"]["per_image"]


def test_report_has_one_table_per_feature_space_with_flops(evaluated):
    _, rd, metrics = evaluated
    text = (rd.root / "evaluation" / "report.md").read_text()
    name = next(iter(metrics["feature_spaces"]))
    assert f"## Sample quality in `{name}`" in text
    for heading in ("## Held-out flow-matching loss", "## Router by t", "## FLOPs", "sampling FLOPs/image"):
        assert heading in text


def test_rerun_skips_and_new_settings_evaluate_again(evaluated):
    make_cfg, rd, metrics = evaluated
    marker = rd.root / "evaluation" / "metrics.json"
    before = marker.stat().st_mtime_ns
    assert evaluate.run(make_cfg()) == metrics
    assert marker.stat().st_mtime_ns == before
    # Another setting: evaluated again; the cached feature net is reused, not retrained.
    again = evaluate.run(
        make_cfg("eval.fm_loss.per_expert=false", "eval.strategies=[top1]", "eval.flops.measure_images=0")
    )
    assert set(again["fm_loss"]["models"]) == {"ensemble-top1", "ensemble-full"}
    assert next(iter(again["feature_spaces"].values()))["cached"] is True


def test_a_missing_inception_file_names_the_config_key(evaluated, tmp_path):
    make_cfg, _, _ = evaluated
    with pytest.raises(FileNotFoundError, match=r"eval\.inception_weights"):
        evaluate.run(make_cfg(f"eval.inception_weights={tmp_path / 'missing.pt'}"))


def test_the_distilled_model_is_evaluated_in_place_of_the_ensemble(evaluated, tmp_path):
    """sample.model=distilled: the student is the evaluated row; its FLOPs are one model's, its training all of it."""
    from ddm.stages import distill

    make_cfg, rd, _ = evaluated
    run = tmp_path / "run"  # a copy: the module's run keeps its own metrics.json
    shutil.copytree(rd.root, run)
    record = distill.run(make_cfg("distill.steps=3", "distill.batch_size=8", run_dir=run))
    metrics = evaluate.run(
        make_cfg("sample.model=distilled", "eval.strategies=null", "eval.fm_loss.strategies=[top1]", run_dir=run)
    )
    space = next(iter(metrics["feature_spaces"].values()))
    assert set(space["strategies"]) == {"distilled"} and space["strategies"]["distilled"]["num_generated"] == 40
    assert metrics["generated"]["distilled"]["source"] == "evaluation/samples-distilled.npz"
    assert "distilled" not in metrics["usage"]  # one model: nothing routed
    assert set(metrics["fm_loss"]["models"]) == {"ensemble-top1", "expert-00", "expert-01", "distilled"}
    fl = metrics["flops"]
    assert fl["forward_per_sample"]["distilled"] == record["forward_flops_per_sample"]
    row = fl["sampling"]["distilled"]
    assert row["router_per_call"] == 0 and row["experts_per_call"] == 1
    assert row["per_image"] == row["measured_per_image"] == fl["sampling"]["single_model"]["per_image"]
    experts = sum(fl["train"]["jobs"][f"expert-{k:02d}"]["flops"] for k in range(2))
    assert fl["train"]["distilled"] == dict(
        experts=experts,
        student=record["train_flops"],
        teacher_forward=record["teacher_flops"],
        total=experts + record["train_flops"] + record["teacher_flops"],
        samples_seen=24,
    )
    text = (run / "evaluation" / "report.md").read_text()
    assert "| distilled |" in text and "The distilled model cost" in text
    # the same settings again: skipped
    assert (
        evaluate.run(
            make_cfg("sample.model=distilled", "eval.strategies=null", "eval.fm_loss.strategies=[top1]", run_dir=run)
        )
        == metrics
    )


def test_the_distilled_row_beside_threshold_under_separate_guidance_routing(evaluated, tmp_path):
    """sample.cfg_routing=separate routes the ensemble rows' null input on its own; the student has no router, so
    its row stays one guided model. samples/ made with sample.model=distilled stand for its row."""
    from ddm.stages import distill
    from ddm.stages import sample as sample_stage

    make_cfg, rd, _ = evaluated
    run = tmp_path / "run"  # a copy: the module's run keeps its own metrics.json
    shutil.copytree(rd.root, run)
    distill.run(make_cfg("distill.steps=3", "distill.batch_size=8", run_dir=run))
    routing = ("sample.cfg_routing=separate", "sample.threshold=0.3")
    made = sample_stage.run(make_cfg("sample.model=distilled", "sample.num_samples=40", *routing, run_dir=run))
    assert made["model"] == "distilled" and made["experts_per_sample"] is None
    assert not (run / "samples" / "usage.json").exists()
    metrics = evaluate.run(
        make_cfg(
            "sample.model=distilled",
            "sample.num_samples=40",
            *routing,
            "eval.strategies=[threshold,distilled]",
            "eval.fm_loss.strategies=[threshold]",
            run_dir=run,
        )
    )
    assert metrics["generated"]["distilled"]["source"] == "samples/samples.npz"
    assert set(metrics["usage"]) == {"threshold"}  # the student routes nothing
    fl = metrics["flops"]["sampling"]
    assert fl["threshold"]["cfg_routing"] == "separate" and fl["threshold"]["experts_from"] == "usage"
    student = fl["distilled"]
    assert "cfg_routing" not in student and student["router_per_call"] == 0 and student["cfg_factor"] == 2
    assert student["per_image"] == student["measured_per_image"] == fl["single_model"]["per_image"]
    fm = metrics["fm_loss"]["models"]
    assert set(fm) >= {"ensemble-threshold", "distilled"} and fm["ensemble-threshold"]["experts_per_call"] >= 1
    forward = metrics["flops"]["forward_per_sample"]
    mean = sum(v for k, v in forward.items() if k.startswith("expert-")) / 2
    # threshold's FM loss is costed at the experts it ran on the held-out images, as without a distilled row
    e = fm["ensemble-threshold"]["experts_per_call"]
    assert fm["ensemble-threshold"]["forward_flops_per_call"] == int(forward["router"] + e * mean)
    text = (run / "evaluation" / "report.md").read_text()
    assert "| distilled |" in text and "null input routed separately" in text


@needs_real_inception
def test_the_real_fid_inception_is_its_own_feature_space(evaluated, tmp_path):
    """The stage measures FID with the real network: an ``inception:<sha>`` space beside the classifier's."""
    make_cfg, rd, _ = evaluated
    run = tmp_path / "run"  # a copy: the module's run keeps its own metrics.json
    shutil.copytree(rd.root, run)
    metrics = evaluate.run(
        make_cfg(
            f"eval.inception_weights={REAL_INCEPTION}",
            "eval.num_samples=10",  # Inception: 30 images (held-out, training, top1) at about 6 images/s
            "eval.strategies=[top1]",
            "eval.fm_loss.per_expert=false",
            "eval.flops.measure_images=0",
            run_dir=run,
        )
    )
    classifier, inception = metrics["feature_spaces"]  # the classifier first
    assert classifier.startswith("classifier:") and inception == "inception:7ff4a85c3a63"
    space = metrics["feature_spaces"][inception]
    assert space["kind"] == "fid_inception_tf" and space["file"] == str(Path(REAL_INCEPTION))
    assert space["sha256"].startswith("7ff4a85c3a63") and space["num_real"] == 10
    reference, top1 = space["reference_training_images"], space["strategies"]["top1"]
    assert reference["num_images"] == 10 and top1["num_generated"] == 10
    assert all(math.isfinite(row["fd"]) and row["fd"] > 0 for row in (reference, top1))
    assert 0 <= top1["precision"] <= 1 and 0 <= top1["recall"] <= 1
    # six training steps make noisy images: far from the held-out digits, unlike the training digits
    assert top1["fd"] > 2 * reference["fd"]
    assert f"## Sample quality in `{inception}`" in (run / "evaluation" / "report.md").read_text()


REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (REAL_FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_heldout_test_split_gets_clusters_by_the_clustering_rule(tmp_path):
    """Fashion-MNIST's test images become the held-out set; new images go to clusters as training images did."""
    import numpy as np

    from ddm.cluster import load_assignments
    from ddm.config import settings
    from ddm.eval.heldout import load_images
    from ddm.eval.run.clusters import cluster_labels, nearest_centroid
    from ddm.eval.run.heldout import heldout_dir, prepare_heldout
    from ddm.stages import cluster, embed, prepare

    cfg = settings(
        [
            f"run_dir={tmp_path / 'run'}",
            *eval_group(),
            "data=fashion_mnist",
            "data.limit=400",
            "cluster.k=3",
            "cluster.fine_k=16",
            "eval.heldout.limit=50",
        ]
    )
    for stage in (prepare, embed, cluster):
        stage.run(cfg)
    rd = RunDir(cfg.run_dir)
    manifest = prepare_heldout(cfg)
    assert manifest["mode"] == "split" and manifest["num_samples"] == 50
    assert prepare_heldout(cfg) == manifest  # reused, not rewritten
    x, y, keys = load_images(heldout_dir(rd))
    # a seeded subset of the test split, not its first 50 images
    assert len(set(keys)) == 50 and all(key.startswith("fmnist-test-") for key in keys) and (y >= 0).all()
    assert keys != [f"fmnist-test-{i:08d}" for i in range(50)]
    labels, how = cluster_labels(rd, keys, x, int(cfg.seed))
    assert how == "nearest_centroid" and set(labels.tolist()) <= {0, 1, 2}
    # The rule for new images reproduces the cluster stage's own assignments on the training images.
    train_x, _, train_keys = load_images(rd.data)
    report = read_json(rd.cluster_report)
    known = load_assignments(rd.assignments).cluster_of()
    np.testing.assert_array_equal(nearest_centroid(rd, report, train_x, int(cfg.seed)), [known[k] for k in train_keys])
