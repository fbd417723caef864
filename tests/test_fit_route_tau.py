"""`ddm fit-route-tau`: the cluster router's temperature fitted on held-out images; `sample.route_tau=fitted`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm.cluster_router.calibration import calibration_indices, denoised_calibration
from ddm.errors import BadInput, MissingInput
from ddm.flow import FlowPath
from ddm.io import read_json, write_json
from ddm.sampling import load_ensemble
from ddm.sampling.route_tau import fitted_tau
from ddm.sampling.solvers import evaluation_times
from ddm.stages import fit_route_tau
from ddm.stages import sample as sample_stage


def test_calibration_takes_at_most_n_images_of_every_cluster():
    clusters = np.array([0, 1, 1, 0, 2, 1, 1, 0, 0, 0])
    picked = calibration_indices(clusters, 3, per_cluster=3, seed=0)
    assert {k: len(v) for k, v in picked.items()} == {0: 3, 1: 3, 2: 1}
    assert all((clusters[v] == k).all() and (np.diff(v) > 0).all() for k, v in picked.items())
    assert {k: v.tolist() for k, v in calibration_indices(clusters, 3, 3, seed=0).items()} == {
        k: v.tolist() for k, v in picked.items()
    }
    with pytest.raises(BadInput, match="no held-out image falls in cluster 3"):
        calibration_indices(clusters, 4, per_cluster=3, seed=0)


def test_an_exact_expert_denoises_to_its_cluster_at_every_time():
    """Cluster k's data is one point c_k and expert k its exact flow: every x0 estimate is c_k, at every t."""
    path = FlowPath()
    points = {0: torch.tensor([1.0, -2.0]), 1: torch.tensor([-3.0, 0.5])}

    def exact(c):
        return lambda x, t, y=None: path.velocity_from("x0", x, c.expand_as(x), t)

    images = {k: (c.expand(5, 2).clone(), None) for k, c in points.items()}
    times = evaluation_times(path, 6, "euler")[1:]
    emb, own = denoised_calibration(
        {k: exact(c) for k, c in points.items()}, path, images, times, embed=lambda x: x, seed=0, batch_size=3
    )
    assert own.tolist() == [0] * (5 * len(times)) + [1] * (5 * len(times))
    want = torch.stack([points[int(k)] for k in own])
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-5)


def test_fit_route_tau_fits_on_held_out_images_and_sampling_uses_it(tiny_run, tmp_path):
    run = tiny_run.copy(tmp_path / "run")
    # the job reads no partition: their shards may be gone (their manifests stay: p(k | y) comes from them)
    for shard in run.rd.partitions.glob("cluster-*/*.tar"):
        shard.unlink()
    record = fit_route_tau.run(run.settings())
    K = int(read_json(run.rd.cluster_report)["k"])
    per = record["images_per_cluster"]
    assert sorted(per) == [str(k) for k in range(K)] and all(1 <= n <= 32 for n in per.values())
    assert record["tau"] > 0
    # the fitted tau is the NLL's minimum, or (clusters that the estimates separate cleanly) the softest at 0.01 nats
    assert record["nll"] <= record["clustering_tau_nll"] or (record["separable"] and record["nll"] <= 0.0100001)
    steps = int(run.settings().sample.steps)
    assert record["times"] == evaluation_times(FlowPath(), steps, "euler")[1:] and 1.0 not in record["times"]
    assert record["settings"]["clustering_id"] == read_json(run.rd.cluster_report)["clustering_id"]
    assert sorted(record["settings"]["experts"]) == [f"expert-{k:02d}" for k in range(K)]
    assert fit_route_tau.run(run.settings()).skipped  # the same settings, clustering and experts

    ensemble, _, _ = load_ensemble(run.rd.root, router="clusters", route_tau="fitted")
    assert ensemble.router.tau == pytest.approx(record["tau"])
    made = sample_stage.run(run.settings("sample.router=clusters", "sample.strategy=sample", "sample.route_tau=fitted"))
    assert made["settings"]["route_tau"] == "fitted"


def test_a_fitted_tau_of_other_experts_or_none_is_refused(tiny_run, tmp_path):
    run = tiny_run.copy(tmp_path / "run")
    with pytest.raises(MissingInput, match="run `ddm fit-route-tau` first"):
        fitted_tau(run.rd)
    fit_route_tau.run(run.settings())
    assert fitted_tau(run.rd) > 0
    fitted = read_json(run.rd.route_tau)
    experts = dict(fitted["settings"]["experts"], **{"expert-00": "0" * 64})  # fitted before expert 0 was retrained
    write_json(run.rd.route_tau, dict(fitted, settings=dict(fitted["settings"], experts=experts)))
    with pytest.raises(BadInput, match=r"fitted for clustering .* `ddm fit-route-tau redo=true`"):
        fitted_tau(run.rd)
    with pytest.raises(BadInput, match="fit-route-tau redo=true"):
        sample_stage.run(run.settings("sample.router=clusters", "sample.strategy=sample", "sample.route_tau=fitted"))
    assert not fit_route_tau.run(run.settings()).skipped  # the stage fits again for the experts of now
    assert fitted_tau(run.rd) > 0
    # a damaged record names itself
    write_json(run.rd.route_tau, dict(read_json(run.rd.route_tau), tau="warm"))
    with pytest.raises(BadInput, match="holds no positive tau"):
        fitted_tau(run.rd)
