"""Grow a run by classes it has never seen, and measure what that did and did not change.

A run is trained on some classes (``--old``), the others (``--new``) are prepared
on their own and added with ``ddm extend`` (``extend.mode=new_cluster`` unless
overridden). Printed: each old expert's sha256 before and after (they must not
change), the router's held-out accuracy before and after, and per class the
fraction of samples a classifier gives the requested class (and any new class)
and the share of model calls the new expert served. The classifier is a
logistic regression for scikit-learn's digits, else the evaluate stage's
feature net trained on every class of the source::

    python scripts/grow_experiment.py experiment=tiny expert.steps=300 router.steps=100
    python scripts/grow_experiment.py --old 0,1,2 --new 3,4 experiment=tiny extend.mode=assign
    python scripts/grow_experiment.py --fresh cluster.k=2          # Fashion-MNIST at the demo's settings

Other arguments are config overrides for every stage (the run goes to
``runs/grow/base``, the new images to ``runs/grow/new``; ``--fresh`` removes both first).
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
from ddm.grow.measure import class_rates, digits_classifier, source_classifier  # noqa: E402
from ddm.io import read_json, sha256_file  # noqa: E402
from ddm.stages import pipeline  # noqa: E402
from ddm.stages.runner import run_stage  # noqa: E402


def ids(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=ids, default=[0, 1, 2, 3, 4], help="classes of the first run")
    parser.add_argument("--new", type=ids, default=[5, 6, 7, 8, 9], help="classes it grows by")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class measured")
    parser.add_argument("--root", default="runs/grow", help="where the two runs go")
    parser.add_argument("--fresh", action="store_true", help="start both runs over")
    args, overrides = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    root = Path(args.root).resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    base, new = root / "base", root / "new"

    cfg = settings([*overrides, f"run_dir={base}", f"data.classes=[{','.join(map(str, args.old))}]"])
    pipeline.run(cfg)
    rd = RunDir(base)
    K = int(read_json(rd.partitions_index)["num_clusters"])
    before = {k: sha256_file(rd.expert_weights(k)) for k in range(K)}
    run_stage("prepare", settings([*overrides, f"run_dir={new}", f"data.classes=[{','.join(map(str, args.new))}]"]))
    grown = run_stage("extend", settings([*overrides, f"run_dir={base}", f"extend.shards={new / 'data'}"]))

    if cfg.data.source == "digits":
        classify = digits_classifier()
    else:
        classify = source_classifier(cfg.data, int(cfg.seed), Path(str(cfg.eval.feature_net.cache_dir)))
    rates = class_rates(base, [*args.old, *args.new], classify, per_class=args.per_class, group=args.new)
    after_k = int(grown["k"])
    print(f"\nclustering {grown['parent']} (K={grown['k_before']}) -> {grown['clustering_id']} (K={after_k})")
    for k, sha in before.items():
        now = sha256_file(rd.expert_weights(k)) if rd.expert_weights(k).exists() else None
        state = "unchanged" if now == sha else ("retrained" if now else "moved to history/")
        print(f"expert {k}: sha256 {sha[:12]} -> {(now or '-')[:12]} ({state})")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(
        f"router held-out accuracy: {pct(grown['router_accuracy_before'])} before, "
        f"{pct(grown['router_accuracy_after'])} after"
    )
    print(
        "\n| class | group | classified as requested | as one of the new classes | calls served by the new expert(s) |"
    )
    print("|---|---|---|---|---|")
    added = [k for k in range(after_k) if k >= int(grown["k_before"])]
    for c, r in rates.items():
        share = sum(r["experts"].get(k, 0.0) for k in added)
        group = "new" if c in args.new else "old"
        print(f"| {c} | {group} | {pct(r['accuracy'])} | {pct(r['in_group'])} | {pct(share)} |")
    for group, classes in (("old", args.old), ("new", args.new)):
        mean = sum(rates[c]["accuracy"] for c in classes) / len(classes)
        print(f"{group} classes {classes}: classified as requested {pct(mean)} of {args.per_class} samples each")


if __name__ == "__main__":
    main()
