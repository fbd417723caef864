"""The paper table's mixed-kind DDM, guidance sweep and distilled rows in the plan, their bad values, and the
sweep's section of table.md (no training)."""

from __future__ import annotations

import pytest

from ddm.errors import BadInput
from ddm.experiments.paper_table import SINGLE, make_plan
from ddm.experiments.paper_table.guidance_sweep import best_scale
from ddm.experiments.paper_table.mixed import expert_overrides
from ddm.experiments.paper_table.sweep_table import render_sweep
from ddm.sampling.draw import DISTILLED


def test_small_preset_has_the_distilled_mixed_and_sweep_rows_at_the_largest_budget(make_cfg):
    cfg = make_cfg("experiment=paper_small")
    plan = make_plan(cfg)
    largest = max(int(b) for b in cfg.paper["budgets"])
    runs = {(r.config.name, r.budget): r for r in plan.runs}
    for k in (2, 4, 8):
        assert DISTILLED in runs[(f"clustered-k{k}", largest)].rows
        assert DISTILLED not in runs[(f"clustered-k{k}", 200)].rows
    mixed = runs[("mixed-targets-k4", largest)]
    assert mixed.config.targets == ("velocity", "eps", "x0", "velocity") and mixed.rows == ("top1",)
    assert mixed.router_from == runs[("clustered-k4", largest)].folder
    assert (mixed.expert_batch, mixed.expert_steps) == (16, largest)
    assert mixed.config.clustering == "clustered-k4" and mixed.config.partition == "clustered"
    assert not any(name == "mixed-targets-k4" and b != largest for name, b in runs)
    # the mixed run comes after the run whose router it links
    order = [r.name for r in plan.runs]
    assert order.index(mixed.name) > order.index(f"clustered-k4-s{largest}")
    swept = {name for (name, b), r in runs.items() if r.cfg_sweep}
    assert swept == {"monolith", "clustered-k2", "clustered-k4", "clustered-k8", "mixed-targets-k4", "random-k4"}
    assert all(r.cfg_sweep == (1.0, 1.5, 2.0, 3.0, 4.0) for r in plan.runs if r.budget == largest)
    assert runs[("monolith", largest)].rows == (SINGLE,)


def test_mixed_experts_get_their_target_and_a_guarded_t_range(make_cfg):
    cfg = make_cfg("experiment=paper_small")
    mixed = next(r.config for r in make_plan(cfg).runs if r.config.targets)
    assert expert_overrides(cfg, mixed, 0) == {"expert.id": 0, "expert.target": "velocity"}
    assert expert_overrides(cfg, mixed, 1) == {"expert.id": 1, "expert.target": "eps", "flow.t_eps": 5e-3}
    assert expert_overrides(cfg, mixed, 2) == {"expert.id": 2, "expert.target": "x0", "flow.t_eps": 5e-3}
    plain = next(r.config for r in make_plan(cfg).runs if r.config.name == "clustered-k4")
    assert expert_overrides(cfg, plain, 1) == {"expert.id": 1}


def test_empty_lists_turn_the_mixed_row_and_the_sweep_off(make_cfg):
    plan = make_plan(make_cfg("experiment=paper_small", "paper.mixed_targets=[]", "paper.cfg_scales=[]"))
    assert not any(r.config.targets or r.cfg_sweep for r in plan.runs)


@pytest.mark.parametrize(
    "override, message",
    [
        ("paper.mixed_targets=[velocity,noise]", r"\['noise'\] are not among the expert targets"),
        ("paper.mixed_targets=[eps,eps,eps,eps]", "one target only"),
        ("paper.mixed_targets=[velocity,eps,x0]", "no clustered DDM with K=3"),
        ("paper.mixed_t_eps=0.5", r"paper.mixed_t_eps=0.5 must be in \(0, 0.5\)"),
        ("paper.mixed_t_eps=0", r"paper.mixed_t_eps=0.0 must be in"),
        ("paper.cfg_scales=[1.0,-2.0]", "-2.0 is not a guidance scale"),
        ("paper.cfg_scales=[1.0,strong]", "'strong' is not a guidance scale"),
        ("paper.cfg_scales=[1.0,true]", "True is not a guidance scale"),
        ("paper.cfg_scales=[1.0,nan]", "nan is not a guidance scale"),
        ("paper.cfg_scales=[2.0,2]", "lists a scale twice"),
    ],
)
def test_bad_values_fail_before_training_with_one_line(make_cfg, override, message):
    with pytest.raises(BadInput, match=message):
        make_plan(make_cfg("experiment=paper_small", override))


def test_sweep_is_skipped_without_labels(make_cfg):
    from ddm.settings import changed

    cfg = changed(make_cfg("experiment=paper_tiny"), {"data.num_classes": 0})
    plan = make_plan(cfg)
    assert not any(r.cfg_sweep for r in plan.runs)
    assert any("guidance sweep is skipped" in note for note in plan.notes)


def test_best_scale_is_the_lowest_fd_ties_to_the_smaller_scale():
    rows = [dict(cfg_scale=1.0, fd=3.0), dict(cfg_scale=2.0, fd=1.0), dict(cfg_scale=3.0, fd=1.0)]
    assert best_scale(rows) == 2.0
    assert best_scale(rows[:1]) == 1.0


def _sweep(config, fds, best, shared=1.5):
    scales = [dict(cfg_scale=s, fd=fd, classifier_accuracy=0.5, sampling_flops_per_image=1e9) for s, fd in fds.items()]
    return dict(config=config, budget=800, shared_scale=shared, scales=scales, best_scale=best)


def test_sweep_section_compares_best_with_best_and_shared_with_shared():
    sweeps = [
        _sweep("monolith", {1.0: 4.0, 1.5: 2.0, 3.0: 1.0}, best=3.0),
        _sweep("clustered-k4", {1.0: 3.0, 1.5: 1.0, 3.0: 1.5}, best=1.5),
    ]
    text = "\n".join(render_sweep(sweeps))
    assert "## Guidance sweep at 800 steps" in text
    assert "| clustered-k4 | 3<br>acc 0.500 | 1<br>acc 0.500 | 1.5<br>acc 0.500 |" in text
    # at its own best (1.0 at 1.5) against the monolith's own best (1.0 at 3): +0%; at the shared 1.5: -50%
    assert "| clustered-k4 | 1.5 | 1 (+0%) | 0.500 | 1 GFLOPs | 1 (-50%) |" in text
    assert "| monolith | 3 | 1 | 0.500 | 1 GFLOPs | 2 |" in text
    assert render_sweep([]) == []
