"""The paper table end to end on digits (two budgets, seconds of training), its FLOP bookkeeping and its rerun."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddm.ensemble import Ensemble
from ddm.experiments.paper_table import CLASS_EXPERT, SEPARATE_CFG, SINGLE, make_plan, run
from ddm.experiments.paper_table.class_expert import ClassRouter
from ddm.experiments.paper_table.plots import flops_ticks
from ddm.io import read_json
from ddm.sampling.draw import DISTILLED

pytestmark = pytest.mark.slow

EXPECTED_ROWS = {
    ("monolith", 6, SINGLE),
    ("monolith", 12, SINGLE),
    ("clustered-k2", 6, "top1"),
    ("clustered-k2", 12, "top1"),
    ("clustered-k2", 12, "full"),
    ("clustered-k2", 12, "threshold"),
    ("clustered-k2", 12, "nucleus"),
    ("clustered-k2", 12, "full:0.5:top1"),
    ("clustered-k2", 12, SEPARATE_CFG),
    ("clustered-k2", 12, "clusters-sample"),
    ("clustered-k2", 12, CLASS_EXPERT),
    ("clustered-k2", 12, DISTILLED),
    ("mixed-targets-k2", 12, "top1"),
}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from ddm.config import settings

    root = tmp_path_factory.mktemp("paper-tiny")
    cfg = settings(
        ["experiment=paper_tiny", f"run_dir={root / 'table'}", f"eval.feature_net.cache_dir={root / 'cache'}"]
    )
    return cfg, run(cfg)


def test_every_row_of_the_grid_is_in_the_table(table):
    cfg, out = table
    results = read_json(out["results"])
    assert {(r["config"], r["budget"], r["strategy"]) for r in results["rows"]} == EXPECTED_ROWS
    text = open(out["table"]).read()
    for heading in (
        "Top-1 DDM against the monolith",
        "Routing strategies at 12 steps",
        "Guidance sweep at 12 steps",
        "Every row",
    ):
        assert heading in text
    assert "fixed per-class expert" in text and "classifier:" in text
    for label in (
        "threshold p >= 0.1",
        "nucleus top-p 0.9",
        "top-1, null input routed separately",
        "full ensemble above t = 0.5, top-1 below",
        "sample one per step, routed by the clusters (no router)",
    ):
        assert label in text
    for key in ("plot_train", "plot_sampling"):
        with open(out[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_sampler_and_one_feature_space_for_every_row(table):
    _, out = table
    results = read_json(out["results"])
    assert len({r["feature_space"] for r in results["rows"]}) == 1
    assert all(r["num_generated"] == 48 for r in results["rows"])
    assert results["settings"]["sampler"] == dict(
        solver="euler",
        steps=4,
        cfg_scale=1.5,
        cfg_interval=None,
        top_k=2,
        threshold=0.1,
        top_p=0.9,
        cfg_routing="shared",
        temperature=1.0,
    )


def test_ddm_and_monolith_spend_the_same_training_flops(table):
    cfg, out = table
    rows = read_json(out["results"])["rows"]
    plan = make_plan(cfg)
    one_monolith_step = 3 * plan.expert_forward * int(cfg.paper["monolith_batch"])
    for budget in (6, 12):
        mono = next(r for r in rows if r["config"] == "monolith" and r["budget"] == budget)
        ddm = next(r for r in rows if r["config"] == "clustered-k2" and r["budget"] == budget)
        assert mono["train_flops_router"] == 0 and mono["expert_steps"] > budget
        assert ddm["train_flops_router"] > 0 and ddm["expert_steps"] == budget and ddm["expert_batch"] == 16
        # the experts alone spend the monolith's budget; the monolith's extra steps cover the router
        assert ddm["train_flops_experts"] == 3 * plan.expert_forward * 32 * budget
        assert ddm["train_flops"] <= mono["train_flops"] < ddm["train_flops"] + one_monolith_step
    for r in rows:
        assert r["train_flops"] > 0 and r["sampling_flops_per_image"] > 0
        assert r["fd"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        # the cluster router follows sampling trajectories: the FM loss's batches are none, so it has none
        assert r["fm_loss"] is None if r["strategy"] == "clusters-sample" else r["fm_loss"] > 0


def test_sampling_flops_follow_the_strategy(table):
    _, out = table
    rows = {
        (r["config"], r["strategy"]): r["sampling_flops_per_image"]
        for r in read_json(out["results"])["rows"]
        if r["budget"] == 12
    }
    single = rows[("monolith", SINGLE)]
    # the fixed per-class expert runs one expert and no router network: a monolith's cost
    assert rows[("clustered-k2", CLASS_EXPERT)] == single
    top1, full = rows[("clustered-k2", "top1")], rows[("clustered-k2", "full")]
    assert single < top1 < full
    # threshold and nucleus: between one expert and all of them, at the experts their images used
    for s in ("threshold", "nucleus"):
        assert top1 <= rows[("clustered-k2", s)] <= full
    # the schedule runs both experts above t = 0.5 and one below: strictly between
    assert top1 < rows[("clustered-k2", "full:0.5:top1")] < full


def test_rows_routed_by_the_clusters_train_no_router(table):
    """clusters-sample: the run's experts under `sample`, the cluster router in place of router.pt; the row's
    training FLOPs are the experts' alone and its router cost per call the encoder and centroid distances."""
    cfg, out = table
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in read_json(out["results"])["rows"]}
    free, top1 = rows[("clustered-k2", 12, "clusters-sample")], rows[("clustered-k2", 12, "top1")]
    assert free["router"] == "clusters" and free["train_flops_router"] == 0 and free["router_share"] is None
    assert free["router_steps"] == 0 and top1["router_steps"] > 0
    assert free["train_flops"] == free["train_flops_experts"] == top1["train_flops_experts"] < top1["train_flops"]
    row = read_json(f"{cfg.run_dir}/runs/clustered-k2-s12/evaluation/clusters-sample.json")
    assert row["router"] == "clusters" and row["base_strategy"] == "sample" and row["route_tau"] > 0
    assert row["settings"]["sample"]["router"] == "clusters"
    # one expert per call, and a router (distances to the centroids) far cheaper than the trained one's network
    assert row["sampling"]["experts_per_call"] == 1 and 0 < row["sampling"]["router_per_call"]
    assert free["sampling_flops_per_image"] < top1["sampling_flops_per_image"]


