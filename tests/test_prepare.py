"""Stage ``prepare`` and the dataset sources: keys, manifests, readers, errors, resumability."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ddm.artifacts import RunDir
from ddm.config import CONF_DIR
from ddm.data import sources
from ddm.data.shard_format import decode_stored, encode_image
from ddm.data.shards import ShardSetWriter, iter_samples, load_manifest, shard_paths, verify
from ddm.data.sources import FASHION_MNIST_CLASSES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, SourceMeta, read_idx
from ddm.errors import BadInput
from ddm.io import sha256_strings
from ddm.stages import prepare

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, magic: int, array: np.ndarray) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def fake_fashion_mnist(root: Path, n: int = 7, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Tiny IDX files with known content: image i is filled with a ramp offset by i, label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    images = (np.arange(n * 28 * 28).reshape(n, 28, 28) * 7 % 256).astype(np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC, images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC, labels)
    return images, labels


def read_back(run_dir) -> tuple[dict, list[dict]]:
    folder = RunDir(run_dir).data
    manifest = load_manifest(folder)
    return manifest, list(iter_samples(shard_paths(folder, manifest)))


def source_index(sample: dict) -> int:
    """A key names the sample's place in the source (``<prefix>-<split>-<index>``), whatever the stored order."""
    return int(sample["key"].rsplit("-", 1)[1])


def save_png(path: Path, size: tuple[int, int], value: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ IDX reader


def test_read_idx_returns_known_pixels_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / "i.gz", IDX_IMAGES_MAGIC, images), IDX_IMAGES_MAGIC)
    got_labels = read_idx(write_idx(tmp_path / "l.gz", IDX_LABELS_MAGIC, labels), IDX_LABELS_MAGIC)
    assert got_images.shape == (2, 3, 4) and np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "labels.gz", IDX_LABELS_MAGIC, np.zeros(4))
    with pytest.raises(ValueError, match="magic number 0x801, expected 0x803") as err:
        read_idx(path, IDX_IMAGES_MAGIC)
    assert str(path) in str(err.value)


def test_read_idx_rejects_truncated_and_non_gzip_files(tmp_path):
    path = tmp_path / "cut.gz"
    with gzip.open(path, "wb") as f:  # header promises 5 labels, 3 follow
        f.write(IDX_LABELS_MAGIC.to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path, IDX_LABELS_MAGIC)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(plain, IDX_LABELS_MAGIC)


# ------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_prepare_from_idx_files(make_cfg, tmp_path):
    images, labels = fake_fashion_mnist(tmp_path / "fm", n=7)
    cfg = make_cfg("data=fashion_mnist", f"data.root={tmp_path / 'fm'}", "data.shard_size=3")
    summary = prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)

    keys = [s["key"] for s in samples]
    assert sorted(keys) == [f"fmnist-train-{i:08d}" for i in range(7)] != keys  # stored in a seeded order
    assert summary["num_samples"] == manifest["num_samples"] == 7
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["keys_sha256"] == sha256_strings(keys)
    assert manifest["order"] == dict(permuted="samples", seed=0)
    assert manifest["class_names"] == FASHION_MNIST_CLASSES
    assert (
        manifest["source"],
        manifest["split"],
        manifest["image_size"],
        manifest["channels"],
        manifest["num_classes"],
    ) == ("fashion_mnist", "train", 28, 1, 10)
    for s in samples:
        i = source_index(s)
        assert np.array_equal(s["image"], images[i]) and s["label"] == labels[i]
    verify(RunDir(cfg.run_dir).data)  # shard checksums match the manifest


def test_fashion_mnist_missing_files_name_the_directory(make_cfg, tmp_path):
    missing = tmp_path / "nowhere"
    cfg = make_cfg("data=fashion_mnist", f"data.root={missing}")
    with pytest.raises(FileNotFoundError) as err:
        prepare.run(cfg)
    assert str(missing) in str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert not RunDir(cfg.run_dir).data_manifest.exists()


