"""A stage skips only the work it was asked for: a rerun with the settings its result was made from skips, a
rerun with others stops in one line naming what differs (redo=true makes it again)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.stages.runner import run_stage


def _images(folder, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_prepare_refuses_a_run_prepared_from_other_data(make_cfg, tmp_path):
    digits = make_cfg("data=digits", "data.limit=60")
    first = run_stage("prepare", digits)
    assert not first.skipped and first["num_samples"] == 60
    again = run_stage("prepare", digits)
    assert again.skipped and again["num_samples"] == 60
    _images(tmp_path / "images")
    other = make_cfg("data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "data.channels=1")
    with pytest.raises(BadInput) as refused:
        run_stage("prepare", other)
    message = str(refused.value)
    assert "was made with other settings" in message and "redo=true" in message
    assert "data.source 'digits' there, 'image_folder' now" in message
    assert f"data.root None there, '{tmp_path / 'images'}' now" in message
    assert "data.split" not in message  # only what differs is named (both read the train split)
    rebuilt = run_stage("prepare", make_cfg(*_overrides(other), "redo=true"))
    assert not rebuilt.skipped and rebuilt["source"] == "image_folder" and rebuilt["num_samples"] == 12
    assert read_json(RunDir(other.run_dir).data_manifest)["settings"]["data"]["source"] == "image_folder"


def _overrides(s) -> list[str]:
    return ["data=image_folder", f"data.root={s.data.root}", "data.image_size=8", "data.channels=1"]


def test_prepare_names_a_changed_seed_and_limit(make_cfg):
    run_stage("prepare", make_cfg("data=digits", "data.limit=50"))
    with pytest.raises(BadInput, match=r"data\.limit 50 there, 40 now; seed 0 there, 3 now"):
        run_stage("prepare", make_cfg("data=digits", "data.limit=40", "seed=3"))


def test_embed_skips_on_speed_settings_and_refuses_another_encoder(make_cfg):
    base = ("data=digits", "data.limit=60", "embed=pixels", "embed.size=8")
    run_stage("prepare", make_cfg(*base))
    assert not run_stage("embed", make_cfg(*base)).skipped
    assert run_stage("embed", make_cfg(*base, "embed.batch_size=7")).skipped  # how fast, not what
    with pytest.raises(BadInput, match=r"embeddings was made with other settings \(embed\.size 8 there, 4 now\)"):
        run_stage("embed", make_cfg(*base[:-1], "embed.size=4"))
    assert not run_stage("embed", make_cfg(*base[:-1], "embed.size=4", "redo=true")).skipped


def test_cluster_refuses_another_k_and_skips_the_same(make_cfg):
    base = ("data=digits", "data.limit=80", "embed.size=8", "cluster=flat", "cluster.k=2")
    for stage in ("prepare", "embed", "cluster"):
        run_stage(stage, make_cfg(*base))
    assert run_stage("cluster", make_cfg(*base, "cluster.partition_shard_size=10")).skipped  # the partitions'
    with pytest.raises(BadInput, match=r"clusters was made with other settings \(cluster\.k 2 there, 3 now\)"):
        run_stage("cluster", make_cfg(*base[:-1], "cluster.k=3"))
    assert run_stage("cluster", make_cfg(*base[:-1], "cluster.k=3", "redo=true"))["k"] == 3


def test_partition_refuses_another_shard_layout_or_seed(make_cfg):
    base = ("data=digits", "data.limit=80", "embed.size=8", "cluster=flat", "cluster.k=2")
    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, make_cfg(*base))
    assert run_stage("partition", make_cfg(*base)).skipped
    with pytest.raises(BadInput, match=r"partitions was made with other settings \(cluster\.partition_shard_size "):
        run_stage("partition", make_cfg(*base, "cluster.partition_shard_size=7"))
    again = run_stage("partition", make_cfg(*base, "cluster.partition_shard_size=7", "redo=true"))
    assert not again.skipped and again["settings"]["cluster"]["partition_shard_size"] == 7