def test_data_dependent_rows_state_the_experts_they_used(table):
    cfg, out = table
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in read_json(out["results"])["rows"]}
    metrics = read_json(f"{cfg.run_dir}/runs/clustered-k2-s12/evaluation/metrics.json")
    for s in ("threshold", "nucleus"):
        row, sampling = rows[("clustered-k2", 12, s)], metrics["flops"]["sampling"][s]
        assert sampling["experts_from"] == "usage" and 1 <= row["experts_per_call"] <= 2
        assert row["experts_per_call"] == sampling["experts_per_call"]
        assert sampling["per_image_max"] == metrics["flops"]["sampling"]["full"]["per_image"]
        # the mean over the usage the evaluate stage recorded for these images
        steps = metrics["usage"][s]
        assert row["experts_per_call"] == pytest.approx(sum(sum(r["selected"]) for r in steps) / len(steps))
    assert rows[("clustered-k2", 12, "top1")]["experts_per_call"] == 1


def test_separate_cfg_routing_row_is_top1_with_a_second_router_pass(table):
    cfg, out = table
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in read_json(out["results"])["rows"]}
    sep, top1 = rows[("clustered-k2", 12, SEPARATE_CFG)], rows[("clustered-k2", 12, "top1")]
    result = read_json(f"{cfg.run_dir}/runs/clustered-k2-s12/evaluation/{SEPARATE_CFG}.json")
    assert result["cfg_routing"] == "separate" and result["base_strategy"] == "top1"
    assert result["sampling"]["uncond_experts_per_call"] == 1 == result["sampling"]["experts_per_call"]
    # 4 Euler calls per image, each with one more router forward (on the null input) than top-1
    router = make_plan(cfg).router_forward[2]
    assert sep["sampling_flops_per_image"] - top1["sampling_flops_per_image"] == 4 * router
    # the FM loss has no guidance: the same model as top-1, on the same images and noise
    assert sep["fm_loss"] == top1["fm_loss"] and sep["num_generated"] == top1["num_generated"]
    assert result["generated"] == f"evaluation/samples-{SEPARATE_CFG}.npz"


