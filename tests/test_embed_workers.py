"""The embed stage's loader workers and stored dtype: the same bytes whatever the workers, float16 on request."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments
from ddm.cores import available_cores
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.data.sources import SourceMeta
from ddm.embed import build_encoder, load_embeddings_manifest
from ddm.embed.reader import MAX_AUTO_WORKERS, embed_shards, loader_workers
from ddm.errors import BadInput
from ddm.io import read_json, sha256_file, write_json
from ddm.settings import Embed
from ddm.settings.values import build
from ddm.stages import cluster, embed, prepare

# 7 shards of 60 (the last of 60 too: 420 = 7 x 60) cut into batches of 25: full and partial batches
DIGITS = ("data=digits", "data.limit=420", "data.shard_size=60", "embed.batch_size=25")


def embedded(make_cfg, tmp_path, name: str, *overrides: str) -> tuple[RunDir, dict]:
    cfg = make_cfg(*DIGITS, *overrides, run_dir=tmp_path / name)
    prepare.run(cfg)
    embed.run(cfg)
    rd = RunDir(cfg.run_dir)
    return rd, load_embeddings_manifest(rd.embeddings)


def file_bytes(rd: RunDir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(rd.embeddings.glob("emb-*.npy"))}


def digest(manifest: dict) -> tuple:
    return manifest["embeddings_id"], [(s["embeddings"], s["sha256"]) for s in manifest["shards"]]


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_same_files_whatever_the_number_of_workers(make_cfg, tmp_path, image_format):
    runs = {
        workers: embedded(
            make_cfg, tmp_path, f"w{workers}", f"data.image_format={image_format}", f"embed.workers={workers}"
        )
        for workers in (0, 1, 2)
    }
    rd0, manifest0 = runs[0]
    assert len(manifest0["shards"]) == 7 and manifest0["num_samples"] == 420 and manifest0["dtype"] == "float32"
    for workers in (1, 2):
        rd, manifest = runs[workers]
        assert file_bytes(rd) == file_bytes(rd0), workers
        assert digest(manifest) == digest(manifest0), workers
        assert [(rd.embeddings / s["keys"]).read_text() for s in manifest["shards"]] == [
            (rd0.embeddings / s["keys"]).read_text() for s in manifest0["shards"]
        ]
    # and the rows are the encoder's rows of each shard's samples, in stored order
    data = load_manifest(rd0.data)
    encoder = build_encoder(make_cfg(*DIGITS).embed, SourceMeta.from_manifest(data))
    for entry, path in zip(manifest0["shards"], shard_paths(rd0.data, data)):
        samples = list(iter_samples([path]))
        rows = np.load(rd0.embeddings / entry["embeddings"])
        np.testing.assert_allclose(rows, encoder(np.stack([s["image"] for s in samples])), atol=1e-6)
        assert (rd0.embeddings / entry["keys"]).read_text().split() == [s["key"] for s in samples]


def test_a_network_encoder_prepared_in_workers_gives_the_same_bytes(make_cfg, tmp_path):
    # torchvision's resize and ImageNet normalisation run in the workers, the network in this process
    net = ("embed=torchvision", "embed.image_size=32", "embed.device=cpu", "embed.batch_size=25")
    rd0, m0 = embedded(make_cfg, tmp_path, "w0", *net, "embed.workers=0", "data.limit=120")
    rd2, m2 = embedded(make_cfg, tmp_path, "w2", *net, "embed.workers=2", "data.limit=120")
    assert file_bytes(rd2) == file_bytes(rd0) and digest(m2) == digest(m0)


def test_float16_rows_are_the_float32_rows_rounded(make_cfg, tmp_path):
    rd32, m32 = embedded(make_cfg, tmp_path, "f32", "embed.workers=1")
    rd16, m16 = embedded(make_cfg, tmp_path, "f16", "embed.workers=1", "embed.dtype=float16")
    assert m16["dtype"] == "float16" and m16["encoder_config"]["dtype"] == "float16"
    for a, b in zip(m32["shards"], m16["shards"]):
        rows32, rows16 = np.load(rd32.embeddings / a["embeddings"]), np.load(rd16.embeddings / b["embeddings"])
        assert rows16.dtype == np.float16 and rows16.shape == rows32.shape
        np.testing.assert_array_equal(rows16, rows32.astype(np.float16))
        assert sha256_file(rd16.embeddings / b["embeddings"]) == b["sha256"]
    assert m16["embeddings_id"] != m32["embeddings_id"]
    # 2 bytes a value, plus the .npy header
    size16 = sum((rd16.embeddings / s["embeddings"]).stat().st_size for s in m16["shards"])
    assert size16 < 420 * 256 * 2 + 7 * 256


def test_workers_and_batch_size_are_speed_only_but_dtype_is_not(make_cfg, tmp_path):
    cfg = make_cfg(*DIGITS, "embed.workers=0")
    prepare.run(cfg)
    embed.run(cfg)
    marker = RunDir(cfg.run_dir).embeddings_manifest
    stamp = marker.stat().st_mtime_ns
    again = embed.run(make_cfg(*DIGITS, "embed.workers=2", "embed.batch_size=7"))
    assert again["skipped"] is True and marker.stat().st_mtime_ns == stamp
    with pytest.raises(BadInput, match=r"embed\.dtype 'float32' there, 'float16' now"):
        embed.run(make_cfg(*DIGITS, "embed.dtype=float16"))
    # embeddings made before embed.dtype existed were float32: they stay usable as such
    manifest = read_json(marker)
    manifest["encoder_config"].pop("dtype")
    manifest["encoder_config"].pop("workers")
    write_json(marker, manifest)
    assert embed.run(make_cfg(*DIGITS))["skipped"] is True
    with pytest.raises(BadInput, match=r"embed\.dtype"):
        embed.run(make_cfg(*DIGITS, "embed.dtype=float16"))


def test_resumed_with_another_dtype_recomputes_the_shards_of_the_old_one(make_cfg, tmp_path):
    cfg = make_cfg(*DIGITS, "embed.workers=0")
    prepare.run(cfg)
    embed.run(cfg)
    folder = RunDir(cfg.run_dir).embeddings
    (folder / "manifest.json").unlink()  # as if interrupted before the end
    (folder / "emb-000003.npy").unlink()
    summary = embed.run(make_cfg(*DIGITS, "embed.workers=2", "embed.dtype=float16"))
    assert summary["computed_shards"] == 7
    assert {np.load(p).dtype for p in folder.glob("emb-*.npy")} == {np.dtype(np.float16)}


def test_interrupted_run_resumes_only_the_missing_shards_with_workers(make_cfg, tmp_path):
    rd, manifest = embedded(make_cfg, tmp_path, "run", "embed.workers=2")
    before = {p.name: p.stat().st_mtime_ns for p in rd.embeddings.glob("emb-*.npy")}
    (rd.embeddings / "manifest.json").unlink()
    (rd.embeddings / "emb-000001.npy").unlink()
    (rd.embeddings / "emb-000005.npy").unlink()
    summary = embed.run(make_cfg(*DIGITS, "embed.workers=2", run_dir=tmp_path / "run"))
    assert summary["computed_shards"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in rd.embeddings.glob("emb-*.npy")}
    assert {n for n in after if after[n] != before[n]} == {"emb-000001.npy", "emb-000005.npy"}
    assert digest(load_embeddings_manifest(rd.embeddings)) == digest(manifest)


def test_the_cluster_stage_reads_float16_embeddings_as_it_reads_float32_ones(make_cfg, tmp_path):
    reports, labels = {}, {}
    for dtype in ("float32", "float16"):
        cfg = make_cfg(*DIGITS, f"embed.dtype={dtype}", "cluster=two_stage", "cluster.k=3", run_dir=tmp_path / dtype)
        prepare.run(cfg)
        embed.run(cfg)
        reports[dtype] = cluster.run(cfg)
        labels[dtype] = load_assignments(RunDir(cfg.run_dir).assignments).cluster
    assert reports["float16"]["num_samples"] == 420
    assert reports["float16"]["embeddings_id"] != reports["float32"]["embeddings_id"]
    # rounding to 11 bits of mantissa moves no digit across a boundary here (all 420 agree today)
    assert (labels["float16"] == labels["float32"]).mean() >= 0.99


def test_a_damaged_shard_read_in_a_worker_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"not a tar at all" * 64)
    encoder = build_encoder(
        build(Embed, dict(encoder="pixels", batch_size=4, size=4), "embed"),
        SourceMeta(image_size=8, channels=1, num_classes=10, class_names=None),
    )
    with pytest.raises(BadInput) as caught:
        list(embed_shards(encoder, [str(bad)], 4, workers=1))
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message and "Traceback" not in message


def test_workers_follow_the_cores_unless_given(monkeypatch):
    assert loader_workers(None, 1000) == min(MAX_AUTO_WORKERS, available_cores() - 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert loader_workers(None, 1000) == MAX_AUTO_WORKERS
    assert loader_workers(None, 3) == 3  # never more processes than shards to read
    assert loader_workers(0, 50) == 0 and loader_workers(5, 50) == 5
    with pytest.raises(BadInput, match=r"embed\.workers=-1"):
        loader_workers(-1, 50)
