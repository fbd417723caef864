"""Prepare at scale: the same shards whatever the number of workers or jobs, keys from the source, JPEG storage
with the source's bytes passed through, and provenance that travels with each sample."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.data.ingest import part_path, part_units
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.data.sources import named_key
from ddm.errors import BadInput, MissingInput
from ddm.stages import prepare
from ddm.stages.runner import run_stage


def photo(rng, h: int, w: int) -> np.ndarray:
    """A smooth image (gradients and a blob), as photographs are: JPEG keeps it close."""
    y, x = np.mgrid[0:h, 0:w]
    c = rng.uniform(0.2, 0.8, 3)
    blob = np.exp(-((x - w * c[0]) ** 2 + (y - h * c[1]) ** 2) / (0.1 * h * w))
    img = np.stack([x / w, y / h, blob], axis=2) * 200 + c * 55
    return img.clip(0, 255).astype(np.uint8)


def jpeg_folder(root, sizes=((40, 52), (32, 32), (36, 48)), per_class: int = 6, broken: bool = False):
    """Two class folders of JPEGs of mixed sizes (every second one already 32 x 32), and a broken file."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            Image.fromarray(photo(rng, h, w)).save(root / label / f"{i:03d}.jpg", quality=90)
    if broken:
        (root / "dogs" / "999.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def folder_cfg(make_cfg, root, run_dir, *extra):
    return make_cfg(
        "data=image_folder",
        f"data.root={root}",
        "data.resize=32",
        "data.image_size=32",
        "data.shard_size=5",
        *extra,
        run_dir=run_dir,
    )


def shard_bytes(run_dir) -> dict[str, bytes]:
    folder = RunDir(run_dir).data
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_one_and_two_workers_write_the_same_shards(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", broken=True)
    runs = {}
    for workers in (1, 2):
        cfg = folder_cfg(make_cfg, root, tmp_path / f"w{workers}", f"data.workers={workers}", "data.on_error=skip")
        prepare.run(cfg)
        runs[workers] = (load_manifest(RunDir(cfg.run_dir).data), shard_bytes(cfg.run_dir))
    (one, one_bytes), (two, two_bytes) = runs[1], runs[2]
    assert one == two and one_bytes == two_bytes and len(one_bytes) == 3  # 12 images (one broken skipped) / 5
    assert one["num_samples"] == 12 and one["num_skipped"] == 1
    skipped = json.loads((RunDir(tmp_path / "w2").data / "skipped.json").read_text())
    assert [r["file"] for r in skipped["skipped"]] == [str(root / "dogs" / "999.jpg")]


def test_a_worker_error_names_the_first_bad_image_in_stored_order(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", broken=True)
    with pytest.raises(BadInput, match=r"999\.jpg: .*data\.on_error=skip"):
        prepare.run(folder_cfg(make_cfg, root, tmp_path / "run", "data.workers=2"))
    folder = RunDir(tmp_path / "run").data
    assert not (folder / "manifest.json").exists() and not list(folder.glob(".*.tmp"))


def test_two_jobs_write_what_one_job_writes(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", per_class=9)
    one = folder_cfg(make_cfg, root, tmp_path / "one")
    prepare.run(one)
    parts = [folder_cfg(make_cfg, root, tmp_path / "two", "data.parts=2", f"data.part={j}") for j in (1, 0)]
    for cfg in parts:  # in any order, as array tasks finish
        summary = run_stage("prepare", cfg)
        assert summary["part"] == cfg.data.part and not RunDir(cfg.run_dir).data_manifest.exists()
        assert RunDir(cfg.run_dir).timing(f"prepare-part-{cfg.data.part:04d}").exists()  # one timing per part
    folder = RunDir(tmp_path / "two").data
    assert part_path(folder, 0, 2).exists() and part_path(folder, 1, 2).exists()
    merged = prepare.run(folder_cfg(make_cfg, root, tmp_path / "two", "data.parts=2"))
    assert merged["num_samples"] == 18
    assert load_manifest(folder) == load_manifest(RunDir(one.run_dir).data)
    assert shard_bytes(tmp_path / "two") == shard_bytes(one.run_dir)
    assert not (folder / "parts").exists()  # merged into the manifest
    # the merged data/ is the same work as one job's: a rerun with either setting is skipped
    assert prepare.run(folder_cfg(make_cfg, root, tmp_path / "two"))["skipped"] is True


def test_the_merge_names_the_parts_not_done_and_writes_none_itself(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    prepare.run(folder_cfg(make_cfg, root, run, "data.parts=3", "data.part=0"))
    # parts 1 and 2 may be running in their own jobs: the merge must not write them too
    with pytest.raises(MissingInput, match=r"parts 1, 2 of data.parts=3 are not done .*data\.part=J"):
        prepare.run(folder_cfg(make_cfg, root, run, "data.parts=3"))
    folder = RunDir(run).data
    assert not (folder / "manifest.json").exists() and not part_path(folder, 1, 3).exists()
    # a part done already is skipped, unless asked again
    assert prepare.run(folder_cfg(make_cfg, root, run, "data.parts=3", "data.part=0"))["skipped"] is True


def test_a_part_of_other_settings_or_a_cut_shard_is_refused(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    prepare.run(folder_cfg(make_cfg, root, run, "data.parts=2", "data.part=0", "data.quality=80"))
    prepare.run(folder_cfg(make_cfg, root, run, "data.parts=2", "data.part=1"))
    with pytest.raises(BadInput, match=r"part-0000-of-0002\.json was written with other settings"):
        from ddm.data.ingest import merge_parts

        cfg = folder_cfg(make_cfg, root, run, "data.parts=2")
        about = _about(cfg)
        merge_parts(RunDir(run).data, 2, about["num_units"], about)
    prepare.run(folder_cfg(make_cfg, root, run, "data.parts=2", "data.part=0"))  # redone with these settings
    record = json.loads(part_path(RunDir(run).data, 1, 2).read_text())
    cut = RunDir(run).data / record["units"][0]["shard"]["path"]
    cut.write_bytes(cut.read_bytes()[:-1024])
    with pytest.raises(BadInput, match=r"shard-000001\.tar is .* bytes but .*part-0001-of-0002\.json recorded"):
        prepare.run(folder_cfg(make_cfg, root, run, "data.parts=2"))


def _about(cfg) -> dict:
    from ddm.data.ingest.parts import units_digest
    from ddm.data.sources import open_source

    source = open_source(cfg.data, int(cfg.seed))
    return dict(settings=prepare.made_with(cfg), num_units=len(source.units), units_sha256=units_digest(source.units))


def test_parts_cover_every_unit_once():
    for units in (0, 1, 7, 100):
        for parts in (1, 2, 3, 8):
            covered = [i for j in range(parts) for i in part_units(units, parts, j)]
            assert covered == list(range(units))


def test_bad_worker_and_part_settings_are_refused(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs")
    with pytest.raises(BadInput, match=r"data\.workers=-1: give a number of worker processes"):
        prepare.run(folder_cfg(make_cfg, root, tmp_path / "a", "data.workers=-1"))
    with pytest.raises(BadInput, match=r"data\.part=2 is not one of the 2 parts: give 0\.\.1"):
        prepare.run(folder_cfg(make_cfg, root, tmp_path / "b", "data.parts=2", "data.part=2"))
    with pytest.raises(BadInput, match=r"data\.quality=0: give a JPEG quality from 1 to 100"):
        prepare.run(folder_cfg(make_cfg, root, tmp_path / "c", "data.quality=0"))


def test_keys_name_files_whatever_the_seed_or_the_files_added(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs")

    def keys_by_file(run_dir, seed):
        cfg = folder_cfg(make_cfg, root, run_dir, f"seed={seed}")
        prepare.run(cfg)
        folder = RunDir(cfg.run_dir).data
        return {s["meta"]["file"]: s["key"] for s in iter_samples(shard_paths(folder), decode=False)}

    first = keys_by_file(tmp_path / "s0", 0)
    assert keys_by_file(tmp_path / "s1", 1) == first  # another seed: another order, the same keys
    assert first["cats/000.jpg"] == named_key("folder", "train", "cats/000.jpg") == "folder-train-cats%2F000%2Ejpg"
    Image.fromarray(photo(np.random.default_rng(5), 32, 32)).save(root / "cats" / "0000-new.jpg")
    grown = keys_by_file(tmp_path / "grown", 0)
    assert {f: k for f, k in grown.items() if f in first} == first and len(grown) == len(first) + 1


def test_jpegs_of_the_size_asked_are_stored_as_they_are_and_the_rest_at_the_quality_set(make_cfg, tmp_path):
    root = jpeg_folder(tmp_path / "imgs")
    cfg = folder_cfg(make_cfg, root, tmp_path / "run")
    prepare.run(cfg)
    folder = RunDir(cfg.run_dir).data
    manifest = load_manifest(folder)
    assert manifest["image_format"] == "jpeg" and manifest["quality"] == 95
    passed = 0
    for s in iter_samples(shard_paths(folder), decode=False):
        ext, data = s["encoded"]
        source = (root / s["meta"]["file"]).read_bytes()
        with Image.open(root / s["meta"]["file"]) as im:
            already = im.size == (32, 32)
        assert ext == "jpg" and (data == source) == already  # resized ones are encoded again
        passed += already
    assert passed == manifest["num_passed_through"] == 4
    png = folder_cfg(make_cfg, root, tmp_path / "png", "data.image_format=png")
    prepare.run(png)
    # the lossless copy of the same pixels takes more room than JPEG at quality 95
    assert sum(map(len, shard_bytes(png.run_dir).values())) > sum(map(len, shard_bytes(cfg.run_dir).values()))


def img2dataset_like_shard(path, n: int = 4):
    """A shard as img2dataset writes one: ``jpg``, ``txt`` and ``json`` (url, sizes, sha256) per sample."""
    rng = np.random.default_rng(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(photo(rng, 32, 32)).save(buf, "JPEG", quality=90)
            key = f"0000{i:05d}"
            meta = dict(url=f"http://127.0.0.1/img{i}.jpg", key=key, original_width=64, original_height=64)
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", f"photo {i}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_webdataset_sample_keeps_its_key_bytes_and_json(make_cfg, tmp_path):
    shard = img2dataset_like_shard(tmp_path / "in" / "00000.tar")
    keys = {}
    for seed in (0, 2):
        cfg = make_cfg(
            "data=webdataset",
            f"data.urls=[{shard}]",
            "data.image_size=32",
            f"seed={seed}",
            run_dir=tmp_path / f"s{seed}",
        )
        prepare.run(cfg)
        keys[seed] = samples = list(iter_samples(shard_paths(RunDir(cfg.run_dir).data), decode=False))
    assert (
        [s["key"] for s in keys[0]]
        == [s["key"] for s in keys[2]]
        == [f"wds-train-00000%2F0000{i:05d}" for i in range(4)]
    )
    with tarfile.open(shard) as tar:
        originals = {m.name: tar.extractfile(m).read() for m in tar}
    for s in samples:
        own = s["meta"]["key"]
        assert s["encoded"] == ("jpg", originals[f"{own}.jpg"])  # passed through untouched
        assert s["meta"]["shard"] == str(shard) and s["meta"]["source"]["url"].endswith(f"img{int(own[-5:])}.jpg")
        assert s["caption"] == originals[f"{own}.txt"].decode()


def test_partition_writes_the_same_shards_with_one_or_two_workers(make_cfg, tmp_path):
    from ddm.stages import cluster, partition

    written = {}
    for workers in (0, 2):
        cfg = make_cfg(
            "data=digits",
            "cluster.method=random",
            "cluster.k=3",
            f"data.workers={workers}",
            run_dir=tmp_path / f"w{workers}",
        )
        for stage in (prepare, cluster, partition):
            stage.run(cfg)
        rd = RunDir(cfg.run_dir)
        written[workers] = [{p.name: p.read_bytes() for p in sorted(rd.partition(k).glob("*"))} for k in range(3)]
    assert written[0] == written[2] and all(len(files) > 1 for files in written[0])


def test_each_job_of_a_stage_run_in_parts_records_its_own_timing(make_cfg):
    from ddm.job_names import stage_job

    assert stage_job("prepare", make_cfg("data.parts=4", "data.part=3")) == "prepare-part-0003"
    assert stage_job("prepare", make_cfg("data.parts=4")) == "prepare"  # the merge
    assert stage_job("embed", make_cfg("embed.parts=2", "embed.part=1")) == "embed-part-0001"
    assert stage_job("partition", make_cfg("cluster.partition_parts=2", "cluster.partition_part=0")) == (
        "partition-part-0000"
    )
    assert stage_job("encode", make_cfg("vae.clusters=[5,2]")) == "encode-cluster-02-05"
    assert stage_job("encode", make_cfg("vae.clusters=3")) == "encode-cluster-03"
    assert stage_job("encode", make_cfg()) == "encode"