def test_class_expert_is_the_cluster_holding_most_of_the_class(table):
    cfg, out = table
    result = read_json(f"{cfg.run_dir}/runs/clustered-k2-s12/evaluation/{CLASS_EXPERT}.json")
    counts = torch.tensor(result["class_counts"])
    assert result["expert_of_class"] == counts.argmax(dim=0).tolist()


def test_distilled_row_costs_the_experts_the_student_and_its_teachers(table):
    cfg, out = table
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in read_json(out["results"])["rows"]}
    student, top1 = rows[("clustered-k2", 12, DISTILLED)], rows[("clustered-k2", 12, "top1")]
    record = read_json(f"{cfg.run_dir}/runs/clustered-k2-s12/distilled/record.json")
    assert record["steps"] == 6 and record["teacher_flops"] > 0
    assert student["train_flops_distill"] == record["train_flops"] + record["teacher_flops"]
    assert student["train_flops"] == top1["train_flops_experts"] + student["train_flops_distill"]
    assert student["train_flops_router"] == 0
    # one model per call and no router: the monolith's sampling cost
    assert student["sampling_flops_per_image"] == rows[("monolith", 12, SINGLE)]["sampling_flops_per_image"]


def test_mixed_targets_retrain_the_clustered_experts_with_one_target_each(table):
    cfg, out = table
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in read_json(out["results"])["rows"]}
    mixed, clustered = rows[("mixed-targets-k2", 12, "top1")], rows[("clustered-k2", 12, "top1")]
    assert mixed["expert_targets"] == ["eps", "x0"] and "expert_targets" not in clustered
    root = Path(cfg.run_dir) / "runs"
    for k, target in enumerate(["eps", "x0"]):
        record = read_json(root / f"mixed-targets-k2-s12/experts/expert-{k:02d}/record.json")
        payload = torch.load(root / f"mixed-targets-k2-s12/experts/expert-{k:02d}/expert.pt", weights_only=True)
        assert record["target"] == target and payload["target"] == target
        assert payload["flow"]["t_eps"] == 5e-3  # their conversion to velocity is guarded on the trained range
        plain = read_json(root / f"clustered-k2-s12/experts/expert-{k:02d}/record.json")
        assert plain["target"] == "velocity" and plain["clustering_id"] == record["clustering_id"]
        assert (record["steps"], record["batch_size"]) == (plain["steps"], plain["batch_size"])
    # the clustered run's router, linked and not trained again; the same training FLOPs
    router = root / "mixed-targets-k2-s12/router"
    assert router.is_symlink() and router.resolve() == (root / "clustered-k2-s12/router").resolve()
    assert mixed["train_flops"] == clustered["train_flops"] and mixed["router_steps"] == clustered["router_steps"]
    assert mixed["sampling_flops_per_image"] == clustered["sampling_flops_per_image"]
    assert ("mixed-targets-k2", 6, "top1") not in rows  # the largest budget only
    assert "expert 0: eps, expert 1: x0" in open(out["table"]).read()


