"""The grid of the table: its configurations, its runs, and the training steps that make their FLOPs equal."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ddm.ensemble import ROUTING_DEFAULTS, STRATEGIES, check_routing
from ddm.errors import BadInput, MissingConfig
from ddm.eval.flops import model_forward_flops
from ddm.models.dit import DiT, DiTClassifier
from ddm.routing_schedule import check_strategy, is_strategy
from ddm.sampling.draw import DISTILLED
from ddm.settings import Settings

from .cluster_routed import cluster_routed_label, is_cluster_routed
from .mixed import mixed_name, mixed_targets
from .sweep_options import cfg_scales

CLASS_EXPERT = "class_expert"  # the fixed per-class expert baseline
SEPARATE_CFG = "top1_separate_cfg"  # top-1 with guidance's null input routed on its own (sample.cfg_routing=separate)
SINGLE = "single"  # the strategy label of a monolith row (one model, no router)
# DISTILLED: the run's experts distilled into one student (`ddm distill`, cfg.distill), one model, no router
KNOWN_STRATEGIES = (*STRATEGIES, SEPARATE_CFG, CLASS_EXPERT, DISTILLED)
# Rows evaluated beside the evaluate stage, each cached in evaluation/<label>.json (and the cluster-routed rows,
# clusters-<strategy>, between the two).
EXTRA_ROWS = (SEPARATE_CFG, CLASS_EXPERT)


def row_label(label) -> str:
    """A ``paper.strategies`` entry checked, in its one spelling: a known label, a strategy or a schedule of them
    (``full:0.6:top1``), or ``clusters-<strategy>`` (routed by the run's clusters, no trained router)."""
    label = str(label).strip()
    if label in KNOWN_STRATEGIES:
        return label
    if is_cluster_routed(label):
        return cluster_routed_label(label)
    if is_strategy(label):
        return check_strategy(label, key="paper.strategies")
    raise BadInput(
        f"paper.strategies: {label!r} is not one of {KNOWN_STRATEGIES}, a schedule of strategies over t such as "
        f"'full:0.6:top1', or clusters-<strategy> (routed by the run's clusters, e.g. clusters-sample)"
    )


def ordered_rows(labels) -> list[str]:
    """Row labels in one order: the known strategies in theirs, then schedules and cluster-routed rows as given."""
    labels = list(dict.fromkeys(labels))
    return [s for s in KNOWN_STRATEGIES if s in labels] + [s for s in labels if s not in KNOWN_STRATEGIES]


@dataclass(frozen=True)
class Config:
    """One way to split the data: the monolith (K = 1), or K clustered or random experts."""

    name: str
    method: str  # cluster.method: two_stage | flat | random
    k: int
    targets: tuple[str, ...] = ()  # a mixed-kind DDM: each expert's expert.target (paper.mixed_targets)

    @property
    def clustering(self) -> str:
        """The name of its clustering's folder: a mixed-kind DDM shares the clustered DDM's of its K."""
        return f"clustered-k{self.k}" if self.targets else self.name

    @property
    def partition(self) -> str:
        if self.k == 1:
            return "-"
        return "random" if self.method == "random" else "clustered"


@dataclass(frozen=True)
class Run:
    """One configuration trained at one budget, and what is evaluated on it."""

    config: Config
    budget: int  # the nominal steps of the row (the x of the training curves)
    expert_steps: int  # = budget, plus the router-matching extra for the monolith
    expert_batch: int  # monolith batch / K
    router_steps: int  # 0 for K = 1 (no router is trained)
    strategies: tuple[str, ...]  # ensemble strategies the evaluate stage computes (and `distilled`)
    class_expert: bool  # also evaluate the fixed per-class expert
    folder: Path
    separate_cfg: bool = False  # also evaluate top-1 with separately routed guidance
    cfg_sweep: tuple[float, ...] = ()  # guidance scales its top-1 (monolith: its one model) is also sampled at
    router_from: Path | None = None  # the run whose router it uses (a mixed-kind DDM: the clustered one's)
    cluster_routed: tuple[str, ...] = ()  # clusters-<strategy> rows: routed by the run's clusters, no trained router

    @property
    def name(self) -> str:
        return f"{self.config.name}-s{self.budget}"

    @property
    def rows(self) -> tuple[str, ...]:
        """The strategy label of each table row this run gives."""
        if self.config.k == 1:
            return (SINGLE,)
        return self.strategies + tuple(label for label in self.extra_rows)

    @property
    def extra_rows(self) -> tuple[str, ...]:
        """The rows evaluated beside the evaluate stage (``EXTRA_ROWS``), in table order."""
        wanted = {SEPARATE_CFG: self.separate_cfg, CLASS_EXPERT: self.class_expert}
        first, last = ((label,) if wanted[label] else () for label in EXTRA_ROWS)
        return first + self.cluster_routed + last


@dataclass
class Plan:
    configs: list[Config]
    runs: list[Run]
    expert_forward: int  # FLOPs per sample of one expert forward
    router_forward: dict[int, int]  # K -> FLOPs per sample of the router forward
    monolith_extra_steps: dict[int, int]  # budget -> extra monolith steps (router FLOPs matched)
    notes: list[str] = field(default_factory=list)


def paper_grid(cfg: Settings) -> dict:
    """``cfg.paper``, the grid, or a one-line error naming the experiments that define it."""
    if cfg.paper is None:
        raise MissingConfig(
            "the config has no `paper` key: run with an experiment that defines the grid, e.g. "
            "experiment=paper_small (see conf/experiment/paper_small.yaml)"
        )
    return cfg.paper


def make_plan(cfg: Settings) -> Plan:
    """The configurations and runs of ``cfg.paper``, with the monolith's extra steps worked out."""
    p = paper_grid(cfg)
    batch = int(p["monolith_batch"])
    budgets = sorted({int(b) for b in p["budgets"]})
    strategies = list(dict.fromkeys(row_label(s) for s in p["strategies"]))
    if not budgets:
        raise BadInput("paper.budgets is empty: give the training budgets in steps, e.g. [200, 400, 800]")
    if cfg.sample.experts is not None:
        raise BadInput("sample.experts must be null for the paper table: every row uses all of its experts")
    if str(p["strategies_at"]) not in ("all", "largest"):
        raise BadInput(f"paper.strategies_at={p['strategies_at']!r} must be `all` or `largest`")
    # the routing options every row samples with: a bad one fails before hours of training, not after
    check_routing(**{k: getattr(cfg.sample, k) for k in ROUTING_DEFAULTS})

    configs = [Config("monolith", "random", 1)]
    configs += [Config(f"clustered-k{int(k)}", str(p["clustering"]), int(k)) for k in p["ks"]]
    mixed = mixed_targets(cfg)
    configs += [Config(mixed_name(mixed), str(p["clustering"]), len(mixed), mixed)] if mixed else []
    configs += [Config(f"random-k{int(k)}", "random", int(k)) for k in p["random_ks"]]
    for c in configs:
        if c.k < 1 or batch % c.k:
            raise BadInput(
                f"paper.monolith_batch={batch} must split evenly over K={c.k} experts "
                f"(each expert trains at batch B / K)"
            )

    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    classes = int(cfg.data.num_classes)
    expert_fwd = model_forward_flops(DiT(str(cfg.model.size), shape[1], shape[0], classes), shape, classes > 0)
    router_fwd = {
        c.k: model_forward_flops(
            DiTClassifier(c.k, str(cfg.router.size), shape[1], shape[0], classes), shape, classes > 0
        )
        for c in configs
        if c.k > 1
    }
    extra = {b: monolith_extra_steps(cfg, b, expert_fwd, router_fwd) for b in budgets}

    full_grid = budgets if str(p["strategies_at"]) == "all" else budgets[-1:]
    separate_note = _separate_cfg_skipped(cfg, classes)
    scales, sweep_note = cfg_scales(cfg, classes)
    notes = [sweep_note] if sweep_note else []
    runs = []
    for b in budgets:
        sweep = scales if b == budgets[-1] else ()
        for c in configs:
            folder = run_folder(cfg, c.name, b)
            if c.k == 1:
                runs.append(Run(c, b, b + extra[b], batch, 0, ("top1",), False, folder, cfg_sweep=sweep))
                continue
            if c.targets:  # the mixed-kind DDM: top-1 at the largest budget, with the clustered run's router
                if b == budgets[-1]:
                    shared = run_folder(cfg, c.clustering, b)
                    runs.append(
                        Run(c, b, b, batch // c.k, router_steps(cfg, b), ("top1",), False, folder, False, sweep, shared)
                    )
                continue
            wanted = strategies if b in full_grid else ["top1"]
            ens = [s for s in wanted if is_strategy(s)]
            if "topk" in ens and int(cfg.sample.top_k) >= c.k:
                # top-k of k experts is the full ensemble: evaluating it twice would only cost time
                ens.remove("topk")
                notes.append(f"{c.name}: sample.top_k={cfg.sample.top_k} >= K, so top-k equals `full`; not repeated")
            if "top1" not in ens:
                ens.insert(0, "top1")  # the training curves are drawn from top-1 rows
            ens += [DISTILLED] if DISTILLED in wanted else []  # the run's student, evaluated beside its ensemble
            cls = CLASS_EXPERT in wanted and classes > 0
            sep = SEPARATE_CFG in wanted and separate_note is None
            # the cluster router needs centroids: not on a random partition
            routed = tuple(s for s in wanted if is_cluster_routed(s)) if c.method != "random" else ()
            runs.append(
                Run(c, b, b, batch // c.k, router_steps(cfg, b), tuple(ens), cls, folder, sep, sweep, None, routed)
            )
    if any(is_cluster_routed(s) for s in strategies) and any(c.method == "random" for c in configs if c.k > 1):
        notes.append("random partitions have no centroids: their rows routed by the clusters are skipped")
    if CLASS_EXPERT in strategies and classes == 0:
        notes.append("the data has no class labels: the fixed per-class expert is skipped")
    if SEPARATE_CFG in strategies and separate_note:
        notes.append(separate_note)
    return Plan(configs, runs, expert_fwd, router_fwd, extra, list(dict.fromkeys(notes)))


def run_folder(cfg: Settings, config_name: str, budget: int) -> Path:
    """The folder of one configuration's run at one budget."""
    return Path(cfg.run_dir) / "runs" / f"{config_name}-s{budget}"


def _separate_cfg_skipped(cfg: Settings, classes: int) -> str | None:
    """Why the separately routed guidance row would repeat top-1 (then it is skipped), or None."""
    if not classes and str(cfg.text.kind) == "none":
        return "the data has no class labels (no guidance): the separate guidance routing row is skipped"
    if float(cfg.sample.cfg_scale) == 1.0:
        return "sample.cfg_scale=1 (no guidance): the separate guidance routing row equals top-1; skipped"
    if str(cfg.sample.cfg_routing) == "separate":
        return "sample.cfg_routing=separate: every row routes guidance separately; that row is not repeated"
    return None


def router_steps(cfg: Settings, budget: int) -> int:
    """The router's training steps at a budget: ``paper.router_steps_ratio`` of it, at least one."""
    return max(1, round(float(cfg.paper["router_steps_ratio"]) * budget))


def monolith_extra_steps(cfg: Settings, budget: int, expert_forward: int, router_forward: dict[int, int]) -> int:
    """Steps the monolith trains beyond ``budget`` so that it spends the largest router's training FLOPs too.

    Training FLOPs are 3 x forward x samples seen; the extra steps are rounded up, so
    the monolith never spends less than a DDM (0 unless ``paper.monolith_matches_router``).
    """
    if not cfg.paper["monolith_matches_router"]:
        return 0
    router_batch = int(cfg.router.batch_size)
    router_train = max([3 * f * router_batch * router_steps(cfg, budget) for f in router_forward.values()], default=0)
    return math.ceil(router_train / (3 * expert_forward * int(cfg.paper["monolith_batch"])))


def describe(plan: Plan) -> str:
    """The plan in a few lines: each run's experts, steps, batch, router and table rows."""
    lines = [f"{len(plan.runs)} trained runs, {sum(len(r.rows) for r in plan.runs)} table rows:"]
    for r in plan.runs:
        router = f", router {r.router_steps} steps" if r.router_steps else ""
        router = f", the router of {r.router_from.name}" if r.router_from else router
        kinds = f" (targets {', '.join(r.config.targets)})" if r.config.targets else ""
        sweep = f"; guidance sweep {', '.join(f'{s:g}' for s in r.cfg_sweep)}" if r.cfg_sweep else ""
        lines.append(
            f"  {r.name:<22} {r.config.k} x ({r.expert_steps} steps at batch {r.expert_batch}){kinds}{router}; "
            f"rows: {', '.join(r.rows)}{sweep}"
        )
    return "\n".join(lines + plan.notes)
