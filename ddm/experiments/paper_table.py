"""The small-scale paper table: DDM against a monolith at equal training FLOPs.

What it compares (the grid lives under ``paper:`` in ``conf/experiment/paper_*.yaml``):

- a **monolith**: one expert-sized model trained on all the data at batch B (a K = 1 run);
- **DDMs** with K clustered experts, each at batch B / K for the same steps (so the
  experts together spend the monolith's FLOPs, as in the paper), and, as the
  paper's baseline, K experts on a **random** partition;
- each configuration at several **training budgets** (steps), so the curves show a trend;
- **routing strategies** on the same trained experts and router (no retraining):
  ``top1``, ``topk``, ``full``, ``sample`` and ``class_expert``: for class c, always
  the expert whose cluster holds most training images of c (an oracle-like
  baseline for class-conditional runs);
- one sampler (solver, steps, guidance scale, number of samples, seed) for every row.

Equal FLOPs: the router's training FLOPs count on the DDM side. With
``paper.monolith_matches_router`` the monolith trains the extra steps that cost
the router's FLOPs (of the largest K), so it never spends less than a DDM; every
row states its own FLOPs either way.

Layout of the table's folder (``run_dir``)::

    data-run/                   prepare + embed, once (every other folder links to its data)
    clusterings/<config>/       cluster + partition of one configuration
    runs/<config>-s<budget>/    experts/, router/, evaluation/ of one configuration at one budget
                                (data, embeddings, clusters and partitions are links)
    table.md  results.json  train_flops.png  sampling_flops.png  timings.json

Every step is a stage's ``run(cfg)`` and so skips work that is done; the fixed
per-class expert's metrics are cached beside the evaluate stage's, in
``evaluation/class_expert.json``. Rerunning the command continues an interrupted
table; ``table.md``, ``results.json`` and the plots are rewritten only when
their content changes.

K = 1: a one-output router is the constant 1 (a softmax over one logit), so none
is trained: ``router/router.pt`` holds an untrained one-output router and its
record 0 training FLOPs. That lets the same sampler and the same evaluate stage
serve the monolith; its sampling FLOPs are those of one model without a router
call (``flops.sampling.single_model``).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from ddm.artifacts import RunDir
from ddm.data.shards import load_manifest
from ddm.ensemble import STRATEGIES, Ensemble
from ddm.eval import feature_net as fnet
from ddm.eval.flops import EXPERTS_PER_CALL, model_forward_flops, sampling_flops_per_image
from ddm.eval.tables import fmt_flops
from ddm.io import atomic_path, read_json, write_json, write_text
from ddm.stages.runner import run_stage  # each stage seeded and timed as the command line runs it
from ddm.models.dit import DiT, DiTClassifier
from ddm.sampling import num_evaluations

log = logging.getLogger("ddm")

CLASS_EXPERT = "class_expert"       # the fixed per-class expert baseline
SINGLE = "single"                   # the strategy label of a monolith row (one model, no router)
KNOWN_STRATEGIES = (*STRATEGIES, CLASS_EXPERT)

# Rough costs the estimate cannot time in advance (seconds).
# A Lightning step (data loading, EMA, logging) against the bare step timed here. Measured on 2 CPU cores
# (paper_small): 0.76-0.88x, the bare timing taken at start-up being the slower; 1.0 keeps it conservative.
TRAINER_FACTOR = 1.0
JOB_OVERHEAD_S = 8.0                # a Lightning job: start, loader worker, checkpoint, export
EVAL_OVERHEAD_S = 20.0              # held-out shards, loading, features, router diagnostics
DATA_S = 60.0                       # prepare + embed of the whole dataset, once
CLUSTERING_S = 20.0                 # cluster + partition of one configuration


# ---- the grid ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One way to split the data: the monolith (K = 1), or K clustered or random experts."""
    name: str
    method: str       # cluster.method: two_stage | flat | random
    k: int

    @property
    def partition(self) -> str:
        if self.k == 1:
            return "-"
        return "random" if self.method == "random" else "clustered"


@dataclass(frozen=True)
class Run:
    """One configuration trained at one budget, and what is evaluated on it."""
    config: Config
    budget: int                   # the nominal steps of the row (the x of the training curves)
    expert_steps: int             # = budget, plus the router-matching extra for the monolith
    expert_batch: int             # monolith batch / K
    router_steps: int             # 0 for K = 1 (no router is trained)
    strategies: tuple[str, ...]   # ensemble strategies the evaluate stage computes
    class_expert: bool            # also evaluate the fixed per-class expert
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.config.name}-s{self.budget}"

    @property
    def rows(self) -> tuple[str, ...]:
        """The strategy label of each table row this run gives."""
        if self.config.k == 1:
            return (SINGLE,)
        return self.strategies + ((CLASS_EXPERT,) if self.class_expert else ())


@dataclass
class Plan:
    configs: list[Config]
    runs: list[Run]
    expert_forward: int                     # FLOPs per sample of one expert forward
    router_forward: dict[int, int]          # K -> FLOPs per sample of the router forward
    monolith_extra_steps: dict[int, int]    # budget -> extra monolith steps (router FLOPs matched)
    notes: list[str] = field(default_factory=list)