def test_guidance_sweep_samples_every_configuration_at_every_scale(table):
    cfg, out = table
    results = read_json(out["results"])
    rows = {(r["config"], r["budget"], r["strategy"]): r for r in results["rows"]}
    sweeps = {sw["config"]: sw for sw in results["cfg_sweep"]}
    assert set(sweeps) == {"monolith", "clustered-k2", "mixed-targets-k2"}
    for config, sw in sweeps.items():
        assert sw["budget"] == 12 and sw["shared_scale"] == 1.5
        by = {row["cfg_scale"]: row for row in sw["scales"]}
        assert sorted(by) == [1.0, 1.5, 3.0]  # the table's own scale is always among them
        # the shared scale is the top-1 row itself
        main = rows[(config, 12, SINGLE if config == "monolith" else "top1")]
        assert by[1.5]["fd"] == main["fd"] and by[1.5]["classifier_accuracy"] == main["classifier_accuracy"]
        assert by[1.5]["sampling_flops_per_image"] == main["sampling_flops_per_image"]
        assert sw["best_scale"] == min(by, key=lambda s: (by[s]["fd"], s))
        assert all(row["num_generated"] == 48 for row in sw["scales"])
    # the same labels and noise at every scale; only guidance differs
    folder = Path(cfg.run_dir) / "runs/monolith-s12/evaluation"
    low, high = np.load(folder / "cfg-sweep/top1-cfg1.npz"), np.load(folder / "cfg-sweep/top1-cfg3.npz")
    assert (low["labels"] == high["labels"]).all() and not (low["images"] == high["images"]).all()
    # no guidance: one model call per step instead of two
    mono = {row["cfg_scale"]: row["sampling_flops_per_image"] for row in sweeps["monolith"]["scales"]}
    assert mono[3.0] == 2 * mono[1.0]
    text = open(out["table"]).read()
    assert "| configuration | scale 1 | scale 1.5 | scale 3 |" in text and "best scale" in text


def test_rerun_skips_everything(table):
    cfg, out = table
    root = cfg.run_dir
    files = [
        out["table"],
        out["results"],
        out["plot_train"],
        out["plot_sampling"],
        f"{root}/runs/clustered-k2-s12/experts/expert-01/expert.pt",
        f"{root}/runs/clustered-k2-s12/router/router.pt",
        f"{root}/runs/monolith-s6/router/router.pt",
        f"{root}/runs/clustered-k2-s12/evaluation/metrics.json",
        f"{root}/runs/clustered-k2-s12/evaluation/{CLASS_EXPERT}.json",
        f"{root}/runs/clustered-k2-s12/evaluation/{SEPARATE_CFG}.json",
        f"{root}/runs/clustered-k2-s12/evaluation/clusters-sample.json",
        f"{root}/runs/clustered-k2-s12/evaluation/cfg_sweep.json",
        f"{root}/runs/clustered-k2-s12/distilled/expert.pt",
        f"{root}/runs/mixed-targets-k2-s12/experts/expert-00/expert.pt",
        f"{root}/runs/mixed-targets-k2-s12/evaluation/metrics.json",
        f"{root}/runs/monolith-s12/evaluation/cfg-sweep/top1-cfg3.npz",
    ]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    again = run(cfg)
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
    assert again["rows"] == out["rows"]


