"""Shards that img2dataset itself downloaded and wrote go through prepare to a trained expert, each sample's url kept.

img2dataset (run from its own venv, see tests/img2dataset_shards.py) fetches red and blue pictures of mixed sizes
from a loopback server, one url of them a 404, and writes 32 px centre crops as webdataset shards. Prepare must pass
its JPEG bytes through, key each sample by shard and img2dataset's key, and keep img2dataset's json; clustering must
split the colours, and the partitions must carry the json on to the expert's training data.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.config import settings
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.io import read_json
from ddm.stages.runner import run_stage
from tests.img2dataset_shards import CLASSES, Downloaded, download

# the tiny experiment, on img2dataset's shards: unlabelled (img2dataset has no classes), one expert trained briefly
OVERRIDES = (
    "experiment=tiny",
    "data=webdataset",
    "data.image_size=32",
    "data.num_classes=0",
    "cluster.min_shards_per_partition=2",
    "expert.steps=4",
    "expert.batch_size=8",
    "expert.warmup_steps=1",
)


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Downloaded:
    return download(tmp_path_factory.mktemp("img2dataset"))


def img2dataset_samples(shards: Path) -> dict[str, dict]:
    """What img2dataset wrote, by the key prepare should give it: ``{key: {"jpg": bytes, "txt": ..., "json": ...}}``."""
    out: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                own, ext = member.name.split(".", 1)
                out.setdefault(f"wds-train-{tar_path.stem}%2F{own}", {})[ext] = tar.extractfile(member).read()
    return out


def run_cfg(downloaded: Downloaded, run_dir: Path, *more):
    return settings([*OVERRIDES, f"data.urls={downloaded.shards}", f"run_dir={run_dir}", *more])


def prepared(downloaded: Downloaded, run_dir: Path, *more) -> dict[str, dict]:
    cfg = run_cfg(downloaded, run_dir, *more)
    run_stage("prepare", cfg)
    folder = RunDir(cfg.run_dir).data
    return {s["key"]: s for s in iter_samples(shard_paths(folder, load_manifest(folder)), decode=False)}


def served_name(downloaded: Downloaded, url: str) -> str:
    assert url.startswith(downloaded.base_url), url
    return url.removeprefix(downloaded.base_url)


def test_prepare_passes_img2dataset_bytes_through_with_keys_and_urls(downloaded, tmp_path):
    stats = [read_json(p) for p in sorted(downloaded.shards.glob("*_stats.json"))]
    assert len(stats) == 3 and sum(s["failed_to_download"] for s in stats) == 1  # the 404 is in the stats only
    written = img2dataset_samples(downloaded.shards)
    assert len(written) == len(downloaded.served) == 24

    data = prepared(downloaded, tmp_path / "s0")
    assert set(data) == set(written)  # wds-train-<shard>%2F<img2dataset key>, one per download
    for key, s in data.items():
        own = written[key]
        assert s["encoded"] == ("jpg", own["jpg"])  # 32 px already: img2dataset's bytes, not encoded again
        assert s["caption"] == own["txt"].decode()
        source = json.loads(own["json"])
        shard = Path(s["meta"]["shard"])
        assert s["meta"] == {"shard": s["meta"]["shard"], "key": source["key"], "source": source}
        assert key == f"wds-train-{shard.stem}%2F{source['key']}" and shard.parent == downloaded.shards
    manifest = load_manifest(RunDir(tmp_path / "s0").data)
    assert manifest["num_passed_through"] == manifest["num_samples"] == 24

    # every picture served is there once, its url naming the file it came from (its bytes, its size)
    by_name = {served_name(downloaded, s["meta"]["source"]["url"]): s["meta"]["source"] for s in data.values()}
    assert sorted(by_name) == sorted(downloaded.served)  # the 24 pictures, not the 404
    site = downloaded.shards.parent / "site"
    for name, source in by_name.items():
        assert source["sha256"] == hashlib.sha256((site / name).read_bytes()).hexdigest()
        with Image.open(site / name) as im:
            assert (source["original_width"], source["original_height"]) == im.size

    other = prepared(downloaded, tmp_path / "s1", "seed=1")  # another seed: another shard order, the same keys
    assert {k: s["meta"] for k, s in other.items()} == {k: s["meta"] for k, s in data.items()}


def test_img2dataset_shards_train_an_expert_whose_partition_keeps_the_urls(downloaded, tmp_path):
    cfg = run_cfg(downloaded, tmp_path / "run")
    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, cfg)
    rd = RunDir(cfg.run_dir)
    data = {s["key"]: s["meta"] for s in iter_samples(shard_paths(rd.data), decode=False)}

    parts = [{s["key"]: s["meta"] for s in iter_samples(shard_paths(rd.partition(k)), decode=False)} for k in (0, 1)]
    assert sorted(key for part in parts for key in part) == sorted(data)  # every sample in one partition
    for part in parts:
        assert all(meta == data[key] for key, meta in part.items())  # the json (the url) travels with the sample
    colours = [{served_name(downloaded, m["source"]["url"]).split("_")[0] for m in part.values()} for part in parts]
    assert sorted(c for cs in colours for c in cs) == sorted(CLASSES)  # red and blue pictures clustered apart

    record = run_stage("train-expert", run_cfg(downloaded, tmp_path / "run", "expert.id=0"))
    assert record["steps"] == 4 and record["partition_samples"] == len(parts[0])
    assert read_json(rd.expert_record(0)) == dict(record)
