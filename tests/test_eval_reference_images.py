"""``eval.reference`` naming images: statistics computed once from a folder of images or shards, then cached.

The FID Inception costs about a second an image on these CPUs, so each test runs it on a handful of digits.
"""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddm.data.shards import ShardSetWriter
from ddm.errors import BadInput, MissingInput
from ddm.eval.fid import frechet_distance_features
from ddm.eval.reference import IMAGES, load_reference, write_reference
from ddm.eval.reference_images import RunningGaussian, find_image_set, reference_from_images
from tests.real_inception import REAL_INCEPTION, digits, needs_real_inception


def write_folder(folder, images, fmt: str = "png") -> list:
    """Images as files in two sub-folders (the folder is read recursively, in sorted path order)."""
    paths = []
    for i, image in enumerate(images):
        path = folder / f"part{i % 2}" / f"img{i:03d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def inception():
    from ddm.eval.inception import load_inception

    return load_inception(REAL_INCEPTION)


@pytest.fixture
def counted(monkeypatch):
    """Counts the images the Inception is run on (the real network still runs)."""
    from ddm.eval.inception import InceptionFeatures

    seen = []
    real = InceptionFeatures.outputs

    def outputs(self, images, *args, **kwargs):
        seen.append(len(images))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(InceptionFeatures, "outputs", outputs)
    return seen


def test_running_statistics_equal_those_of_all_rows_at_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 5)) * [1, 10, 0.1, 3, 1] + 1e4  # a large offset must not cancel the covariance away
    acc = RunningGaussian()
    for i in range(0, 37, 8):
        acc.update(x[i : i + 8])
    mu, sigma = acc.stats()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-10)


@needs_real_inception
def test_fid_against_images_equals_fid_against_their_saved_statistics(tmp_path, inception, counted):
    ref_images, generated = digits(0, 5), digits(200, 3)
    folder = tmp_path / "reference"
    write_folder(folder, ref_images)
    # the statistics file of the same images, from their features
    direct = inception.outputs(ref_images, 8, spatial=True)
    npz = write_reference(tmp_path / "ref.npz", direct["features"], inception.space, direct["spatial"], (8, 8))
    from_file = load_reference(npz, inception.space)
    counted.clear()

    cache = tmp_path / "cache"
    ref = reference_from_images(folder, inception, cache, batch_size=2, image_size=(8, 8))
    assert counted == [2, 2, 1]  # computed in batches of eval.inception_batch_size
    assert ref.kind == IMAGES and ref.num_images == 5 and ref.image_size == (8, 8)
    assert ref.feature_space == inception.space and ref.extra["cached"] is False
    np.testing.assert_allclose(ref.mu, from_file.mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ref.sigma, from_file.sigma, rtol=1e-4, atol=1e-8)
    gen = inception.outputs(generated, 8, spatial=True)
    assert ref.fd(gen["features"]) == pytest.approx(from_file.fd(gen["features"]), rel=1e-5)
    assert ref.sfd(gen["spatial"]) == pytest.approx(from_file.sfd(gen["spatial"]), rel=1e-5)
    assert ref.fd(gen["features"]) == pytest.approx(
        frechet_distance_features(gen["features"], direct["features"]), rel=1e-5
    )
    # the cache file is an ordinary statistics file of this space: load_reference reads it too
    (cache_file,) = cache.glob("*.npz")
    assert str(cache_file) == ref.describe()["cache_file"]
    assert load_reference(cache_file, inception.space).fd(gen["features"]) == pytest.approx(ref.fd(gen["features"]))

    # a rerun reads the cache: the Inception does not run again
    counted.clear()
    again = reference_from_images(folder, inception, cache, batch_size=2)
    assert counted == [] and again.extra["cached"] is True
    assert (again.mu == ref.mu).all() and again.sha256 == ref.sha256
    # other bytes are other images: computed again, into another cache file
    changed = ref_images.copy()
    changed[0, 0, 0] ^= 1
    Image.fromarray(changed[0]).save(folder / "part0" / "img000.png")
    other = reference_from_images(folder, inception, cache, batch_size=8)
    assert counted == [5] and other.sha256 != ref.sha256 and len(list(cache.glob("*.npz"))) == 2


