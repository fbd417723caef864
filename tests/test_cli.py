"""The command line as a person meets it: help, one-line errors for expected mistakes, tracebacks for bugs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddm import cli
from ddm.artifacts import RunDir
from ddm.errors import BadInput, MissingInput, UserError
from ddm.io import read_json
from ddm.stages import STAGES
from ddm.stages import report as report_stage
from ddm.stages.runner import run_stage


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``run_cli(*args) -> (exit status, stdout, stderr)`` of ``ddm <args>`` in this process."""
    monkeypatch.setattr(sys, "argv", ["ddm"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def _run(*args: str, env: dict | None = None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        code = 0
        try:
            cli.main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_help_lists_every_stage_with_its_summary():
    out = subprocess.run([sys.executable, "-m", "ddm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name, stage in STAGES.items():
        assert any(line.split()[:1] == [name] and stage.summary in line for line in out.stdout.splitlines()), name


def test_stage_help_shows_its_groups_options_and_commented_keys(run_cli):
    code, out, _ = run_cli("sample", "--help")
    assert code == 0
    assert "usage: ddm sample" in out and STAGES["sample"].summary in out
    assert "sample  default (default)" in out
    assert "strategy: top1" in out and "# top1 | topk | full" in out  # the yaml with its comments
    code, out, _ = run_cli("train-expert", "-h")
    assert code == 0
    assert "island" in out and "gpu8_ddp" in out and "local_cpu (default)" in out


def test_no_stage_prints_the_usage_as_an_error(run_cli):
    code, out, err = run_cli()
    assert code == cli.USER_ERROR_STATUS and out == ""
    assert "usage: ddm <stage>" in err and "train-expert" in err


def test_submit_help_shows_its_own_keys(run_cli):
    code, out, _ = run_cli("submit", "--help")
    assert code == 0
    assert "dry_run: false" in out and "# true: print the sbatch scripts" in out


def test_an_unknown_stage_names_it_and_lists_the_stages(run_cli):
    code, _, err = run_cli("trian-expert")
    assert code == cli.USER_ERROR_STATUS
    assert "unknown stage 'trian-expert'" in err and "train-expert" in err


def test_a_missing_artefact_is_one_line_naming_the_file_and_the_fix(run_cli, tmp_path):
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}")
    assert code == cli.USER_ERROR_STATUS
    assert lines(err) == [
        f"ddm sample: error: no router weights at {tmp_path / 'run' / 'router' / 'router.pt'}: "
        f"run `ddm train-router` first"
    ]


def test_full_error_shows_the_traceback_of_an_expected_error(run_cli, tmp_path):
    with pytest.raises(MissingInput, match="no router weights"):
        run_cli("sample", f"run_dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"})


def test_debug_shows_the_traceback_of_an_expected_error(run_cli, tmp_path):
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}", "debug=true")
    assert code == 1
    assert "Traceback" in err and "MissingInput: no router weights" in err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sample.stepz=3", "Could not override 'sample.stepz'. To append to your config use +sample.stepz=3"),
        ("no_such_group.key=1", "Could not override 'no_such_group.key'."),
        (
            "data=no_such_source",
            "Could not find 'data/no_such_source'. Available options in 'data': digits, "
            "fashion_mnist, image_folder, webdataset",
        ),
    ],
)
def test_a_bad_override_is_one_line_naming_it(run_cli, tmp_path, override, expected):
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}", override)
    assert code == cli.USER_ERROR_STATUS
    assert len(lines(err)) == 1 and expected in err and "Traceback" not in err, err
    assert "ddm sample --help" in err


def test_an_unexpected_error_keeps_its_traceback(run_cli, tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(report_stage, "run", broken)
    code, _, err = run_cli("report", f"run_dir={tmp_path / 'run'}")
    assert code == 1
    assert "Traceback" in err and "RuntimeError: an internal bug" in err
    # the variable the command line sets to get Hydra's errors raised is not left behind
    assert "HYDRA_FULL_ERROR" not in os.environ


def test_user_errors_are_also_the_builtin_exceptions_callers_expect():
    assert issubclass(BadInput, ValueError) and issubclass(MissingInput, FileNotFoundError)
    assert issubclass(BadInput, UserError) and not issubclass(RuntimeError, UserError)


def test_a_stage_is_seeded_from_the_config_alone_and_its_timing_recorded(make_cfg, monkeypatch, run_cli):
    """The command line and the pipeline both run a stage through run_stage: same seed, same draws."""
    draws = []

    def drawing(cfg):
        draws.append(torch.rand(4))
        return {}

    monkeypatch.setattr(report_stage, "run", drawing)
    cfg = make_cfg("seed=11")
    torch.manual_seed(12345)  # whatever state the caller left behind
    run_stage("report", cfg)
    code, _, err = run_cli("report", f"run_dir={cfg.run_dir}", "seed=11")
    assert code == 0, err
    want = torch.Generator().manual_seed(11)
    torch.testing.assert_close(draws[0], torch.rand(4, generator=want))
    torch.testing.assert_close(draws[1], draws[0])
    timing = read_json(RunDir(cfg.run_dir).timing("report"))
    assert timing["job"] == "report" and timing["wall_s"] >= 0 and timing["peak_rss_gib"] > 0


@pytest.mark.parametrize(
    "override, named, listed",
    [
        ("+sample.stepz=5", "sample.stepz is not a setting (sample's settings: batch_size,", " steps,"),
        ("++expert.stepz=5", "expert.stepz is not a setting (expert's settings:", " steps,"),
        ("+island.slurm.partitions=gpu", "island.slurm.partitions is not a setting (island.slurm's", " partition,"),
        ("+stepz=1", "stepz is not a setting (the top-level settings and groups: cluster, data,", " seed,"),
    ],
)
def test_a_key_no_config_declares_is_refused_in_one_line(run_cli, tmp_path, override, named, listed):
    # Hydra adds a `+key` without a word and no stage reads it: a typo that would silently change nothing
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}", override)
    assert code == cli.USER_ERROR_STATUS
    assert len(lines(err)) == 1 and named in err and "Traceback" not in err, err
    assert listed in err  # the settings the group does have, to pick the right one from


def test_an_experiment_file_may_not_invent_a_key_of_a_group(run_cli, tmp_path, monkeypatch):
    import shutil

    from ddm import config

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\nsample:\n  stepz: 5\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}", "experiment=typo")
    assert code == cli.USER_ERROR_STATUS and len(lines(err)) == 1 and "sample.stepz is not a setting" in err, err
    with pytest.raises(BadInput, match=r"sample\.stepz is not a setting"):
        config.compose(["experiment=typo"])  # the same check where tests and notebooks compose


def test_a_mandatory_value_left_unset_is_named_in_one_line(run_cli, tmp_path):
    code, _, err = run_cli("prepare", f"run_dir={tmp_path / 'run'}", "data=image_folder")
    assert code == cli.USER_ERROR_STATUS
    assert len(lines(err)) == 1 and "data.root has no value" in err and "data.root=..." in err, err
    assert "Traceback" not in err and "MissingMandatoryValue" not in err
