"""data.urls names shards as users keep them: a folder of .tar shards, a glob or a brace pattern, each giving the
same shards; a file among them that is not a tar is refused in one line naming it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ddm.data.shards import ShardSetWriter, iter_samples, load_manifest, shard_paths
from ddm.errors import BadInput, MissingInput
from ddm.stages.runner import run_stage


def _shards(folder, n: int = 5) -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    with ShardSetWriter(folder, shard_size=2) as w:
        for i, im in enumerate(images):
            w.write(f"orig_{i}", im, label=i % 3)
    return images


def _prepared(make_cfg, urls: str, run_dir) -> list[bytes]:
    cfg = make_cfg(
        "data=webdataset",
        f"data.urls='{urls}'",
        "data.image_size=8",
        "data.num_classes=3",
        "data.image_format=png",
        run_dir=run_dir,
    )
    run_stage("prepare", cfg)
    folder = run_dir / "data"
    return [s["image"].tobytes() for s in iter_samples(shard_paths(folder, load_manifest(folder)))]


def test_a_folder_a_glob_and_a_brace_pattern_name_the_same_shards(make_cfg, tmp_path):
    images = _shards(tmp_path / "in")
    brace = _prepared(make_cfg, f"{tmp_path / 'in'}/shard-{{000000..000002}}.tar", tmp_path / "brace")
    folder = _prepared(make_cfg, str(tmp_path / "in"), tmp_path / "folder")
    globbed = _prepared(make_cfg, f"{tmp_path / 'in'}/shard-*.tar", tmp_path / "glob")
    assert brace == folder == globbed  # the same shards, so the same seeded order
    assert sorted(brace) == sorted(im.tobytes() for im in images)


def test_a_file_that_is_not_a_tar_is_named(make_cfg, tmp_path):
    _shards(tmp_path / "in")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tmp_path / "in" / "shard-000000.tar", mixed)
    (mixed / "notes.txt").write_text("not a shard")
    with pytest.raises(BadInput, match=r"notes\.txt \(from data\.urls\) is not a tar file"):
        _prepared(make_cfg, f"{mixed}/*", tmp_path / "run")
    fake = tmp_path / "in" / "shard-000009.tar"
    fake.write_bytes(b"\x89PNG not a tar")
    with pytest.raises(BadInput, match=r"shard-000009\.tar \(from data\.urls\) is not a tar file"):
        _prepared(make_cfg, str(tmp_path / "in"), tmp_path / "run2")


def test_an_empty_folder_or_glob_is_named(make_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInput, match=r"is a folder with no \.tar shards in it"):
        _prepared(make_cfg, str(tmp_path / "empty"), tmp_path / "run")
    with pytest.raises(MissingInput, match=r"matches no file"):
        _prepared(make_cfg, f"{tmp_path / 'empty'}/*.tar", tmp_path / "run2")