class _Constant(nn.Module):
    """A stand-in expert whose velocity is its id everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.num_classes = 3

    def forward(self, x, t, y=None):
        return torch.full_like(x, self.value)


def test_class_router_sends_each_class_to_its_expert():
    router = ClassRouter([1, 0, 1], num_experts=2, fallback=0)
    ensemble = Ensemble([_Constant(0.0), _Constant(1.0)], router, strategy="top1")
    x, t = torch.zeros(4, 1, 2, 2), torch.full((4,), 0.5)
    y = torch.tensor([0, 1, 2, 3])  # 3 is the null label: the fallback expert
    v = ensemble(x, t, y)
    assert v[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert math.isclose(router(x, t, y).softmax(-1)[0, 1].item(), 1.0)


def test_flops_ticks_label_each_point_unless_labels_would_overlap():
    # A narrow range (top-1 vs a single model): both values are ticks.
    assert flops_ticks([3.33e9, 3.14e9, 3.33e9]) == [3.14e9, 3.33e9]
    # A wide range (every strategy up to the full K=8 ensemble): 3.33 G is 6% from 3.14 G, under an
    # eighth of the range in log space ((25.3 / 3.14) ** (1/8) = 1.30), so it is dropped.
    assert flops_ticks([3.14e9, 3.33e9, 6.47e9, 12.7e9, 25.3e9]) == [3.14e9, 6.47e9, 12.7e9, 25.3e9]
    assert flops_ticks([12.8e12]) == [12.8e12]
    assert flops_ticks([]) == []


def test_small_preset_plan_matches_the_paper_setup(make_cfg):
    cfg = make_cfg("experiment=paper_small")
    plan = make_plan(cfg)
    batch = int(cfg.paper["monolith_batch"])
    runs = {(r.config.name, r.budget): r for r in plan.runs}
    assert len(set(int(b) for b in cfg.paper["budgets"])) >= 3
    for r in plan.runs:
        assert r.expert_batch * r.config.k == batch
        if r.config.k > 1:
            assert r.expert_steps == r.budget
    largest = max(int(b) for b in cfg.paper["budgets"])
    assert CLASS_EXPERT in runs[("clustered-k4", largest)].rows
    assert {"top1", "full", "sample", "threshold", "nucleus", SEPARATE_CFG} <= set(runs[("clustered-k8", largest)].rows)
    assert cfg.sample.threshold == 0.1 and cfg.sample.top_p == 0.9  # the table's values of the two options
    # the monolith's extra steps cost at least the largest router's training FLOPs, and less than one step more
    for b, extra in plan.monolith_extra_steps.items():
        router = max(
            3 * f * int(cfg.router.batch_size) * max(1, round(float(cfg.paper["router_steps_ratio"]) * b))
            for f in plan.router_forward.values()
        )
        step = 3 * plan.expert_forward * batch
        assert extra * step >= router > (extra - 1) * step


def test_separate_cfg_row_is_skipped_where_it_would_repeat_top1(make_cfg):
    for override, why in (
        ("sample.cfg_scale=1", "no guidance"),
        ("sample.cfg_routing=separate", "every row routes guidance separately"),
    ):
        plan = make_plan(make_cfg("experiment=paper_small", override))
        assert all(SEPARATE_CFG not in r.rows for r in plan.runs), override
        assert any(why in note for note in plan.notes), plan.notes
    with pytest.raises(ValueError, match="sample.threshold"):
        run(make_cfg("experiment=paper_small", "sample.threshold=2", "paper.dry_run=true", "paper.estimate=false"))


def test_script_reports_a_config_without_a_grid_in_one_line(capsys, monkeypatch):
    # as `ddm <stage>`: an expected error is one line on stderr and exit status 2, no traceback
    import runpy

    from ddm.cli import USER_ERROR_STATUS

    monkeypatch.setattr("ddm.cli.setup_logging", lambda level: None)  # keep the "ddm" logger as other tests expect
    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "paper_table.py"))["main"]
    with pytest.raises(SystemExit) as exit_:
        main(["name=no-grid"])
    assert exit_.value.code == USER_ERROR_STATUS
    err = capsys.readouterr().err
    assert err.startswith("scripts/paper_table.py: error: the config has no `paper` key") and err.count("\n") == 1


def test_estimate_times_a_gpu_island_on_the_gpu_it_finds_else_the_cpu(make_cfg):
    from ddm.experiments.paper_table.estimate import training_device
    from ddm.settings import changed

    island = make_cfg().island
    visible = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device(changed(island, {"accelerator": "gpu"})).type == visible  # no error without a GPU
    assert training_device(changed(island, {"accelerator": "auto"})).type == visible
    assert training_device(changed(island, {"accelerator": "cpu"})).type == "cpu"
