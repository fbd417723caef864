"""The ``ddm`` command: ``ddm <stage> [hydra overrides...]``.

Examples::

    ddm pipeline                                 # every stage on the default config
    ddm prepare data=digits name=tiny
    ddm train-expert expert.id=3 island=gpu      # one expert, on one island
    ddm sample sample.strategy=topk sample.top_k=2
    ddm sample --help                            # the config groups and their options

An expected error (a missing folder, a bad value, a missing expert) prints one
line and exits with status 2; ``debug=true`` or ``HYDRA_FULL_ERROR=1`` shows
its traceback. Any other exception keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from ddm.errors import UserError
from ddm.stages import STAGES

# Exit status of an expected user error (argparse's convention); a crash exits with 1.
USER_ERROR_STATUS = 2
# Stages that start jobs of their own: the jobs compose their config from the same overrides.
PASS_OVERRIDES = ("submit", "pipeline")


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = [
        "usage: ddm <stage> [key=value ...]     (ddm <stage> --help: its config groups and options)",
        "",
        "stages, in the order data flows:",
    ]
    lines += [f"  {name.ljust(width)}  {stage.summary}" for name, stage in STAGES.items()]
    lines += ["", "examples: ddm pipeline name=mine data=digits   |   ddm train-expert expert.id=3 island=gpu"]
    return "\n".join(lines)


def setup_logging(level: str = "INFO") -> None:
    logger = logging.getLogger("ddm")
    logger.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    # a run in a bucket: the storage clients say at INFO which credentials and endpoint they found, every command
    for chatty in ("botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger(chatty).level))


# Whether the user set HYDRA_FULL_ERROR=1: then every error shows its traceback. Read once, in main(),
# because main() sets the variable itself so that Hydra raises its errors for us to print.
_full_error_asked = False


def show_tracebacks(cfg=None) -> bool:
    """True when the user asked for full tracebacks of expected errors too (``cfg``: the composed config or its
    settings, whose ``debug`` asks for them)."""
    return bool(
        _full_error_asked or os.environ.get("HYDRA_FULL_ERROR") == "1" or (cfg is not None and cfg.debug is True)
    )


def config_error_line(error: Exception) -> str:
    """Hydra's message about a bad override or option, on one line, without its search path."""
    text = str(error).split("Config search path:")[0]
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if raw.startswith("\t") and out and out[-1].endswith((":", ",")):
            out[-1] = f"{out[-1]} {line},"  # an option list, one option per tab-indented line
        else:
            if out and not out[-1].endswith((".", ":", ",", ";")):
                out[-1] += "."
            out.append(line)
    return " ".join(out).rstrip(",")


def missing_value_line(error: Exception) -> str:
    """One line for a mandatory value (``???``) a stage read unset: the key, and how to give it."""
    key = getattr(error, "full_key", None) or "a setting"
    text = str(error).splitlines()[0]
    missing = text.rsplit("'", 2)[-2] if "to missing value" in text and text.count("'") >= 2 else key
    return (
        f"{missing} has no value and this stage needs it: give it on the command line ({missing}=...), "
        f"or in an experiment file (`ddm <stage> --help` lists the groups and keys)"
    )


def report_user_error(prog: str, error: Exception | str) -> None:
    """One line on stderr: the command (``ddm sample``) and the message, which names the input and the fix."""
    print(f"{prog}: error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Lightning's DDP launcher starts ranks 1..n-1 by re-running this command with the
    # same overrides but without the stage name (we hand Hydra the overrides only), so
    # the stage travels to them in the environment.
    if (not argv or argv[0] not in STAGES) and os.environ.get("DDM_STAGE") and "LOCAL_RANK" in os.environ:
        argv.insert(0, os.environ["DDM_STAGE"])
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if not argv:
        print(usage(), file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    if argv[0] not in STAGES:
        print(f"ddm: unknown stage {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    stage = argv.pop(0)
    os.environ["DDM_STAGE"] = stage

    import hydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from ddm.config import CONF_DIR

    if any(a in ("-h", "--help") for a in argv):
        from ddm.cli_help import stage_help

        print(stage_help(stage, CONF_DIR))
        sys.exit(0)

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _entry(cfg):
        from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

        from ddm.config import to_settings
        from ddm.config_check import check_config
        from ddm.stages.runner import run_stage

        _restore_full_error()  # composition is done; child processes (DDP ranks) see the user's setting
        setup_logging(cfg.get("log_level", "INFO"))
        try:
            check_config(cfg, CONF_DIR)  # a key no config file declares is a typo that would change nothing
            settings = to_settings(cfg)  # the door: typed and checked; below here no stage sees the config object
            # submit and pipeline pass the user's overrides on to the jobs they start: Hydra knows them parsed
            run_stage(stage, settings, **({"overrides": task_overrides()} if stage in PASS_OVERRIDES else {}))
        except UserError as error:
            if show_tracebacks(cfg):
                raise
            report_user_error(f"ddm {stage}", error)
            sys.exit(USER_ERROR_STATUS)
        except (MissingMandatoryValue, InterpolationToMissingValueError) as error:
            # a value the config leaves to the user (???), read by this stage: name it, no traceback
            if show_tracebacks(cfg):
                raise
            report_user_error(f"ddm {stage}", missing_value_line(error))
            sys.exit(USER_ERROR_STATUS)

    # Hydra reads sys.argv; hand it the overrides only. With HYDRA_FULL_ERROR set, Hydra raises a bad
    # override or option instead of printing it with a hint, so it can be reported on one line here.
    global _full_error_asked
    _full_error_asked = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv = [f"ddm {stage}"] + argv
    try:
        _entry()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as error:
        if _full_error_asked:
            raise
        report_user_error(
            f"ddm {stage}", f"{config_error_line(error)} (`ddm {stage} --help` lists the groups and keys)"
        )
        sys.exit(USER_ERROR_STATUS)
    finally:
        _restore_full_error()


def task_overrides() -> list[str]:
    """The overrides of the running Hydra job (``ddm submit a=b ...``), without Hydra's own."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _restore_full_error() -> None:
    if not _full_error_asked:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
