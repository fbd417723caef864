#!/usr/bin/env python
"""The small-scale paper table: monolith vs DDM at equal training FLOPs.

    python scripts/paper_table.py experiment=paper_small            # 2 CPU cores, estimated 2.5 h
    python scripts/paper_table.py experiment=paper_gpu              # one GPU
    python scripts/paper_table.py experiment=paper_small paper.dry_run=true   # the plan and estimate only

Arguments are Hydra overrides of conf/config.yaml, as for `ddm <stage>`. The grid
is `paper:` in the experiment file; the outputs (table.md, results.json, plots)
go into run_dir (runs/<name>/ by default). Rerunning continues where it stopped.
An expected error (no `paper:` grid, a bad value) prints one line and exits with
status 2, as `ddm <stage>` does; `debug=true` or `HYDRA_FULL_ERROR=1` shows its traceback.
"""

from __future__ import annotations

import sys

PROG = "scripts/paper_table.py"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return {}
    from ddm.cli import USER_ERROR_STATUS, config_error_line, report_user_error, setup_logging, show_tracebacks
    from ddm.config import CONFIG_ERRORS, settings
    from ddm.errors import UserError
    from ddm.experiments.paper_table import run

    try:
        cfg = settings(argv)
    except UserError as error:  # a key no config file declares, a value of the wrong type: one line too
        if show_tracebacks():
            raise
        report_user_error(PROG, error)
        sys.exit(USER_ERROR_STATUS)
    except CONFIG_ERRORS as error:  # a bad override: one line, as `ddm <stage>` prints it
        if show_tracebacks():
            raise
        report_user_error(PROG, config_error_line(error))
        sys.exit(USER_ERROR_STATUS)
    setup_logging(cfg.log_level)
    try:
        result = run(cfg)
    except UserError as error:  # as `ddm <stage>`: one line, status 2; debug=true shows the traceback
        if show_tracebacks(cfg):
            raise
        report_user_error(PROG, error)
        sys.exit(USER_ERROR_STATUS)
    if "table" in result:
        print(f"table: {result['table']}")
    return result


if __name__ == "__main__":
    main()
