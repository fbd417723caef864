"""Typed settings at the door: every config key is a typed field, values of the wrong type are refused in one
line, settings are frozen, and nothing below the command line is handed the config object."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from ddm import cli
from ddm.config import CONF_DIR, compose, settings, to_settings
from ddm.config_check import declared
from ddm.errors import BadInput
from ddm.settings import Group, MissingValue, Settings, changed, settings_fields
from ddm.stages import report as report_stage
from ddm.stages.runner import run_stage
from tests.test_cli import lines, run_cli  # noqa: F401  (the fixture)

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
REQUIRED = {"imagenet256": ["data.root=/x"], "t2i": ["data.urls='/x/{0..1}.tar'"]}


def typed_keys(cls=Settings, prefix: str = "") -> set[str]:
    """Every dotted key the settings classes declare (groups included)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in settings_fields(cls):
        key = f"{prefix}.{f.name}".lstrip(".")
        out.add(key)
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Group):
            out |= typed_keys(kind, key)
    return out


def test_every_key_the_config_files_declare_is_a_typed_setting_and_no_other():
    hydra_own = ("paper", "hydra")  # the paper table's own namespace (a mapping) and Hydra's settings
    files = {
        k
        for k in declared(str(CONF_DIR))
        if k.split(".")[0] not in hydra_own and not k.endswith(".defaults") and not k.startswith("eval.heldout.data.")
    }
    typed = typed_keys() - {"paper"}
    assert files - typed == set(), "keys in conf/ with no field in ddm/settings/"
    assert typed - files == set(), "fields in ddm/settings/ that no file in conf/ declares"


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_becomes_settings_with_the_same_values(preset):
    overrides = [f"experiment={preset}", *REQUIRED.get(preset, [])]
    cfg = compose(overrides)
    typed = to_settings(cfg)
    assert typed.to_dict() == OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(typed.expert.lr, float) and isinstance(typed.expert.steps, int)


def test_settings_are_frozen_and_changed_makes_a_checked_copy():
    s = settings(["experiment=tiny"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.expert.steps = 5  # type: ignore[misc]
    t = changed(s, {"expert.id": 3, "redo": True, "sample.cfg_scale": 2})
    assert (t.expert.id, t.redo, t.sample.cfg_scale) == (3, True, 2.0) and isinstance(t.sample.cfg_scale, float)
    assert (s.expert.id, s.redo) == (0, False)  # the original is untouched
    assert t.expert.steps == s.expert.steps and t.sample.to_dict()["cfg_scale"] == 2.0
    with pytest.raises(BadInput, match=r"expert\.steps='many' is not an integer"):
        changed(s, {"expert.steps": "many"})
    with pytest.raises(
        BadInput, match=r"expert\.stepz is not a setting \(expert's settings: steps, batch_size, .*, id, target,"
    ):
        changed(s, {"expert.stepz": 1})


@pytest.mark.parametrize(
    "override, named, needs",
    [
        ("sample.steps=abc", "sample.steps='abc'", "an integer"),
        ("expert.lr=true", "expert.lr=True", "a number"),
        ("pipeline.parallel=fast", "pipeline.parallel='fast'", "an integer or 'auto'"),
        ("sample.experts=[0,x]", "sample.experts=[0, 'x']", "a list of an integer or a string or null"),
        ("cluster.k=2.5", "cluster.k=2.5", "an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_in_one_line(run_cli, tmp_path, override, named, needs):  # noqa: F811
    code, _, err = run_cli("sample", f"run_dir={tmp_path / 'run'}", override)
    assert code == cli.USER_ERROR_STATUS
    assert len(lines(err)) == 1 and "Traceback" not in err, err
    assert f"{named} is not {needs}" in err, err
    group = override.split(".")[0]
    assert f"({group}'s settings: " in err  # the group's valid keys, to pick the right one from


def test_numbers_are_accepted_where_text_is_asked_and_ints_where_floats_are():
    s = settings(["name=2024", "sample.cfg_scale=3"])
    assert s.name == "2024" and s.sample.cfg_scale == 3.0 and isinstance(s.sample.cfg_scale, float)
    assert s.run_dir.endswith("/2024")


def test_an_unset_mandatory_value_is_refused_where_it_is_read_naming_it():
    s = settings(["data=image_folder"])
    assert s.data.image_size == 64  # the rest of the group reads as usual
    with pytest.raises(MissingValue, match=r"data\.root has no value and this stage needs it: .*data\.root=\.\.\."):
        _ = s.data.root
    assert s.data.to_dict()["root"] == "???"


def test_run_stage_takes_settings_not_the_config_object(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(report_stage, "run", lambda s: seen.append(s) or {})
    cfg = compose([f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(TypeError, match="takes ddm.settings.Settings, not DictConfig"):
        run_stage("report", cfg)
    run_stage("report", to_settings(cfg))
    assert len(seen) == 1 and isinstance(seen[0], Settings)


def test_the_command_line_hands_stages_settings(run_cli, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    monkeypatch.setattr(report_stage, "run", lambda s: seen.append(s) or {})
    code, _, err = run_cli("report", f"run_dir={tmp_path / 'run'}", "sample.steps=7")
    assert code == 0, err
    assert isinstance(seen[0], Settings) and seen[0].sample.steps == 7
