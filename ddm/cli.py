"""The ``ddm`` command: ``ddm <stage> [hydra overrides...]``.

Examples::

    ddm pipeline                                 # every stage on the default config
    ddm prepare data=digits name=tiny
    ddm train-expert expert.id=3 island=gpu      # one expert, on one island
    ddm sample sample.strategy=topk sample.top_k=2
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from ddm.stages import STAGES

# The pipeline times each of its stages itself; submit and status do no work of the run's own.
UNTIMED = ("pipeline", "submit", "status")
USAGE = "usage: ddm <stage> [key=value ...]\nstages: " + ", ".join(STAGES)


def setup_logging(level: str = "INFO") -> None:
    logger = logging.getLogger("ddm")
    logger.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    # Lightning's start-up banners (accelerator availability, product tips) are noise in every job log.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def run_stage(stage: str, cfg):
    module = importlib.import_module(f"ddm.stages.{STAGES[stage]}")
    return module.run(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Lightning's DDP launcher starts ranks 1..n-1 by re-running this command with the
    # same overrides but without the stage name (we hand Hydra the overrides only), so
    # the stage travels to them in the environment.
    if (not argv or argv[0] not in STAGES) and os.environ.get("DDM_STAGE") and "LOCAL_RANK" in os.environ:
        argv.insert(0, os.environ["DDM_STAGE"])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(USAGE if not argv or argv[0] in ("-h", "--help") else f"unknown stage {argv[0]!r}\n{USAGE}",
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    stage = argv.pop(0)
    os.environ["DDM_STAGE"] = stage

    import hydra

    from ddm.config import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _entry(cfg):
        setup_logging(cfg.get("log_level", "INFO"))
        if stage in UNTIMED:
            run_stage(stage, cfg)
            return
        from ddm.artifacts import RunDir
        from ddm.stages import timed
        from ddm.stages.pipeline import record_timing

        sink: dict = {}
        with timed(stage, sink):
            run_stage(stage, cfg)
        name = f"train-expert-{int(cfg.expert.id):02d}" if stage == "train-expert" else stage
        if stage in sink:
            record_timing(RunDir(cfg.run_dir), name, sink[stage])

    # Hydra reads sys.argv; hand it the overrides only.
    sys.argv = [f"ddm {stage}"] + argv
    _entry()


if __name__ == "__main__":
    main()
