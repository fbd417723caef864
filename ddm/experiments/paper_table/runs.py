"""Running the table's work: the shared data, each configuration's clustering, each run's training and evaluation.

Every step is a stage run through ``ddm.stages.runner.run_stage`` (seeded, timed
and recorded as on the command line), so it skips work that is done and a rerun
continues an interrupted table.

K = 1: a one-output router is the constant 1 (a softmax over one logit), so none
is trained: ``router/router.pt`` holds an untrained one-output router and its
record 0 training FLOPs. That lets the same sampler and the same evaluate stage
serve the monolith; its sampling FLOPs are those of one model without a router
call (``flops.sampling.single_model``).
"""

from __future__ import annotations

from ddm.artifacts import RunDir
from ddm.data.router_data import load_partitions
from ddm.errors import BadInput
from ddm.eval.flops import model_forward_flops
from ddm.flow import flow_path_from_config
from ddm.io import read_json, write_json
from ddm.models.dit import DiTClassifier
from ddm.sampling.draw import DISTILLED
from ddm.sampling.route_tau import FITTED
from ddm.settings import Settings
from ddm.stages.runner import run_stage
from ddm.train.export import save_weights

from .extra_rows import evaluate_extra_row
from .grid import Config, Plan, Run
from .layout import clustering_cfg, clustering_dir, data_cfg, data_dir, derive, link, run_cfg
from .mixed import expert_overrides

# The artefacts a run shares with its configuration's clustering folder (links, not copies).
SHARED = ("data", "embeddings", "clusters", "partitions")


def prepare_data(cfg: Settings, plan: Plan) -> None:
    """prepare (and embed, when a configuration clusters by embedding) once, into data-run/."""
    dcfg = data_cfg(cfg)
    run_stage("prepare", dcfg)
    if any(c.method != "random" for c in plan.configs):
        run_stage("embed", dcfg)


def prepare_clustering(cfg: Settings, config: Config) -> None:
    """Link the shared data (and embeddings) into the configuration's folder, then cluster and partition it."""
    ccfg = clustering_cfg(cfg, config)
    folder, source = RunDir(ccfg.run_dir), RunDir(data_dir(cfg))
    link(source.data, folder.data)
    if source.embeddings_manifest.exists():
        link(source.embeddings, folder.embeddings)
    run_stage("cluster", ccfg)
    run_stage("partition", ccfg)


def train_run(cfg: Settings, r: Run) -> None:
    """Link the shared artefacts into the run's folder, then train its experts (a mixed-kind DDM: each with its
    own target), router (or link the one it shares) and (a ``distilled`` row) the student of its experts."""
    rcfg = run_cfg(cfg, r)
    rd, shared = RunDir(r.folder), RunDir(clustering_dir(cfg, r.config))
    for name in SHARED:
        if (shared.root / name).exists():
            link(shared.root / name, rd.root / name)
    for k in range(r.config.k):
        run_stage("train-expert", derive(rcfg, **expert_overrides(cfg, r.config, k)))
    if r.router_from is not None:  # the same router as the run it comes from: linked, not trained again
        link(RunDir(r.router_from).router, rd.router)
    elif r.config.k > 1:
        run_stage("train-router", rcfg)
    else:
        write_constant_router(rcfg)
    if r.cluster_routed and rcfg.sample.route_tau == FITTED:  # the cluster router's tau, fitted on held-out images
        run_stage("fit-route-tau", rcfg)
    if DISTILLED in r.strategies:
        run_stage("distill", rcfg)


def write_constant_router(cfg: Settings) -> dict:
    """router.pt for K = 1: a one-output router, which is the constant 1 whatever its weights; 0 training FLOPs."""
    rd = RunDir(cfg.run_dir)
    if rd.router_record.exists() and rd.router_weights.exists():
        return read_json(rd.router_record)
    index, manifests = load_partitions(rd)
    if len(manifests) != 1:
        raise BadInput(f"{rd.partitions} has {len(manifests)} partitions; a constant router is for K = 1 only")
    meta = manifests[0]
    shape = (int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    net = DiTClassifier(1, str(cfg.router.size), shape[1], shape[0], int(meta["num_classes"]))
    flow = flow_path_from_config(cfg.flow.to_dict()).config()
    save_weights(rd.router_weights, "router", net, flow, num_experts=1, clustering_id=index["clustering_id"], steps=0)
    record = dict(
        num_experts=1,
        clustering_id=index["clustering_id"],
        steps=0,
        batch_size=0,
        samples_seen=0,
        train_flops=0,
        forward_flops_per_sample=model_forward_flops(net, shape, int(meta["num_classes"]) > 0),
        note="K = 1: softmax over one logit is 1 for every input, so this router is untrained and costs "
        "no training FLOPs; the monolith's sampling FLOPs leave it out (single_model)",
    )
    write_json(rd.router_record, record)
    return record


def evaluate_run(cfg: Settings, r: Run) -> tuple[dict, dict[str, dict]]:
    """The evaluate stage's metrics (its own skip check applies) and those of the run's extra rows, by label."""
    rcfg = run_cfg(cfg, r)
    metrics = run_stage("evaluate", rcfg)
    return metrics, {label: evaluate_extra_row(rcfg, label) for label in r.extra_rows}
