"""Try recipes for the demo: each is the whole pipeline with some overrides, evaluated on the same feature net.

    python scripts/demo_recipes.py baseline "conv16: model.conv_head=16" "heun10: sample.solver=heun sample.steps=10"

A recipe is ``name`` (the defaults) or ``"name: key=value ..."``. Each runs as
``runs/recipes/<name>`` (a finished stage is not run again, so a rerun only
prints), then ``ddm evaluate`` on ``--samples`` generated images, and one row
of a markdown table is printed per recipe: FD, precision and recall in the
evaluate stage's classifier feature space, the fraction of samples the feature
net gives the requested class (overall and for the worst class), the wall time
of the pipeline (from the run that did the work) and the sum of its stages'
(more than the pipeline's when experts train side by side), and the stages'
peak memory.
``--common`` overrides go to every recipe (e.g. ``island.threads=1`` on shared cores).
A recipe may start from another recipe's run, copied before the pipeline runs (its pipeline time is then
only what it ran itself; the stages' sum still counts the copied stages, from their timing files):

    base=<recipe>    everything trained: a change of sampling alone, e.g. "cfg3: base=baseline sample.cfg_scale=3"
    reuse=<recipe>   everything but the experts (data, clusters, partitions, router): a change of the experts alone
    data=<recipe>    the prepared data and its embeddings: a change of the clustering, the experts or the router

The evaluation measures only what the table reads: the held-out flow-matching loss and the
router's diagnostics run on few images (``--full-eval`` keeps the evaluate stage's defaults).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddm.artifacts import RunDir  # noqa: E402
from ddm.config import settings  # noqa: E402
from ddm.io import read_json, write_json  # noqa: E402
from ddm.stages import pipeline  # noqa: E402
from ddm.stages.runner import run_stage  # noqa: E402

# What each way of starting from another recipe leaves out of the copy (top-level folders and files of the run,
# and the timing files of the stages left out, so they are measured again).
NOT_COPIED = {
    "base": ["samples", "evaluation", "report.md", "montage.png"],
    "reuse": ["experts", "samples", "evaluation", "report.md", "montage.png"],
    "data": ["clusters", "partitions", "experts", "router", "samples", "evaluation", "report.md", "montage.png"],
}
STAGE_FOLDERS = {
    "cluster": "clusters",
    "partition": "partitions",
    "train-router": "router",
    "sample": "samples",
    "evaluate": "evaluation",
    "report": "report.md",
}

# The evaluation's parts the table does not read, made small (the FM loss and router diagnostics are still run).
QUICK_EVAL = [
    "eval.fm_loss.num_samples=50",
    "eval.fm_loss.strategies=[top1]",
    "eval.fm_loss.per_expert=false",
    "eval.router.num_samples=100",
    "eval.flops.measure_images=0",
]


def parse(recipe: str) -> tuple[str, list[str], tuple[str, str] | None]:
    """(name, overrides, (how, recipe) it starts from: ``base=``, ``reuse=`` or ``data=`` among the overrides)."""
    name, _, rest = recipe.partition(":")
    words = rest.split()
    start = [tuple(w.split("=", 1)) for w in words if w.split("=", 1)[0] in NOT_COPIED]
    if len(start) > 1:
        raise SystemExit(f"recipe {name!r}: give at most one of {', '.join(f'{k}=' for k in NOT_COPIED)}")
    return name.strip(), [w for w in words if w.split("=", 1)[0] not in NOT_COPIED], start[0] if start else None


def reuse(how: str, source: RunDir, rd: RunDir) -> None:
    """Start ``rd`` as a copy of what ``how`` keeps of ``source``'s run (nothing when ``rd`` exists already)."""
    if rd.root.exists():
        return
    if not (source.root / "recipe.json").exists():
        raise SystemExit(f"{how}={source.root.name}: run that recipe first (it is not in {source.root.parent})")
    left = set(NOT_COPIED[how]) | {"recipe.json"}
    tmp = rd.root.with_name(rd.root.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    top = source.root
    shutil.copytree(top, tmp, ignore=lambda d, names: [n for n in names if Path(d) == top and n in left])
    for stage, folder in STAGE_FOLDERS.items():  # a stage left out is timed again when it runs
        if folder in left:
            (tmp / "timings" / f"{stage}.json").unlink(missing_ok=True)
    tmp.rename(rd.root)


def stage_seconds(rd: RunDir) -> tuple[float, float]:
    """(wall seconds of every stage but evaluate and report, peak RSS GiB of any of them)."""
    wall, peak = 0.0, 0.0
    for path in sorted((rd.root / "timings").glob("*.json")) + sorted(rd.experts.glob("expert-*/timing.json")):
        t = read_json(path)
        if t.get("job") in ("evaluate", "report"):
            continue
        wall += float(t.get("wall_s") or 0)
        peak = max(peak, float(t.get("peak_rss_gib") or 0))
    return wall, peak


def row(name: str, rd: RunDir) -> str:
    metrics = read_json(rd.root / "evaluation" / "metrics.json")
    space = next(s for s in metrics["feature_spaces"] if s.startswith("classifier"))
    strategy, r = next(iter(metrics["feature_spaces"][space]["strategies"].items()))
    worst = min(
        (c["classifier_accuracy"] for c in (r.get("per_class") or {}).values() if "classifier_accuracy" in c),
        default=None,
    )
    wall, peak = stage_seconds(rd)
    pipeline_wall = read_json(rd.root / "recipe.json")["pipeline_wall_s"]
    cells = [
        name,
        f"{r['fd']:.2f}",
        f"{r['precision']:.3f}",
        f"{r['recall']:.3f}",
        f"{r.get('classifier_accuracy', float('nan')):.3f}",
        "-" if worst is None else f"{worst:.2f}",
        f"{pipeline_wall:.0f}",
        f"{wall:.0f}",
        f"{peak:.2f}",
        str(r["num_generated"]),
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help='"name" or "name: key=value ..."')
    parser.add_argument("--samples", type=int, default=2000, help="generated images per recipe (eval.num_samples)")
    parser.add_argument("--common", default="", help="overrides for every recipe")
    parser.add_argument("--root", default="runs/recipes", help="where the recipes' runs go")
    parser.add_argument("--full-eval", action="store_true", help="the evaluate stage's defaults for the FM loss etc.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    rows = []
    for recipe in args.recipes:
        name, overrides, start = parse(recipe)
        rd = RunDir(Path(args.root).resolve() / name)
        if start:
            reuse(start[0], RunDir(rd.root.parent / start[1]), rd)
        quick = [] if args.full_eval else QUICK_EVAL
        cfg = settings(
            [*args.common.split(), *overrides, *quick, f"run_dir={rd.root}", f"eval.num_samples={args.samples}"]
        )
        done = rd.root / "recipe.json"
        ran = pipeline.run(cfg)
        if not done.exists():  # the pipeline's own wall time, from the run that did the work
            write_json(done, dict(overrides=overrides, common=args.common.split(), pipeline_wall_s=ran["wall_s"]))
        run_stage("evaluate", cfg)
        rows.append(row(name, rd))
        print(rows[-1], flush=True)
    header = (
        "| recipe | FD | precision | recall | class accuracy | worst class | pipeline s | stages s (sum) "
        "| peak GiB | samples |"
    )
    print("\n" + header + "\n" + "|---" * 10 + "|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
