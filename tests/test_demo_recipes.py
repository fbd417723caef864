"""scripts/demo_recipes.py: how a recipe is read and what a recipe that starts from another one copies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ddm.artifacts import RunDir

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_recipes.py"


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("demo_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_recipes"] = module
    spec.loader.exec_module(module)
    return module


def test_a_recipe_is_a_name_overrides_and_where_it_starts(recipes):
    assert recipes.parse("baseline") == ("baseline", [], None)
    name, overrides, start = recipes.parse("lr3: reuse=baseline expert.lr=3e-3 flow.time_sampling=logit_normal")
    assert (name, overrides, start) == (
        "lr3",
        ["expert.lr=3e-3", "flow.time_sampling=logit_normal"],
        ("reuse", "baseline"),
    )
    assert recipes.parse("cfg2: base=lr3 sample.cfg_scale=2")[2] == ("base", "lr3")
    with pytest.raises(SystemExit, match="at most one"):
        recipes.parse("x: base=a data=b")


def _finished_run(root: Path) -> RunDir:
    for folder in ("data", "embeddings", "clusters", "partitions", "router", "experts/expert-00", "samples"):
        (root / folder).mkdir(parents=True)
        (root / folder / "marker").write_text(folder)
    (root / "timings").mkdir()
    for stage in ("prepare", "embed", "cluster", "partition", "train-router", "sample", "evaluate"):
        (root / "timings" / f"{stage}.json").write_text("{}")
    (root / "recipe.json").write_text("{}")
    return RunDir(root)


@pytest.mark.parametrize(
    "how,kept,left",
    [
        ("base", {"data", "clusters", "partitions", "router", "experts"}, {"samples"}),
        ("reuse", {"data", "clusters", "partitions", "router"}, {"experts", "samples"}),
        ("data", {"data", "embeddings"}, {"clusters", "partitions", "router", "experts", "samples"}),
    ],
)
def test_a_start_copies_what_it_keeps_and_times_the_rest_again(recipes, tmp_path, how, kept, left):
    source = _finished_run(tmp_path / "source")
    rd = RunDir(tmp_path / "new")
    recipes.reuse(how, source, rd)
    assert {p.name for p in rd.root.iterdir() if p.is_dir()} >= kept | {"timings"}
    assert not any((rd.root / f).exists() for f in left)
    assert not (rd.root / "recipe.json").exists()  # the new recipe records its own
    timed = {p.stem for p in (rd.root / "timings").glob("*.json")}
    assert "prepare" in timed and "evaluate" not in timed and "sample" not in timed
    assert ("train-router" in timed) == ("router" in kept)
    assert not rd.root.with_name("new.copying").exists()
    # a second call leaves an existing run alone
    (rd.root / "data" / "marker").write_text("changed")
    recipes.reuse(how, source, rd)
    assert (rd.root / "data" / "marker").read_text() == "changed"


def test_a_start_from_an_unfinished_recipe_is_refused(recipes, tmp_path):
    source = _finished_run(tmp_path / "source")
    (source.root / "recipe.json").unlink()
    with pytest.raises(SystemExit, match="run that recipe first"):
        recipes.reuse("reuse", source, RunDir(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
