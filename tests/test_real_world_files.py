"""Real-world image files through ``prepare``: 16-bit images scaled, transparency composited over
``data.background``, unreadable files refused naming them or (``data.on_error=skip``) skipped and listed,
the same rules for image folders and webdataset shards (one decoder, ``decode_image``)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddm.artifacts import RunDir
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.data.sources import UnreadableImage, decode_image, named_key
from ddm.errors import BadInput
from ddm.io import read_json, write_json
from ddm.stages import prepare


def read_back(run_dir) -> tuple[dict, list[dict]]:
    folder = RunDir(run_dir).data
    manifest = load_manifest(folder)
    return manifest, list(iter_samples(shard_paths(folder, manifest)))


def png_bytes(im: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **params)
    return buf.getvalue()


def save_rgb(path: Path, side: int = 8, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(value).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def blend(c: int, a: int, bg: int) -> int:
    """The exact composite of one channel: round((c * a + bg * (255 - a)) / 255)."""
    return round((c * a + bg * (255 - a)) / 255)


# ------------------------------------------------------------------ 16-bit images


GRADIENT16 = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
GRADIENT8 = np.round(GRADIENT16.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_is_scaled_to_8_bit_not_clipped(make_cfg, tmp_path, channels):
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(GRADIENT16).save(root / "gradient.png")
    with Image.open(root / "gradient.png") as im:
        assert im.mode == "I;16"  # what PIL reads back: 16 bits a pixel
    assert GRADIENT8.min() == 0 and GRADIENT8.max() == 255 and len(np.unique(GRADIENT8)) > 200  # a real ramp
    cfg = make_cfg(
        "data=image_folder",
        "data.image_format=png",
        f"data.root={root}",
        "data.image_size=16",
        f"data.channels={channels}",
    )
    prepare.run(cfg)
    _, (sample,) = read_back(cfg.run_dir)
    expected = GRADIENT8 if channels == 1 else np.repeat(GRADIENT8[:, :, None], 3, axis=2)
    assert sample["image"].dtype == np.uint8 and np.array_equal(sample["image"], expected)


def test_big_endian_and_32_bit_integer_modes_scale_the_same_and_out_of_range_is_refused(tmp_path):
    big = tmp_path / "big.tif"
    Image.fromarray(GRADIENT16.astype(">u2")).save(big)
    wide = tmp_path / "wide.tif"
    Image.fromarray(GRADIENT16.astype(np.int32)).save(wide)
    with Image.open(big) as a, Image.open(wide) as b:
        assert (a.mode, b.mode) == ("I;16B", "I")
    assert np.array_equal(decode_image(big, 1, [255, 255, 255]), GRADIENT8)
    assert np.array_equal(decode_image(wide, 1, [255, 255, 255]), GRADIENT8)
    beyond = tmp_path / "beyond.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(beyond)
    with pytest.raises(UnreadableImage, match=r"beyond\.tif: I pixels span 70000\.\.70000, beyond 16 bit"):
        decode_image(beyond, 1, [255, 255, 255])


# ------------------------------------------------------------------ transparency


def rgba_image() -> np.ndarray:
    """4x4 RGBA: pixel (0,0) red, fully transparent; (0,1) red, half transparent; the rest opaque green."""
    px = np.zeros((4, 4, 4), dtype=np.uint8)
    px[...] = (0, 200, 0, 255)
    px[0, 0] = (255, 0, 0, 0)
    px[0, 1] = (255, 0, 0, 128)
    return px


@pytest.mark.parametrize("background", [None, (0, 0, 255)])
def test_rgba_is_composited_on_the_background(make_cfg, tmp_path, background):
    root = tmp_path / "alpha"
    root.mkdir()
    Image.fromarray(rgba_image(), "RGBA").save(root / "a.png")
    overrides = [f"data.background=[{','.join(map(str, background))}]"] if background else []
    bg = background or (255, 255, 255)  # the default: white
    cfg = make_cfg("data=image_folder", "data.image_format=png", f"data.root={root}", "data.image_size=4", *overrides)
    prepare.run(cfg)
    _, (sample,) = read_back(cfg.run_dir)
    image = sample["image"]
    assert tuple(image[0, 0]) == bg  # the red under alpha 0 does not show
    assert tuple(image[0, 1]) == tuple(blend(c, 128, b) for c, b in zip((255, 0, 0), bg))
    assert tuple(image[0, 1]) == ((255, 127, 127) if background is None else (128, 0, 127))
    assert (image[1:] == (0, 200, 0)).all()  # opaque pixels untouched


def test_la_and_palette_transparency_composite_too_in_gray_and_rgb(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[...] = (90, 255)
    la[0, 0] = (200, 0)  # hidden gray 200
    la[0, 1] = (200, 100)
    la_png = png_bytes(Image.fromarray(la, "LA"))
    gray = decode_image(la_png, 1, [40, 40, 40])
    assert gray.shape == (2, 2) and gray[0, 0] == 40 and gray[0, 1] == blend(200, 100, 40) and gray[1, 1] == 90
    rgb = decode_image(la_png, 3, [255, 0, 0])
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[0, 1]) == (blend(200, 100, 255), 78, 78)

    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    palette.putdata([0, 1, 1, 0])
    data = png_bytes(palette, transparency=0)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "P" and im.info.get("transparency") == 0
    out = decode_image(data, 3, [255, 255, 255])
    assert [tuple(p) for p in out.reshape(-1, 3)] == [(255, 255, 255), (0, 0, 255), (0, 0, 255), (255, 255, 255)]


def test_a_bad_background_or_on_error_is_refused_naming_the_key(make_cfg, tmp_path):
    root = tmp_path / "imgs"
    save_rgb(root / "a.png")
    with pytest.raises(BadInput, match=r"data\.background=\[1, 2\]: give three values 0\.\.255"):
        prepare.run(
            make_cfg(
                "data=image_folder",
                "data.image_format=png",
                f"data.root={root}",
                "data.image_size=8",
                "data.background=[1,2]",
            )
        )
    with pytest.raises(BadInput, match=r"data\.background=\[0, 0, 256\]"):
        prepare.run(make_cfg("data=digits", "data.background=[0,0,256]"))
    with pytest.raises(BadInput, match=r"data\.on_error='maybe'.*'raise' or 'skip'"):
        make_cfg("data=image_folder", "data.image_format=png", f"data.root={root}", "data.on_error=maybe")
    assert not RunDir(tmp_path / "run").data_manifest.exists()


# ------------------------------------------------------------------ unreadable files


def folder_with_bad_files(root: Path) -> tuple[list[Path], Path, Path]:
    """Three good 8x8 PNGs (one captioned), a truncated PNG, an empty file and a non-image note."""
    good = [save_rgb(root / f"good{i}.png", value=i) for i in range(3)]
    (root / "good1.txt").write_text("a caption, not an image\n")
    (root / "notes.md").write_text("not an image\n")
    whole = png_bytes(Image.fromarray(np.random.default_rng(9).integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    truncated = root / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    empty = root / "empty.png"
    empty.write_bytes(b"")
    return good, truncated, empty


def test_an_unreadable_file_stops_prepare_naming_it(make_cfg, tmp_path):
    for name in ("truncated", "empty"):
        root = tmp_path / name
        folder_with_bad_files(root)
        other = "empty" if name == "truncated" else "truncated"
        (root / f"{other}.png").unlink()  # one bad file each: the error must name that one
        cfg = make_cfg(
            "data=image_folder",
            "data.image_format=png",
            f"data.root={root}",
            "data.image_size=8",
            run_dir=tmp_path / f"r_{name}",
        )
        with pytest.raises(BadInput) as err:
            prepare.run(cfg)
        message = str(err.value)
        assert "\n" not in message and str(root / f"{name}.png") in message and "data.on_error=skip" in message
        assert ("truncated or damaged" if name == "truncated" else "empty file (0 bytes)") in message
        assert not RunDir(cfg.run_dir).data_manifest.exists()


def test_on_error_skip_keeps_the_good_images_and_lists_the_bad(make_cfg, tmp_path, caplog):
    root = tmp_path / "mixed"
    good, truncated, empty = folder_with_bad_files(root)
    cfg = make_cfg(
        "data=image_folder", "data.image_format=png", f"data.root={root}", "data.image_size=8", "data.on_error=skip"
    )
    with caplog.at_level(logging.INFO, logger="ddm"):
        summary = prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert manifest["num_samples"] == 3 and manifest["num_skipped"] == 2 and summary["num_skipped"] == 2
    # Keys name the files: the good ones keep theirs whatever was skipped beside them.
    by_key = {s["key"]: s for s in samples}
    assert sorted(by_key) == sorted(named_key("folder", "train", p.relative_to(root).as_posix()) for p in good)
    for p in good:
        with Image.open(p) as im:
            stored = by_key[named_key("folder", "train", p.relative_to(root).as_posix())]
            assert np.array_equal(stored["image"], np.asarray(im))
            assert stored["meta"] == {"file": p.name}  # where it came from travels with it
    record = read_json(RunDir(cfg.run_dir).data / "skipped.json")
    assert record["num_skipped"] == 2 and [r["file"] for r in record["skipped"]] == [str(empty), str(truncated)]
    assert "empty file" in record["skipped"][0]["reason"] and "truncated" in record["skipped"][1]["reason"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prepare: 3 samples"))
    assert "2 unreadable images skipped" in line and "skipped.json" in line
    assert "1 file in data.root not read, not being images by their extension" in line  # notes.md, not good1.txt
    assert prepare.run(cfg)["skipped"] is True  # a rerun with the same settings keeps the result

    # Every image bad: no manifest, and the error says why.
    for p in good:
        p.unlink()
    with pytest.raises(BadInput, match=r"gave no samples \(2 unreadable images skipped"):
        prepare.run(make_cfg(*cfg_overrides(root), "data.on_error=skip", "redo=true"))
    assert not RunDir(cfg.run_dir).data_manifest.exists() and not (RunDir(cfg.run_dir).data / "skipped.json").exists()


def cfg_overrides(root: Path) -> list[str]:
    return ["data=image_folder", "data.image_format=png", f"data.root={root}", "data.image_size=8"]


def test_a_run_without_skips_writes_no_skip_list_and_a_redo_clears_an_old_one(make_cfg, tmp_path):
    root = tmp_path / "mixed"
    good, truncated, empty = folder_with_bad_files(root)
    prepare.run(make_cfg(*cfg_overrides(root), "data.on_error=skip"))
    truncated.unlink()
    empty.unlink()
    cfg = make_cfg(*cfg_overrides(root), "data.on_error=skip", "redo=true")
    prepare.run(cfg)
    manifest, _ = read_back(cfg.run_dir)
    assert manifest["num_skipped"] == 0 and not (RunDir(cfg.run_dir).data / "skipped.json").exists()


def test_a_manifest_from_before_the_keys_is_kept_on_rerun(make_cfg, tmp_path):
    root = tmp_path / "imgs"
    save_rgb(root / "a.png")
    cfg = make_cfg(*cfg_overrides(root))
    prepare.run(cfg)
    path = RunDir(cfg.run_dir).data_manifest
    manifest = read_json(path)
    del manifest["settings"]["data"]["background"], manifest["settings"]["data"]["on_error"]
    write_json(path, manifest)
    assert prepare.run(cfg)["skipped"] is True  # made with what these keys' defaults do
    with pytest.raises(BadInput, match="data.on_error"):
        prepare.run(make_cfg(*cfg_overrides(root), "data.on_error=skip"))  # but not with other values


# ------------------------------------------------------------------ webdataset shards: the same rules


def write_shard(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_shard_with_an_rgba_png_composites_it_like_a_folder_does(make_cfg, tmp_path):
    rgba = Image.fromarray(rgba_image(), "RGBA")
    shard = write_shard(tmp_path / "in" / "s.tar", {"x0.png": png_bytes(rgba), "x0.cls": b"1"})
    cfg = make_cfg(
        "data=webdataset",
        "data.image_format=png",
        f"data.urls=[{shard}]",
        "data.image_size=4",
        "data.num_classes=2",
        "data.background=[0,0,0]",
    )
    prepare.run(cfg)
    _, (sample,) = read_back(cfg.run_dir)
    assert sample["label"] == 1
    assert tuple(sample["image"][0, 0]) == (0, 0, 0) and tuple(sample["image"][0, 1]) == (128, 0, 0)
    root = tmp_path / "folder"
    root.mkdir()
    rgba.save(root / "x0.png")
    folder_cfg = make_cfg(
        *cfg_overrides(root)[:3], "data.image_size=4", "data.background=[0,0,0]", run_dir=tmp_path / "f"
    )
    prepare.run(folder_cfg)
    _, (same,) = read_back(folder_cfg.run_dir)
    assert np.array_equal(same["image"], sample["image"])


def test_a_shard_with_unreadable_images_raises_or_skips(make_cfg, tmp_path):
    good = png_bytes(Image.fromarray(np.full((4, 4, 3), 7, dtype=np.uint8)))
    shard = write_shard(
        tmp_path / "in" / "s.tar",
        {"a.png": good, "b.png": good[: len(good) // 2], "c.png": b"", "d.txt": b"no image here", "e.png": good},
    )
    overrides = ["data=webdataset", "data.image_format=png", f"data.urls=[{shard}]", "data.image_size=4"]
    with pytest.raises(BadInput, match=r"s\.tar#b\.png: .*data\.on_error=skip"):
        prepare.run(make_cfg(*overrides))
    cfg = make_cfg(*overrides, "data.on_error=skip", run_dir=tmp_path / "skip")
    prepare.run(cfg)
    manifest, samples = read_back(cfg.run_dir)
    assert [s["key"] for s in samples] == ["wds-train-s%2Fa", "wds-train-s%2Fe"]  # the shard's name and own keys
    assert manifest["num_skipped"] == 3
    record = json.loads((RunDir(cfg.run_dir).data / "skipped.json").read_text())
    assert [r["file"] for r in record["skipped"]] == [f"{shard}#b.png", f"{shard}#c.png", f"sample {shard}#d"]
    assert "empty" in record["skipped"][1]["reason"] and "has no image" in record["skipped"][2]["reason"]


def test_a_photo_taken_turned_is_stored_upright_and_not_passed_through(make_cfg, tmp_path):
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    root = tmp_path / "turned"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(pixels).save(root / "turned.png", exif=exif)
    Image.fromarray(pixels).save(root / "plain.png")
    assert np.array_equal(decode_image(root / "turned.png", 3), np.rot90(pixels, k=-1))
    assert np.array_equal(decode_image(root / "plain.png", 3), pixels)
    cfg = make_cfg(*cfg_overrides(root))
    prepare.run(cfg)
    manifest = load_manifest(RunDir(cfg.run_dir).data)
    stored = {s["meta"]["file"]: s for s in iter_samples(shard_paths(RunDir(cfg.run_dir).data), decode=False)}
    assert stored["plain.png"]["encoded"] == ("png", (root / "plain.png").read_bytes())
    assert stored["turned.png"]["encoded"][1] != (root / "turned.png").read_bytes()
    assert manifest["num_passed_through"] == 1
