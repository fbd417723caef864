#!/usr/bin/env python
"""The small-scale paper table: monolith vs DDM at equal training FLOPs.

    python scripts/paper_table.py experiment=paper_small            # 2 CPU cores, at most 90 minutes
    python scripts/paper_table.py experiment=paper_gpu              # one GPU
    python scripts/paper_table.py experiment=paper_small paper.dry_run=true   # the plan and estimate only

Arguments are Hydra overrides of conf/config.yaml, as for `ddm <stage>`. The grid
is `paper:` in the experiment file; the outputs (table.md, results.json, plots)
go into run_dir (runs/<name>/ by default). Rerunning continues where it stopped.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    from ddm.cli import setup_logging
    from ddm.config import compose
    from ddm.experiments.paper_table import run

    cfg = compose(argv)
    setup_logging(cfg.get("log_level", "INFO"))
    result = run(cfg)
    if "table" in result:
        print(f"table: {result['table']}")
    return result


if __name__ == "__main__":
    main()