@needs_real_inception
def test_shards_give_the_statistics_of_their_images(tmp_path, inception):
    """A ddm shard set (another run's data/) and plain webdataset shards of the same images agree."""
    images = digits(10, 3)
    with ShardSetWriter(tmp_path / "data", shard_size=2, image_size=8, channels=1, num_classes=10) as w:
        for i, image in enumerate(images):
            w.write(f"s{i}", image, i)
    plain = tmp_path / "wds"
    plain.mkdir()
    with tarfile.open(plain / "train-0000.tar", "w") as tar:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(image).convert("RGB").save(buf, format="PNG")
            for name, data in ((f"k{i}.jpg.txt", b"caption"), (f"k{i}.png", buf.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ddm = reference_from_images(tmp_path / "data", inception, tmp_path / "cache", image_size=(8, 8))
    wds = reference_from_images(plain, inception, tmp_path / "cache", image_size=(8, 8))
    assert ddm.extra["source"] == wds.extra["source"] == "shards" and ddm.num_images == wds.num_images == 3
    direct = inception(images)
    np.testing.assert_allclose(ddm.mu, direct.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(wds.mu, ddm.mu, rtol=1e-5, atol=1e-7)  # gray stored as RGB: the same features
    np.testing.assert_allclose(wds.sigma, ddm.sigma, rtol=1e-4, atol=1e-8)


def test_folders_that_are_not_one_image_set_are_refused(tmp_path):
    with pytest.raises(MissingInput, match=r"eval.reference=.*nowhere is not a folder"):
        find_image_set(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match=r"empty holds no images \(.png, .jpg, .jpeg\) and no .tar shards"):
        find_image_set(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    write_folder(mixed, digits(0, 2))
    (mixed / "x.tar").write_bytes(b"")
    with pytest.raises(BadInput, match=r"mixed holds both .tar shards \(1\) and image files \(2\)"):
        find_image_set(mixed)


@needs_real_inception
def test_a_reference_of_another_image_size_is_refused(tmp_path, inception, counted):
    big = tmp_path / "big"
    write_folder(big, np.zeros((2, 16, 12), np.uint8))
    with pytest.raises(BadInput, match=r"big holds 16x12 images but the samples are 8x8: .*of 8x8 images"):
        reference_from_images(big, inception, tmp_path / "cache", image_size=(8, 8))
    sizes = tmp_path / "sizes"
    write_folder(sizes, np.zeros((2, 8, 8), np.uint8))
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(sizes / "part1" / "z.png")
    with pytest.raises(BadInput, match=r"z\.png is 9x8, the images before it 8x8: .*resize them first"):
        reference_from_images(sizes, inception, tmp_path / "cache")
    assert counted == []  # refused before the Inception ran
    # ADM's reference batches: the size of arr_0's images, read from its header
    adm = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    rng = np.random.default_rng(0)
    np.savez(adm, arr_0=np.zeros((3, 64, 64, 3), np.uint8), mu=rng.normal(size=2048), sigma=np.eye(2048))
    ref = load_reference(adm, inception.space)
    assert ref.image_size == (64, 64) and ref.num_images == 3 and ref.describe()["kind"] == "stats_file"
    with pytest.raises(BadInput, match=r"VIRTUAL_imagenet64_labeled\.npz holds 64x64 images but the run's images"):
        ref.check_image_size((8, 8), "the run's images")
    ref.check_image_size((64, 64), "the run's images")


@needs_real_inception
def test_evaluate_reports_fid_and_sfid_against_a_folder_of_images(tiny_run, tmp_path, counted):
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import OVERRIDES, eval_group

    folder = tmp_path / "reference"
    write_folder(folder, digits(300, 4))
    run = tiny_run.copy(tmp_path / "run")
    overrides = [*eval_group(), f"eval.feature_net.cache_dir={tmp_path / 'cache'}", *OVERRIDES]
    overrides += [f"eval.inception_weights={REAL_INCEPTION}", "eval.num_samples=4", "eval.strategies=[top1]"]
    overrides += ["eval.fm_loss.per_expert=false", "eval.flops.measure_images=0", "eval.inception_batch_size=8"]
    overrides += [f"eval.reference_cache={tmp_path / 'refcache'}"]
    big = tmp_path / "big"
    write_folder(big, np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(BadInput, match=r"big holds 16x16 images but the run's images are 8x8"):
        evaluate.run(run.settings(*overrides, f"eval.reference={big}"))
    with pytest.raises(BadInput, match=r"eval.inception_weights=.*default_1\.pt.*Inception Score"):
        evaluate.run(run.settings(*overrides, f"eval.reference={folder}", "eval.inception_score=true"))
    assert counted == []  # both refused before any image went through the Inception

    metrics = evaluate.run(run.settings(*overrides, f"eval.reference={folder}"))
    space = metrics["feature_spaces"]["inception:7ff4a85c3a63"]
    assert space["sfid"] is True and space["inception_score"] is False  # auto: what default_1.pt gives
    ref = space["reference"]
    assert ref["kind"] == "images" and ref["source"] == "image_folder" and ref["file"] == str(folder)
    assert ref["num_images"] == 4 and ref["image_size"] == [8, 8] and ref["spatial"] is True
    assert ref["sha256"] == find_image_set(folder).digest() == metrics["settings"]["eval"]["reference_sha256"]
    for row in [space["strategies"]["top1"], space["reference_training_images"]]:
        assert row["fd_reference"] > 0 and row["sfid"] > 0 and row["sfid_reference"] > 0
        assert "inception_score" not in row
    report = (run.rd.root / "evaluation" / "report.md").read_text()
    section = report[report.index("## Sample quality in `inception:7ff4a85c3a63`") :]
    assert "| strategy | images | FD | sFID | precision |" in section
    assert f"FID against the statistics of the 4 images (8x8 px, image_folder) under `{folder}`" in section
    assert "| FID vs reference | sFID vs reference |" in section
    # the held-out digits are a slice of the training images: said next to the FD, with what to pass instead
    warning = section.index("**These held-out images are training images**")
    assert warning < section.index("## ", 5) and "`eval.reference`" in section[warning : warning + 600]
    shutil.rmtree(run.rd.root)
