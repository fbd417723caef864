"""The embed stage in parts: separate jobs over disjoint ranges of data shards, then a merge that computes nothing
and writes what one job writes."""

from __future__ import annotations

import shutil

import pytest

from ddm.artifacts import RunDir
from ddm.data.shards import load_manifest, shard_paths
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.stages import embed, prepare
from ddm.stages.runner import run_stage

# digits in 6 shards of 300 (the last 297): part 0 of 2 embeds shards 0..2, part 1 shards 3..5.
# A fixed random projection to 32 dims: another embed.seed gives other rows of the same shape, which only the
# records of which settings made them tell apart.
DIGITS = ("data=digits", "data.shard_size=300", "embed.workers=0", "embed.dim=32")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data/ of the digits run, prepared once; each test copies it into its own runs."""
    from ddm.config import settings

    root = tmp_path_factory.mktemp("prepared") / "run"
    prepare.run(settings([*DIGITS, f"run_dir={root}"]))
    return RunDir(root)


@pytest.fixture
def runs(prepared, make_cfg, tmp_path):
    """``runs(name)``: a run dir holding a copy of the prepared data; ``cfg(name, *overrides)``: its settings."""

    def new(name: str) -> RunDir:
        rd = RunDir(tmp_path / name)
        shutil.copytree(prepared.data, rd.data)
        return rd

    def cfg(rd: RunDir, *overrides: str):
        return make_cfg(*DIGITS, *overrides, run_dir=rd.root)

    return new, cfg


def spy_shards(monkeypatch) -> list[str]:
    """The data shards handed to the reader from now on: the ones computed."""
    calls: list[str] = []
    real = embed.embed_shards

    def spy(encoder, paths, batch_size, workers):
        calls.extend(paths)
        return real(encoder, paths, batch_size, workers)

    monkeypatch.setattr(embed, "embed_shards", spy)
    return calls


def shard_names(calls: list[str]) -> list[str]:
    return sorted(c.rsplit("/", 1)[-1] for c in calls)


def per_shard_files(rd: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(rd.embeddings.glob("*-*.*")) if p.suffix in (".npy", ".txt")}


def mtimes(rd: RunDir) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in rd.embeddings.glob("emb-*.npy")}


def test_parts_then_the_merge_write_what_one_job_writes(runs, monkeypatch):
    new, cfg = runs
    one = new("one")
    embed.run(cfg(one))
    many = new("many")
    calls = spy_shards(monkeypatch)
    for j in (1, 0):  # in any order, each as its own job
        result = run_stage("embed", cfg(many, "embed.parts=2", f"embed.part={j}"))
        assert result["part"] == j and not result["skipped"] and result["computed_shards"] == 3
        assert not many.embeddings_manifest.exists()  # a part writes no manifest
        assert many.timing(f"embed-part-000{j}").exists()
    assert shard_names(calls) == [f"shard-00000{i}.tar" for i in range(6)]  # each data shard embedded once

    calls.clear()
    merged = run_stage("embed", cfg(many, "embed.parts=2"))
    assert not calls and merged["computed_shards"] == 0 and merged["num_shards"] == 6
    assert many.embeddings_manifest.read_bytes() == one.embeddings_manifest.read_bytes()
    assert "parts" not in read_json(many.embeddings_manifest)["encoder_config"]
    assert per_shard_files(many) == per_shard_files(one) and len(per_shard_files(one)) == 12
    assert read_json(many.embeddings / "encoder.json") == read_json(one.embeddings / "encoder.json")
    assert not (many.embeddings / "parts").exists()

    # parts are speed only: the finished result is kept by a one-job run, and by a part run again
    assert embed.run(cfg(many)).skipped
    assert embed.run(cfg(many, "embed.parts=3", "embed.part=2")).skipped
    assert not calls


def test_the_merge_names_the_parts_not_done_and_writes_no_manifest(runs):
    new, cfg = runs
    rd = new("run")
    for j in (0, 2):
        embed.run(cfg(rd, "embed.parts=3", f"embed.part={j}"))
    with pytest.raises(MissingInput, match=r"parts 1 of embed\.parts=3 are not done .*embed\.part=J"):
        embed.run(cfg(rd, "embed.parts=3"))
    assert not rd.embeddings_manifest.exists()

    embed.run(cfg(rd, "embed.parts=3", "embed.part=1"))
    (rd.embeddings / "emb-000005.npy").unlink()  # part 2 (shards 4, 5) lost a file since
    with pytest.raises(MissingInput, match=r"parts 2 of embed\.parts=3 are not done \(part 2: data shards 4\.\.5\)"):
        embed.run(cfg(rd, "embed.parts=3"))
    assert not rd.embeddings_manifest.exists()


def test_a_part_checks_its_own_data_shards_only(runs):
    new, cfg = runs
    rd = new("run")
    data = load_manifest(rd.data)
    damaged = shard_paths(rd.data, data)[4]  # part 1's
    raw = bytearray(open(damaged, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(damaged, "wb").write(bytes(raw))

    embed.run(cfg(rd, "embed.parts=2", "embed.part=0"))
    checked = read_json(rd.embeddings / "parts" / "verified-part-0000-of-0002.json")
    assert sorted(next(iter(checked["sets"].values()))["files"]) == [s["path"] for s in data["shards"][:3]]
    assert not (rd.embeddings / "verified.json").exists()
    with pytest.raises(BadInput, match=r"shard-000004\.tar does not match the checksum"):
        embed.run(cfg(rd, "embed.parts=2", "embed.part=1"))
    assert not (rd.embeddings / "emb-000003.npy").exists()  # refused before embedding anything


def test_a_part_run_again_computes_only_what_is_missing(runs, monkeypatch):
    new, cfg = runs
    rd = new("run")
    part1 = cfg(rd, "embed.parts=2", "embed.part=1")
    embed.run(part1)
    before = mtimes(rd)
    calls = spy_shards(monkeypatch)
    again = run_stage("embed", part1)
    assert again.skipped and again["computed_shards"] == 0 and not calls and mtimes(rd) == before

    (rd.embeddings / "emb-000004.npy").unlink()
    assert embed.run(part1)["computed_shards"] == 1 and shard_names(calls) == ["shard-000004.tar"]


def test_a_part_with_other_settings_replaces_its_own_files_only(runs, monkeypatch):
    new, cfg = runs
    rd = new("run")
    for j in (0, 1):
        embed.run(cfg(rd, "embed.parts=2", f"embed.part={j}", "embed.seed=1"))  # then stopped: no merge
    theirs = {name: t for name, t in mtimes(rd).items() if name >= "emb-000003"}
    calls = spy_shards(monkeypatch)

    embed.run(cfg(rd, "embed.parts=2", "embed.part=0"))  # seed 0 now: its shards' rows are other rows
    assert shard_names(calls) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert {name: t for name, t in mtimes(rd).items() if name >= "emb-000003"} == theirs  # part 1's untouched
    with pytest.raises(BadInput, match=r"part-0001-of-0002\.json was written with other settings .*embed\.seed 1"):
        embed.run(cfg(rd, "embed.parts=2"))
    assert not rd.embeddings_manifest.exists()

    calls.clear()
    embed.run(cfg(rd, "embed.parts=2", "embed.part=1"))
    assert shard_names(calls) == ["shard-000003.tar", "shard-000004.tar", "shard-000005.tar"]
    embed.run(cfg(rd, "embed.parts=2"))
    one = new("one")
    embed.run(cfg(one))
    assert per_shard_files(rd) == per_shard_files(one)
    assert rd.embeddings_manifest.read_bytes() == one.embeddings_manifest.read_bytes()


def test_the_newest_record_of_a_shard_says_what_made_its_files(runs, monkeypatch):
    """Parts of another embed.parts overlap: the one written last vouches for a shard, whichever the job."""
    new, cfg = runs
    rd = new("run")
    embed.run(cfg(rd, "embed.parts=2", "embed.part=0"))  # shards 0..2, seed 0
    embed.run(cfg(rd, "embed.parts=3", "embed.part=0", "embed.seed=1"))  # shards 0, 1 again, seed 1
    calls = spy_shards(monkeypatch)
    embed.run(cfg(rd, "embed.parts=2", "embed.part=0"))  # its own record says seed 0, but shards 0, 1 are newer
    assert shard_names(calls) == ["shard-000000.tar", "shard-000001.tar"]

    embed.run(cfg(rd, "embed.parts=2", "embed.part=1"))
    calls.clear()
    embed.run(cfg(rd))  # one job after the parts: keeps what the newest records vouch for
    assert not calls and rd.embeddings_manifest.exists() and not (rd.embeddings / "parts").exists()
    one = new("one")
    embed.run(cfg(one))
    assert per_shard_files(rd) == per_shard_files(one)


def test_parts_are_checked_and_more_parts_than_shards_is_fine(runs):
    new, cfg = runs
    rd = new("run")
    with pytest.raises(BadInput, match=r"embed\.part=2 is not one of the 2 parts: give 0\.\.1"):
        embed.run(cfg(rd, "embed.parts=2", "embed.part=2"))
    with pytest.raises(BadInput, match=r"embed\.parts=0"):
        embed.run(cfg(rd, "embed.parts=0"))
    for j in range(8):  # 6 shards: parts 0, 2, 4, 6 hold none
        assert embed.run(cfg(rd, "embed.parts=8", f"embed.part={j}"))["computed_shards"] in (0, 1)
    assert embed.run(cfg(rd, "embed.parts=8"))["num_samples"] == 1797


def test_settings_rebuilt_from_the_manifest_embed_in_one_job(runs):
    """``ddm extend`` embeds new shards with the manifest's encoder_config, which leaves the jobs out."""
    from ddm.settings.values import changed

    new, cfg = runs
    rd = new("run")
    embed.run(cfg(rd))
    recorded = read_json(rd.embeddings_manifest)["encoder_config"]
    rd.embeddings_manifest.unlink()
    (rd.embeddings / "emb-000004.npy").unlink()
    again = embed.run(changed(cfg(rd), {"embed": recorded}))
    assert again["computed_shards"] == 1 and again["num_shards"] == 6