def _paper(cfg) -> DictConfig:
    if "paper" not in cfg:
        raise KeyError("the config has no `paper` key: run with an experiment that defines the grid, e.g. "
                       "experiment=paper_small (see conf/experiment/paper_small.yaml)")
    return cfg.paper


def make_plan(cfg) -> Plan:
    """The configurations and runs of ``cfg.paper``, with the monolith's extra steps worked out."""
    p = _paper(cfg)
    batch = int(p.monolith_batch)
    budgets = sorted({int(b) for b in p.budgets})
    strategies = [str(s) for s in p.strategies]
    unknown = [s for s in strategies if s not in KNOWN_STRATEGIES]
    if unknown or not budgets:
        raise ValueError(f"paper.strategies {unknown} are not among {KNOWN_STRATEGIES}, or paper.budgets is empty")
    if cfg.sample.get("experts") is not None:
        raise ValueError("sample.experts must be null for the paper table: every row uses all of its experts")

    configs = [Config("monolith", "random", 1)]
    configs += [Config(f"clustered-k{int(k)}", str(p.clustering), int(k)) for k in p.ks]
    configs += [Config(f"random-k{int(k)}", "random", int(k)) for k in p.random_ks]
    for c in configs:
        if c.k < 1 or batch % c.k:
            raise ValueError(f"paper.monolith_batch={batch} must split evenly over K={c.k} experts "
                             f"(each expert trains at batch B / K)")

    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    classes = int(cfg.data.num_classes)
    expert_fwd = model_forward_flops(DiT(str(cfg.model.size), shape[1], shape[0], classes), shape, classes > 0)
    router_fwd = {c.k: model_forward_flops(DiTClassifier(c.k, str(cfg.router.size), shape[1], shape[0], classes),
                                           shape, classes > 0) for c in configs if c.k > 1}
    router_batch = int(cfg.router.batch_size)

    def router_steps(budget: int) -> int:
        return max(1, round(float(p.router_steps_ratio) * budget))

    extra = {}
    for b in budgets:
        router_train = max([3 * f * router_batch * router_steps(b) for f in router_fwd.values()], default=0)
        extra[b] = math.ceil(router_train / (3 * expert_fwd * batch)) if p.monolith_matches_router else 0

    full_grid = budgets if str(p.strategies_at) == "all" else budgets[-1:]
    if str(p.strategies_at) not in ("all", "largest"):
        raise ValueError(f"paper.strategies_at={p.strategies_at!r} must be `all` or `largest`")
    notes = []
    runs = []
    for b in budgets:
        for c in configs:
            folder = Path(cfg.run_dir) / "runs" / f"{c.name}-s{b}"
            if c.k == 1:
                runs.append(Run(c, b, b + extra[b], batch, 0, ("top1",), False, folder))
                continue
            wanted = strategies if b in full_grid else ["top1"]
            ens = [s for s in wanted if s in STRATEGIES]
            if "topk" in ens and int(cfg.sample.top_k) >= c.k:
                # top-k of k experts is the full ensemble: evaluating it twice would only cost time
                ens.remove("topk")
                notes.append(f"{c.name}: sample.top_k={cfg.sample.top_k} >= K, so top-k equals `full`; not repeated")
            if "top1" not in ens:
                ens.insert(0, "top1")  # the training curves are drawn from top-1 rows
            cls = CLASS_EXPERT in wanted and classes > 0
            runs.append(Run(c, b, b, batch // c.k, router_steps(b), tuple(ens), cls, folder))
    if CLASS_EXPERT in strategies and classes == 0:
        notes.append("the data has no class labels: the fixed per-class expert is skipped")
    return Plan(configs, runs, expert_fwd, router_fwd, extra, list(dict.fromkeys(notes)))


# ---- configs of each step ------------------------------------------------------------------------

def derive(cfg, **changes) -> DictConfig:
    """A copy of ``cfg`` with dotted keys replaced, e.g. ``derive(cfg, **{"cluster.k": 4})``."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in changes.items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def data_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "data-run"


def clustering_dir(cfg, config: Config) -> Path:
    return Path(cfg.run_dir) / "clusterings" / config.name


def clustering_cfg(cfg, config: Config) -> DictConfig:
    return derive(cfg, run_dir=str(clustering_dir(cfg, config)), **{"cluster.method": config.method,
                                                                    "cluster.k": config.k})


def run_cfg(cfg, r: Run) -> DictConfig:
    """The config every stage of run ``r`` sees."""
    return derive(clustering_cfg(cfg, r.config), run_dir=str(r.folder), **{
        "expert.batch_size": r.expert_batch, "expert.steps": r.expert_steps,
        "router.steps": max(1, r.router_steps), "eval.strategies": list(r.strategies),
        "eval.fm_loss.strategies": list(r.strategies), "sample.experts": None})


def _link(target: Path, link: Path) -> None:
    """A relative symlink ``link -> target`` (kept when it already points there)."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link to {target}: remove it or use another run_dir")
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(rel, link)


# ---- running ---------------------------------------------------------------------------------------

def prepare_data(cfg, plan: Plan) -> None:
    """prepare (and embed, when a configuration clusters by embedding) once, into data-run/."""
    dcfg = derive(cfg, run_dir=str(data_dir(cfg)))
    run_stage("prepare", dcfg)
    if any(c.method != "random" for c in plan.configs):
        run_stage("embed", dcfg)


def prepare_clustering(cfg, config: Config) -> None:
    ccfg = clustering_cfg(cfg, config)
    folder, source = Path(ccfg.run_dir), RunDir(data_dir(cfg))
    _link(source.data, RunDir(folder).data)
    if source.embeddings_manifest.exists():
        _link(source.embeddings, RunDir(folder).embeddings)
    run_stage("cluster", ccfg)
    run_stage("partition", ccfg)


def train_run(cfg, r: Run) -> None:
    """Link the shared artefacts into the run's folder, then train its experts and router."""
    rcfg = run_cfg(cfg, r)
    rd, shared = RunDir(r.folder), RunDir(clustering_dir(cfg, r.config))
    for name in ("data", "embeddings", "clusters", "partitions"):
        if (shared.root / name).exists():
            _link(shared.root / name, rd.root / name)
    for k in range(r.config.k):
        run_stage("train-expert", derive(rcfg, **{"expert.id": k}))
    if r.config.k > 1:
        run_stage("train-router", rcfg)
    else:
        write_constant_router(rcfg)


def write_constant_router(cfg) -> dict:
    """router.pt for K = 1: a one-output router, which is the constant 1 whatever its weights; 0 training FLOPs."""
    from ddm.flow import flow_path_from_config
    from ddm.stages.train_router import load_partitions
    from ddm.train.export import save_weights

    rd = RunDir(cfg.run_dir)
    if rd.router_record.exists() and rd.router_weights.exists():
        return read_json(rd.router_record)
    index, manifests = load_partitions(rd)
    if len(manifests) != 1:
        raise ValueError(f"{rd.partitions} has {len(manifests)} partitions; a constant router is for K = 1 only")
    meta = manifests[0]
    shape = (int(meta["channels"]), int(meta["image_size"]), int(meta["image_size"]))
    net = DiTClassifier(1, str(cfg.router.size), shape[1], shape[0], int(meta["num_classes"]))
    flow = flow_path_from_config(OmegaConf.to_container(cfg.flow, resolve=True)).config()
    save_weights(rd.router_weights, "router", net, flow, num_experts=1, clustering_id=index["clustering_id"], steps=0)
    record = dict(num_experts=1, clustering_id=index["clustering_id"], steps=0, batch_size=0, samples_seen=0,
                  train_flops=0, forward_flops_per_sample=model_forward_flops(net, shape, int(meta["num_classes"]) > 0),
                  note="K = 1: softmax over one logit is 1 for every input, so this router is untrained and costs "
                       "no training FLOPs; the monolith's sampling FLOPs leave it out (single_model)")
    write_json(rd.router_record, record)
    return record


def evaluate_run(cfg, r: Run) -> tuple[dict, dict | None]:
    """The evaluate stage's metrics (its own skip check applies) and the fixed per-class expert's, if asked."""
    rcfg = run_cfg(cfg, r)
    metrics = run_stage("evaluate", rcfg)
    return metrics, (evaluate_class_expert(rcfg) if r.class_expert else None)


# ---- the fixed per-class expert ------------------------------------------------------------------

class ClassRouter(nn.Module):
    """A router that ignores x_t and t: label c goes to ``expert_of_class[c]`` (one-hot logits).

    Wrapped in an ``Ensemble`` with strategy ``top1`` it runs exactly that expert
    on its samples, with the ensemble's sparse execution and guidance. The null
    label (unconditional) goes to ``fallback``.
    """

    def __init__(self, expert_of_class: list[int], num_experts: int, fallback: int):
        super().__init__()
        self.num_outputs = int(num_experts)
        self.register_buffer("table", torch.tensor([*expert_of_class, fallback], dtype=torch.long))

    def forward(self, x, t, y=None):
        null = len(self.table) - 1
        y = torch.full((x.shape[0],), null, device=x.device) if y is None else y.clamp(0, null)
        chosen = nn.functional.one_hot(self.table[y], self.num_outputs).to(x.dtype)
        return (chosen - 1.0) * 1e9  # 0 for the chosen expert, -1e9 elsewhere: a softmax of exactly one-hot


def expert_of_class(rd: RunDir, num_experts: int, num_classes: int) -> tuple[list[int], list[list[int]]]:
    """For each class, the cluster with most of its training images (from the partition manifests)."""
    counts = np.zeros((num_experts, num_classes), dtype=np.int64)
    for k in range(num_experts):
        for c, n in (load_manifest(rd.partition(k)).get("class_counts") or {}).items():
            if 0 <= int(c) < num_classes:
                counts[k, int(c)] = int(n)
    return counts.argmax(axis=0).tolist(), counts.tolist()


def evaluate_class_expert(cfg) -> dict:
    """FD, precision, recall, FM loss and sampling FLOPs of the fixed per-class expert, cached by settings.

    Uses the evaluate stage's own context, so the held-out subset, the generated
    labels, the prior noise and the feature net are those of the other rows.
    """
    from ddm.stages import evaluate

    rd = RunDir(cfg.run_dir)
    target = evaluate.evaluation_dir(rd) / f"{CLASS_EXPERT}.json"
    settings = evaluate.settings_of(cfg)
    if target.exists() and not cfg.get("redo", False):
        cached = read_json(target)
        if cached.get("settings") == settings:
            return cached
    start = time.perf_counter()
    ctx = _class_expert_context(evaluate)(
        derive(cfg, **{"eval.fm_loss.strategies": [CLASS_EXPERT], "eval.fm_loss.per_expert": False}), rd, settings)
    generated = ctx.generated(CLASS_EXPERT)
    net, info = ctx.feature_net()
    classify = (lambda x: fnet.predict(net.net, x, ctx.batch)) if info["target"] == "class" else None
    quality = ctx.quality(lambda x: fnet.features(net.net, x, ctx.batch), {CLASS_EXPERT: generated},
                          classify=classify)
    fm = ctx.fm_loss()["models"][f"ensemble-{CLASS_EXPERT}"]
    sc = ctx.sc
    expert_mean = float(np.mean([v for k, v in ctx.forward.items() if k != "router"]))
    sampling = sampling_flops_per_image(expert_mean, 0, "top1", steps=int(sc["steps"]), solver=sc["solver"],
                                        cfg_scale=float(sc["cfg_scale"]), conditional=ctx.conditional,
                                        num_experts=ctx.base.num_experts, top_k=int(sc["top_k"]))
    result = dict(settings=settings, feature_space=net.space, expert_of_class=ctx.table,
                  class_counts=ctx.class_counts, quality=quality["strategies"][CLASS_EXPERT], fm_loss=fm,
                  sampling=sampling, generated=generated["source"], wall_s=round(time.perf_counter() - start, 2))
    write_json(target, result)
    log.info("paper table: %s fixed per-class expert %s: FD %.4g (%s) -> %s", rd.root.name, ctx.table,
             result["quality"]["fd"], net.space, target)
    return read_json(target)


def _class_expert_context(evaluate):
    """The evaluate stage's context with one more strategy, ``class_expert``, built on its loaded experts."""

    class ClassExpertContext(evaluate.EvaluationContext):
        def __init__(self, cfg, rd, settings):
            super().__init__(cfg, rd, settings, redo=False)
            K = self.base.num_experts
            self.table, self.class_counts = expert_of_class(rd, K, self.num_classes)
            largest = int(np.argmax(np.sum(self.class_counts, axis=1)))
            self.class_router = ClassRouter(self.table, K, fallback=largest).to(self.device)

        def ensemble(self, strategy: str) -> Ensemble:
            if strategy != CLASS_EXPERT:
                return super().ensemble(strategy)
            experts = {int(k): m for k, m in self.base.experts.items()}
            return Ensemble(experts, self.class_router, strategy="top1", num_experts=self.base.num_experts).eval()

        def forward_per_call(self, strategy):
            # one expert and no router network: the cost of a single model
            return super().forward_per_call(None if strategy == CLASS_EXPERT else strategy)

    return ClassExpertContext


# ---- rows ------------------------------------------------------------------------------------------

def rows_of(r: Run, metrics: dict, class_metrics: dict | None, root: Path) -> list[dict]:
    """One table row per strategy of run ``r``, from its metrics."""
    name, space = next((n, s) for n, s in metrics["feature_spaces"].items() if n.startswith("classifier:"))
    fl = metrics["flops"]
    jobs = fl["train"]["jobs"]
    router = jobs.get("router", {}).get("flops") or 0
    experts = sum(j["flops"] for k, j in jobs.items() if k.startswith("expert-"))
    common = dict(config=r.config.name, k=r.config.k, partition=r.config.partition, budget=r.budget,
                  expert_steps=r.expert_steps, expert_batch=r.expert_batch, router_steps=r.router_steps,
                  train_flops=experts + router, train_flops_experts=experts, train_flops_router=router,
                  router_share=router / (experts + router) if experts + router else None,
                  feature_space=name, run_dir=os.path.relpath(r.folder, root))
    rows = []
    for s in r.rows:
        if s == CLASS_EXPERT:
            q, fm, sampling = class_metrics["quality"], class_metrics["fm_loss"], class_metrics["sampling"]
            if class_metrics["feature_space"] != name:
                raise ValueError(f"{r.folder}: the fixed per-class expert was measured in "
                                 f"{class_metrics['feature_space']}, the other rows in {name}")
        else:
            key = "top1" if s == SINGLE else s
            q, fm = space["strategies"][key], metrics["fm_loss"]["models"].get(f"ensemble-{key}", {})
            sampling = fl["sampling"]["single_model" if s == SINGLE else key]
        rows.append(dict(common, strategy=s, sampling_flops_per_image=sampling["per_image"],
                         fd=q["fd"], precision=q["precision"], recall=q["recall"],
                         classifier_accuracy=q.get("classifier_accuracy"), num_generated=q["num_generated"],
                         fm_loss=fm.get("mean")))
    return rows


def run_wall_s(r: Run, metrics: dict, class_metrics: dict | None) -> float:
    """Wall time spent on one run: its training jobs' timing files plus its evaluations."""
    rd = RunDir(r.folder)
    train = sum(t["wall_s"] for job, t in rd.all_timings().items() if job.startswith(("train-expert", "train-router")))
    return round(train + float(metrics.get("wall_s", 0)) + float((class_metrics or {}).get("wall_s", 0)), 1)


def prep_wall_s(cfg, plan: Plan) -> float:
    """Wall time of prepare, embed, and every configuration's cluster and partition stages."""
    folders = [data_dir(cfg)] + [clustering_dir(cfg, c) for c in plan.configs]
    return round(sum(t["wall_s"] for f in folders for t in RunDir(f).all_timings().values()), 1)


# ---- the estimate ----------------------------------------------------------------------------------

def _device(cfg) -> torch.device:
    """Where the training jobs will run: the island's GPU when there is one, else the CPU."""
    gpu = str(cfg.island.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``fn()`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def _inputs(batch: int, shape, classes: int, device):
    x, t = torch.randn(batch, *shape, device=device), torch.rand(batch, device=device)
    return x, t, (torch.randint(0, classes, (batch,), device=device) if classes else None)


def _train_step_s(model: nn.Module, batch: int, shape, classes: int, device, bf16: bool, repeats: int = 3) -> float:
    """Seconds of one forward + backward + AdamW step at ``batch``."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = _inputs(batch, shape, classes, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t, y).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _timed(step, device, repeats)


def _forward_s_per_image(model: nn.Module, batch: int, shape, classes: int, device) -> float:
    model = model.to(device).eval()
    x, t, y = _inputs(batch, shape, classes, device)
    with torch.no_grad():
        return _timed(lambda: model(x, t, y), device, 1) / batch


def estimate(cfg, plan: Plan) -> dict:
    """A rough wall-time estimate of what is left to do, from a few timed steps on this machine."""
    torch.manual_seed(0)
    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    classes, rb = int(cfg.data.num_classes), int(cfg.router.batch_size)
    device = _device(cfg)
    bf16 = device.type == "cuda" and str(cfg.island.precision).startswith("bf16")
    expert = DiT(str(cfg.model.size), shape[1], shape[0], classes)
    step_s = {b: _train_step_s(expert, b, shape, classes, device, bf16) * TRAINER_FACTOR
              for b in sorted({r.expert_batch for r in plan.runs})}
    router_s = TRAINER_FACTOR * _train_step_s(DiTClassifier(2, str(cfg.router.size), shape[1], shape[0], classes),
                                              rb, shape, classes, device, bf16)
    fwd_s = _forward_s_per_image(expert, min(1024, 2 * int(cfg.sample.batch_size)), shape, classes, device)
    del expert
    sc, ec = cfg.sample, cfg.eval
    calls = num_evaluations(int(sc.steps), str(sc.solver))
    cfg_factor = 2 if classes and float(sc.cfg_scale) != 1.0 else 1
    n, fm_n = int(ec.num_samples), len(ec.fm_loss.t_grid) * int(ec.fm_loss.num_samples)

    train = evaluation = 0.0
    for r in plan.runs:
        rd = RunDir(r.folder)
        for k in range(r.config.k):
            if not rd.expert_record(k).exists():
                train += r.expert_steps * step_s[r.expert_batch] + JOB_OVERHEAD_S
        if r.config.k > 1 and not rd.router_record.exists():
            train += r.router_steps * router_s + JOB_OVERHEAD_S
        if (rd.root / "evaluation" / "metrics.json").exists():
            continue
        for s in r.rows:
            experts = 1 if s in (SINGLE, CLASS_EXPERT) else EXPERTS_PER_CALL[s](r.config.k, int(sc.top_k))
            evaluation += (n * calls * cfg_factor + fm_n) * experts * fwd_s
        evaluation += EVAL_OVERHEAD_S
    data = 0.0 if RunDir(data_dir(cfg)).data_manifest.exists() else DATA_S
    data += sum(CLUSTERING_S for c in plan.configs if not RunDir(clustering_dir(cfg, c)).cluster_report.exists())
    feature = float(ec.feature_net.steps) * 0.1  # unknown until the data exists: about 0.1 s per step here
    total = train + evaluation + data + feature
    return dict(total_s=round(total), train_s=round(train), eval_s=round(evaluation), data_s=round(data),
                feature_net_s=round(feature), device=str(device), expert_step_s={str(b): round(s, 4) for b, s in step_s.items()},
                router_step_s=round(router_s, 4), forward_s_per_image=round(fwd_s, 6))


# ---- outputs ---------------------------------------------------------------------------------------

STRATEGY_LABELS = {SINGLE: "single model", "top1": "top-1", "full": "full ensemble",
                   "sample": "sample one per step", CLASS_EXPERT: "fixed per-class expert"}


def strategy_label(s: str, top_k: int) -> str:
    return f"top-{top_k}" if s == "topk" else STRATEGY_LABELS.get(s, s)


def _num(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _delta(x, ref) -> str:
    if x is None or ref in (None, 0):
        return ""
    return f" ({100 * (x - ref) / ref:+.0f}%)"


def _pivot(rows: list[dict], budgets: list[int], configs: list[str], key: str, show_flops: bool) -> list[str]:
    """Budgets down, configurations across: the top-1 (monolith: single-model) value of ``key`` and its change."""
    by = {(r["config"], r["budget"]): r for r in rows if r["strategy"] in (SINGLE, "top1")}
    table = []
    for b in budgets:
        mono = by.get(("monolith", b), {}).get(key)
        cells = []
        for c in configs:
            r = by.get((c, b))
            if r is None:
                cells.append("-")
                continue
            cell = _num(r[key]) + ("" if c == "monolith" else _delta(r[key], mono))
            cells.append(cell + (f"<br>{fmt_flops(r['train_flops'])}" if show_flops else ""))
        table.append([b] + cells)
    return _md_table(["budget (steps)"] + configs, table)


def render_table(results: dict) -> str:
    """table.md: settings, the comparison at equal FLOPs per budget, strategies, then every row."""
    s, rows, top_k = results["settings"], results["rows"], results["settings"]["sampler"]["top_k"]
    budgets = sorted({r["budget"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    space = rows[0]["feature_space"] if rows else "-"
    sampler = s["sampler"]
    lines = [f"# Paper table: {s['name']}", "",
             f"Data: `{s['data']}` ({s['num_train_images']} training images); experts `{s['model']}`, router "
             f"`{s['router']}`; monolith batch {s['monolith_batch']}, each of K experts at batch "
             f"{s['monolith_batch']} / K for the same steps.", "",
             f"Sampler, the same for every row: {sampler['solver']}, {sampler['steps']} steps, guidance scale "
             f"{sampler['cfg_scale']}, {s['num_samples']} generated images per row against {s['num_real']} "
             f"held-out images, seed {s['seed']}.", "",
             f"FD, precision and recall are measured in `{space}`: the penultimate features of a small classifier "
             f"trained on the training split (held-out accuracy {_num(s.get('feature_net_accuracy'), '.3f')}); "
             f"not Inception FID. Training images score FD {_num(s.get('reference_fd'))} against the same held-out "
             f"images (the floor at this sample size). FM loss: held-out flow-matching loss "
             f"({s['fm_loss_images']} images x {s['fm_loss_t']} values of t).", "",
             f"Training FLOPs = 3 x forward x samples seen, experts plus router. {s['flops_note']}", ""]

    lines += ["## Top-1 DDM against the monolith", "",
              "FD (lower is better) and its change against the monolith of the same budget; each run's training "
              "FLOPs below it.", ""]
    lines += _pivot(rows, budgets, configs, "fd", show_flops=True)
    lines += ["Held-out flow-matching loss (lower is better) of the same models:", ""]
    lines += _pivot(rows, budgets, configs, "fm_loss", show_flops=False)

    by = {(r["config"], r["budget"], r["strategy"]): r for r in rows}
    full = sorted({r["budget"] for r in rows if r["strategy"] not in (SINGLE, "top1")})
    for b in full:
        present = {r["strategy"] for r in rows if r["budget"] == b and r["strategy"] != SINGLE}
        strategies = [st for st in KNOWN_STRATEGIES if st in present]  # one fixed column order
        lines += [f"## Routing strategies at {b} steps", "",
                  "FD, held-out FM loss, then sampling FLOPs per image. The monolith: "
                  + ", ".join(f"FD {_num(r['fd'])}, FM loss {_num(r['fm_loss'])} at "
                              f"{fmt_flops(r['sampling_flops_per_image'])}/image"
                              for r in rows if r["budget"] == b and r["strategy"] == SINGLE) + ".", ""]
        table = []
        for c in configs:
            if c == "monolith":
                continue
            cells = [(lambda r: "-" if r is None else
                      f"{_num(r['fd'])}<br>FM {_num(r['fm_loss'])}<br>{fmt_flops(r['sampling_flops_per_image'])}")
                     (by.get((c, b, st)))
                     for st in strategies]
            table.append([c] + cells)
        lines += _md_table(["configuration"] + [strategy_label(st, top_k) for st in strategies], table)

    lines += ["## Every row", ""]
    header = ["configuration", "K", "partition", "budget (steps)", "expert steps x batch", "router steps",
              "strategy", "training FLOPs (router share)", "sampling FLOPs/image", "FD", "precision", "recall",
              "class acc.", "FM loss"]
    table = [[r["config"], r["k"], r["partition"], r["budget"], f"{r['expert_steps']} x {r['expert_batch']}",
              r["router_steps"] or "-", strategy_label(r["strategy"], top_k),
              f"{fmt_flops(r['train_flops'])} ({_num(100 * r['router_share'] if r['router_share'] else 0, '.1f')}%)",
              fmt_flops(r["sampling_flops_per_image"]), _num(r["fd"]), _num(r["precision"], ".3f"),
              _num(r["recall"], ".3f"), _num(r["classifier_accuracy"], ".3f"), _num(r["fm_loss"])] for r in rows]
    lines += _md_table(header, table)
    lines += [f"Notes: {' '.join(s['notes'])}" if s["notes"] else "",
              "", "![training FLOPs](train_flops.png)", "", "![sampling FLOPs](sampling_flops.png)", "",
              f"Hardware: {s['hardware']}. Wall time of the work in the table: {results['wall_s_work']:.0f} s "
              f"(data preparation and clustering {results.get('wall_s_prep', 0):.0f} s, then training and evaluation "
              f"summed over runs; timings.json has the last invocation's).", ""]
    return "\n".join(lines)


METRICS = (("fd", "FD, classifier space (lower is better)"), ("precision", "precision"), ("recall", "recall"),
           ("fm_loss", "held-out FM loss (lower is better)"))


def config_colours(configs: list[str]) -> dict[str, str]:
    """One colour per configuration, the same in both plots: the monolith black, the others matplotlib's cycle."""
    others = [c for c in configs if c != "monolith"]
    return {c: ("black" if c == "monolith" else f"C{others.index(c)}") for c in configs}


def flops_ticks(values, max_ticks: int = 8) -> list[float]:
    """The x ticks of a log FLOPs axis: the points' own values, dropping any too close to the last kept.

    Matplotlib's log ticks label a narrow range (3.1-3.4 GFLOPs) with overlapping minor labels, or not at all.
    "Too close" is an eighth of the range in log space (at least 3%), so labels never overlap.
    """
    values = sorted(set(values))
    if not values:
        return []
    min_ratio = max(1.03, (values[-1] / values[0]) ** (1 / max_ticks))
    ticks: list[float] = []
    for v in values:
        if not ticks or v / ticks[-1] >= min_ratio:
            ticks.append(v)
    return ticks


def _flops_axis(ax, values, label: str) -> None:
    """A log x axis labelled at the plotted FLOP counts, in readable units, with no minor labels."""
    from matplotlib.ticker import NullFormatter, NullLocator
    ax.set_xscale("log")
    ticks = flops_ticks(values)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [fmt_flops(v).replace("FLOPs", "") for v in ticks])  # "3.14 G", "12.8 T"
    if len(ticks) == 1:  # a lone point: widen the view so the axis does not collapse
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    ax.set_xlabel(label)


def plot_train_flops(rows: list[dict], path: Path) -> None:
    """Each metric against training FLOPs, one line per configuration (top-1 rows; the monolith's single model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    colours = config_colours(configs)
    for ax, (key, label) in zip(axes, METRICS):
        for c in configs:
            pts = sorted((r["train_flops"], r[key]) for r in rows
                         if r["config"] == c and r["strategy"] in (SINGLE, "top1") and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, color=colours[c], lw=2 if c == "monolith" else 1.5,
                        ls="--" if c.startswith("random") else "-")
        _flops_axis(ax, [r["train_flops"] for r in rows if r["train_flops"]], "training FLOPs (experts + router)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


MARKERS = {SINGLE: "*", "top1": "o", "topk": "s", "full": "D", "sample": "v", CLASS_EXPERT: "P"}


def plot_sampling_flops(rows: list[dict], path: Path, top_k: int) -> None:
    """FD and FM loss against sampling FLOPs per image at the largest budget: colour = configuration, marker = strategy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = max(r["budget"] for r in rows)
    rows = [r for r in rows if r["budget"] == budget]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    colours = config_colours(configs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (METRICS[0], METRICS[3])):
        for r in rows:
            if r[key] is not None:
                ax.scatter(r["sampling_flops_per_image"], r[key], color=colours[r["config"]],
                           marker=MARKERS.get(r["strategy"], "o"), s=90 if r["strategy"] == SINGLE else 45)
        _flops_axis(ax, [r["sampling_flops_per_image"] for r in rows if r["sampling_flops_per_image"]],
                    "sampling FLOPs per image")
        ax.set_title(f"{label} at {budget} steps")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colours[c], marker="o", ls="", label=c) for c in configs]
    present = {r["strategy"] for r in rows}
    strategies = [st for st in (SINGLE, *KNOWN_STRATEGIES) if st in present]
    handles += [Line2D([], [], color="grey", marker=MARKERS.get(s, "o"), ls="", label=strategy_label(s, top_k))
                for s in strategies]
    axes[1].legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it; True when written (a rerun leaves mtimes alone)."""
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def settings_summary(cfg, plan: Plan, first: dict) -> dict:
    """What every row shares: data, networks, sampler, evaluation sizes, seeds, FLOP accounting, hardware."""
    p, sc, ec = cfg.paper, cfg.sample, cfg.eval
    space = next(v for n, v in first["feature_spaces"].items() if n.startswith("classifier:"))
    extra = ", ".join(f"{b}: +{e}" for b, e in plan.monolith_extra_steps.items())
    flops_note = (f"The monolith trains extra steps that cost the router's training FLOPs (budget: extra steps "
                  f"{extra}), so at each budget it spends at least as much as every DDM."
                  if p.monolith_matches_router else
                  "The monolith trains exactly the budget's steps: a DDM spends its router's FLOPs on top.")
    return dict(name=str(cfg.get("name")), data=str(cfg.data.source), num_train_images=_train_images(cfg),
                model=str(cfg.model.size), router=str(cfg.router.size), monolith_batch=int(p.monolith_batch),
                budgets=sorted(int(b) for b in p.budgets), router_steps_ratio=float(p.router_steps_ratio),
                router_batch=int(cfg.router.batch_size), ks=list(p.ks), random_ks=list(p.random_ks),
                clustering=str(p.clustering), strategies=[str(s) for s in p.strategies],
                strategies_at=str(p.strategies_at),
                sampler=dict(solver=str(sc.solver), steps=int(sc.steps), cfg_scale=float(sc.cfg_scale),
                             top_k=int(sc.top_k), temperature=float(sc.temperature)),
                num_samples=int(ec.num_samples), num_real=space["num_real"],
                fm_loss_images=int(ec.fm_loss.num_samples), fm_loss_t=len(ec.fm_loss.t_grid),
                seed=int(cfg.seed), eval_seed=int(ec.seed), feature_net_accuracy=space.get("test_accuracy"),
                reference_fd=space["reference_training_images"]["fd"], flops_note=flops_note,
                expert_forward_flops=plan.expert_forward,
                router_forward_flops={str(k): v for k, v in plan.router_forward.items()},
                monolith_extra_steps={str(b): e for b, e in plan.monolith_extra_steps.items()},
                hardware=hardware_line(plan), notes=plan.notes)


def _train_images(cfg) -> int | None:
    path = RunDir(data_dir(cfg)).data_manifest
    return int(read_json(path)["num_samples"]) if path.exists() else None


def hardware_line(plan: Plan) -> str:
    """The machine, with the torch threads and GPUs the training jobs recorded (not those of this process)."""
    recorded = [read_json(RunDir(r.folder).expert_record(k)).get("hardware") or {}
                for r in plan.runs for k in range(r.config.k) if RunDir(r.folder).expert_record(k).exists()]
    threads = sorted({h.get("cpu_threads") for h in recorded if h.get("cpu_threads")})
    gpus = sorted({h["gpu"] for h in recorded if h.get("gpu")})
    cpu = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
           f"{torch.__version__}, training with {'/'.join(map(str, threads)) or '?'} torch thread(s)")
    return f"{', '.join(gpus)} GPU, {cpu}" if gpus else f"no GPU, {cpu}"


def write_outputs(cfg, plan: Plan, results: dict) -> dict:
    """table.md, results.json and the two plots in the table's folder (rewritten only on a change)."""
    root = Path(cfg.run_dir)
    changed = _write_if_changed(root / "results.json", _json_text(results))
    _write_if_changed(root / "table.md", render_table(results))
    plots = dict(train=root / "train_flops.png", sampling=root / "sampling_flops.png")
    if changed or not all(p.exists() for p in plots.values()):
        plot_train_flops(results["rows"], plots["train"])
        plot_sampling_flops(results["rows"], plots["sampling"], int(cfg.sample.top_k))
    return dict(table=str(root / "table.md"), results=str(root / "results.json"),
                **{f"plot_{k}": str(v) for k, v in plots.items()})


def _json_text(obj) -> str:
    import json
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


# ---- entry point -----------------------------------------------------------------------------------

def describe(plan: Plan) -> str:
    lines = [f"{len(plan.runs)} trained runs, {sum(len(r.rows) for r in plan.runs)} table rows:"]
    for r in plan.runs:
        router = f", router {r.router_steps} steps" if r.router_steps else ""
        lines.append(f"  {r.name:<22} {r.config.k} x ({r.expert_steps} steps at batch {r.expert_batch}){router}; "
                     f"rows: {', '.join(r.rows)}")
    return "\n".join(lines + plan.notes)


def run(cfg) -> dict:
    """Train and evaluate the grid of ``cfg.paper``; write table.md, results.json and plots into ``cfg.run_dir``.

    Prints the plan and an estimate of the time left first. ``paper.dry_run=true``
    stops after that. Returns the output paths, the rows and the wall time.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)  # island.threads is for this table's work, not for the caller's process


def _run(cfg) -> dict:
    if cfg.island.get("threads"):
        # before the estimate and the in-process evaluation, not only inside the training jobs: on a shared
        # machine, more threads than free cores slow every step several times over
        torch.set_num_threads(int(cfg.island.threads))
    plan = make_plan(cfg)
    root = Path(cfg.run_dir)
    log.info("paper table -> %s\n%s", root, describe(plan))
    est = estimate(cfg, plan) if _paper(cfg).get("estimate", True) else None
    if est:
        log.info("paper table: estimated time left %.0f min (training %.0f, evaluation %.0f, data %.0f, feature "
                 "net %.0f s; from timed steps: expert %s s/step by batch, router %s s/step)", est["total_s"] / 60,
                 est["train_s"], est["eval_s"], est["data_s"], est["feature_net_s"], est["expert_step_s"],
                 est["router_step_s"])
    if _paper(cfg).get("dry_run", False):
        return dict(plan=describe(plan), estimate=est)

    start = time.perf_counter()
    prepare_data(cfg, plan)
    for config in plan.configs:
        prepare_clustering(cfg, config)
    rows, per_run, first = [], {}, None
    prep_s = prep_wall_s(cfg, plan)
    for i, r in enumerate(plan.runs):
        log.info("paper table: [%d/%d] %s", i + 1, len(plan.runs), r.name)
        train_run(cfg, r)
        metrics, class_metrics = evaluate_run(cfg, r)
        first = first or metrics
        rows += rows_of(r, metrics, class_metrics, root)
        per_run[r.name] = dict(wall_s=run_wall_s(r, metrics, class_metrics), run_dir=os.path.relpath(r.folder, root))
    results = dict(settings=settings_summary(cfg, plan, first), rows=rows, runs=per_run,
                   wall_s_prep=prep_s, wall_s_work=round(prep_s + sum(v["wall_s"] for v in per_run.values()), 1))
    outputs = write_outputs(cfg, plan, results)
    wall = round(time.perf_counter() - start, 1)
    write_json(root / "timings.json", dict(last_invocation_wall_s=wall, estimate=est,
                                           work_wall_s=results["wall_s_work"], runs=per_run))
    log.info("paper table: %d rows in %.0f s -> %s", len(rows), wall, outputs["table"])
    return dict(outputs, rows=rows, wall_s=wall, estimate=est)