@pytest.mark.skipif(
    not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist_with_limit(make_cfg):
    cfg = make_cfg("data=fashion_mnist", "data.limit=120", "data.shard_size=50", "data.split=test")
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert manifest["num_samples"] == 120 and len(manifest["shards"]) == 3
    index = [source_index(s) for s in samples]
    assert len(set(index)) == 120 and max(index) >= 120  # a seeded subset of the 10000, not the first 120
    assert all(s["image"].shape == (28, 28) and 0 <= s["label"] < 10 for s in samples)
    # Check against the raw file: the reader must not shift pixels or labels.
    raw = read_idx(REAL_FMNIST / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    labels = read_idx(REAL_FMNIST / "t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC)
    for s, i in zip(samples, index):
        assert np.array_equal(s["image"], raw[i]) and s["label"] == labels[i]


# ------------------------------------------------------------------ digits, keys, rerun, crash


def test_digits_keys_stable_unique_and_data_exact(make_cfg, tmp_path):
    from sklearn.datasets import load_digits

    cfg_a = make_cfg("data=digits", run_dir=tmp_path / "a")
    cfg_b = make_cfg("data=digits", run_dir=tmp_path / "b")
    prepare.run(cfg_a)
    prepare.run(cfg_b)
    manifest, samples = read_back(cfg_a.run_dir)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) == 1797 and manifest["num_samples"] == 1797
    assert sorted(keys) == [f"digits-train-{i:08d}" for i in range(1797)]
    assert len(manifest["shards"]) == 9 and manifest["keys_sha256"] == sha256_strings(keys)
    # Same input, same bytes: a second run elsewhere gives identical shards.
    other = load_manifest(RunDir(cfg_b.run_dir).data)
    assert [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]]
    digits = load_digits()
    i = 1000
    sample = samples[keys.index("digits-train-00001000")]
    assert np.array_equal(sample["image"], np.round(digits.images[i] * 255 / 16).astype(np.uint8))
    assert sample["label"] == digits.target[i] and sample["image"].max() <= 255


def test_limit_keeps_the_first_samples_of_the_seeded_order(make_cfg, tmp_path):
    cfg = make_cfg("data=digits", "data.limit=50", "data.shard_size=20")
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert manifest["num_samples"] == 50 and [s["num_samples"] for s in manifest["shards"]] == [20, 20, 10]
    # A random subset: the first samples of a folder sorted by class would be one class.
    everything = make_cfg("data=digits", "data.shard_size=20", run_dir=tmp_path / "all")
    prepare.run(everything)
    _, all_samples = read_back(everything.run_dir)
    assert [s["key"] for s in samples] == [s["key"] for s in all_samples[:50]]
    assert max(source_index(s) for s in samples) >= 50


def test_rerun_skips_and_redo_rewrites(make_cfg):
    cfg = make_cfg("data=digits", "data.shard_size=200")
    prepare.run(cfg)
    marker = RunDir(cfg.run_dir).data_manifest
    before = marker.stat().st_mtime_ns
    assert prepare.run(cfg)["skipped"] is True
    assert marker.stat().st_mtime_ns == before

    # redo with bigger shards: rewritten, and no stale shard of the old layout stays behind.
    redo = make_cfg("data=digits", "data.shard_size=1000", "redo=true")
    summary = prepare.run(redo)
    assert summary["skipped"] is False and marker.stat().st_mtime_ns != before
    assert sorted(p.name for p in RunDir(cfg.run_dir).data.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert verify(RunDir(cfg.run_dir).data)["num_samples"] == 1797


@pytest.mark.parametrize("workers", [0, 2])
def test_crash_mid_prepare_leaves_no_manifest(make_cfg, monkeypatch, workers):
    cfg = make_cfg("data=digits", "data.shard_size=100")
    prepare.run(cfg)  # a complete earlier result that the redo below must not leave looking valid
    real = sources.SOURCES["digits"]

    def crashing(cfg_data, seed):
        listing = real(cfg_data, seed)
        read = listing.read

        def reading(unit, skipped):  # in a worker process, with workers=2
            for s in read(unit, skipped):
                if s.key == "digits-train-00000250":
                    raise RuntimeError("disk full")
                yield s

        listing.read = reading
        return listing

    monkeypatch.setitem(sources.SOURCES, "digits", crashing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare.run(make_cfg("data=digits", "data.shard_size=100", "redo=true", f"data.workers={workers}"))
    folder = RunDir(cfg.run_dir).data
    assert not (folder / "manifest.json").exists()
    assert not list(folder.glob(".*tmp"))  # the half-written shard was removed


# ------------------------------------------------------------------ image folders


def test_image_folder_with_classes_and_captions(make_cfg, tmp_path):
    root = tmp_path / "imgs"
    for name, n in (("dog", 2), ("cat", 3)):
        for i in range(n):
            save_png(root / name / f"{i}.png", (16, 16), value=hash((name, i)) % 1000)
    (root / "cat" / "1.txt").write_text("a grey cat\n")
    cfg = make_cfg(
        "data=image_folder", "data.image_format=png", f"data.root={root}", "data.image_size=16", "data.shard_size=2"
    )
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert manifest["class_names"] == ["cat", "dog"] and manifest["num_classes"] == 2
    # Keys name the files (relative to data.root), labels follow the sorted folders.
    by_file = {s["meta"]["file"]: s for s in samples}
    assert sorted(by_file) == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]
    assert all(s["key"] == "folder-train-" + f.replace("/", "%2F").replace(".", "%2E") for f, s in by_file.items())
    assert [by_file[f]["label"] for f in sorted(by_file)] == [0, 0, 0, 1, 1]
    assert by_file["cat/1.png"]["caption"] == "a grey cat" and "caption" not in by_file["cat/0.png"]
    with Image.open(root / "dog" / "1.png") as im:
        assert np.array_equal(by_file["dog/1.png"]["image"], np.asarray(im.convert("RGB")))
    # PNGs of the size asked are stored as the files' own bytes
    raw = {s["key"]: s for s in iter_samples(shard_paths(RunDir(cfg.run_dir).data), decode=False)}
    assert raw[by_file["dog/1.png"]["key"]]["encoded"] == ("png", (root / "dog" / "1.png").read_bytes())
    assert manifest["num_passed_through"] == 5


def test_flat_image_folder_is_unlabelled_and_converts_channels(make_cfg, tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        save_png(root / f"img{i}.png", (12, 12), value=i)
    cfg = make_cfg("data=image_folder", f"data.root={root}", "data.image_size=12", "data.channels=1")
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert manifest["num_classes"] == 0 and manifest["class_names"] is None and manifest["channels"] == 1
    assert all(s["label"] == -1 and s["image"].shape == (12, 12) for s in samples)


def test_mixed_image_sizes_name_the_file_unless_resized(make_cfg, tmp_path):
    root = tmp_path / "mixed"
    for i in range(4):
        save_png(root / f"a{i}.png", (16, 16), value=i)
    bad = save_png(root / "b_odd.png", (20, 24), value=9)
    cfg = make_cfg("data=image_folder", f"data.root={root}", "data.image_size=16", "data.shard_size=2")
    with pytest.raises(ValueError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert str(bad) in message and "20x24" in message and "16x16" in message and "data.resize" in message
    # Two full shards were written before the bad file: still, no manifest claims completeness.
    assert not RunDir(cfg.run_dir).data_manifest.exists()

    resized = make_cfg("data=image_folder", f"data.root={root}", "data.image_size=16", "data.resize=16")
    prepare.run(resized)
    manifest, samples = read_back(resized.run_dir)
    assert manifest["num_samples"] == 5 and all(s["image"].shape == (16, 16, 3) for s in samples)


def test_image_folder_missing_or_empty_is_an_error(make_cfg, tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        prepare.run(make_cfg("data=image_folder", f"data.root={missing}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* found in " + re.escape(str(empty))):
        prepare.run(make_cfg("data=image_folder", f"data.root={empty}"))


def test_resize_must_agree_with_image_size(make_cfg):
    with pytest.raises(ValueError, match="data.image_size=32"):
        prepare.run(make_cfg("data=digits", "data.resize=32"))


# ------------------------------------------------------------------ existing webdataset shards


def test_webdataset_source_keeps_its_keys_and_shards(make_cfg, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 10, 10, 3), dtype=np.uint8)
    with ShardSetWriter(tmp_path / "in", shard_size=2) as w:
        for i, im in enumerate(images):
            w.write(f"orig_{i}", im, label=i % 3, caption=f"caption {i}" if i != 2 else None)
    pattern = str(tmp_path / "in" / "shard-{000000..000002}.tar")
    cfg = make_cfg(
        "data=webdataset", f"data.urls='{pattern}'", "data.image_size=10", "data.num_classes=3", "data.split=val"
    )
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    # A key is the input shard's name and the sample's own key, whatever order the shards were read in.
    origin = [int(s["key"].rsplit("_", 1)[1]) for s in samples]
    assert [s["key"] for s in samples] == [f"wds-val-shard-{i // 2:06d}%2Forig_{i}" for i in origin]
    assert sorted(origin) == list(range(5)) and manifest["num_classes"] == 3
    assert manifest["order"] == dict(permuted="shards", seed=0)
    for s, i in zip(samples, origin):
        assert s["label"] == i % 3 and s.get("caption") == (f"caption {i}" if i != 2 else None)
        assert s["meta"] == {"shard": str(tmp_path / "in" / f"shard-{i // 2:06d}.tar"), "key": f"orig_{i}"}
        # stored as JPEG (the webdataset default) at quality 95: the pixels that encoding gives
        assert np.array_equal(s["image"], decode_stored(encode_image(images[i], "jpeg", 95)[1]))
    # Each input shard became one shard of data/, in a permuted order, its samples in their own order.
    blocks = [[int(k.split("shard-")[1][:6]) for k in (e["first_key"], e["last_key"])] for e in manifest["shards"]]
    assert all(a == b for a, b in blocks) and sorted(a for a, _ in blocks) == [0, 1, 2]
    assert [e["num_samples"] for e in manifest["shards"]] == [[2, 2, 1][a] for a, _ in blocks]
    assert all(b == a + 1 for a, b in zip(origin, origin[1:]) if a // 2 == b // 2)
    assert manifest["image_format"] == "jpeg" and manifest["quality"] == 95

    with pytest.raises(FileNotFoundError, match="shard-000009.tar"):
        prepare.run(
            make_cfg(
                "data=webdataset", f"data.urls=[{tmp_path / 'in' / 'shard-000009.tar'}]", run_dir=tmp_path / "other"
            )
        )


def test_an_unlabelled_sample_in_a_labelled_set_is_refused_naming_it(make_cfg, tmp_path):
    rng = np.random.default_rng(0)
    with ShardSetWriter(tmp_path / "in", shard_size=4) as w:
        for i in range(4):
            w.write(f"orig_{i}", rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), label=-1 if i == 2 else i % 3)
    cfg = make_cfg(
        "data=webdataset",
        f"data.urls=[{tmp_path / 'in' / 'shard-000000.tar'}]",
        "data.image_size=10",
        "data.num_classes=3",
    )
    with pytest.raises(BadInput, match=r"shard-000000.tar#orig_2 has no label \(-1\).*data.num_classes=0"):
        prepare.run(cfg)
    assert not (RunDir(cfg.run_dir).data_manifest).exists()  # nothing left looking complete
    # the same shards as an unconditional set are fine
    prepare.run(
        make_cfg(
            "data=webdataset",
            f"data.urls=[{tmp_path / 'in' / 'shard-000000.tar'}]",
            "data.image_size=10",
            "data.num_classes=0",
            run_dir=tmp_path / "uncond",
        )
    )


# ------------------------------------------------------------------ configs

REQUIRED = {
    "source",
    "root",
    "split",
    "limit",
    "image_size",
    "channels",
    "num_classes",
    "class_names",
    "shard_size",
    "resize",
}


@pytest.mark.parametrize("name", ["fashion_mnist", "digits", "image_folder", "webdataset"])
def test_data_configs_have_required_commented_keys(name):
    path = Path(CONF_DIR) / "data" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    assert REQUIRED <= set(cfg.keys()) and cfg.source == name
    for line in path.read_text().splitlines():
        if re.match(r"^\w+:", line):
            assert "#" in line, f"{path}: option without a comment: {line}"


def test_source_meta_round_trips_through_the_manifest(make_cfg):
    cfg = make_cfg("data=digits", "data.limit=10")
    prepare.run(cfg)
    meta = SourceMeta.from_manifest(load_manifest(RunDir(cfg.run_dir).data))
    assert meta == SourceMeta(image_size=8, channels=1, num_classes=10, class_names=[str(d) for d in range(10)])
