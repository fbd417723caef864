"""ADM's interchange .npz of samples, and FID against reference statistics (mu, sigma) in the Inception space."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ddm.errors import BadInput
from ddm.eval.fid import frechet_distance, frechet_distance_features, gaussian_stats
from ddm.eval.reference import load_reference, write_reference
from ddm.sampling.adm import read_adm_npz, write_adm_npz
from tests.real_inception import REAL_INCEPTION, digits, needs_real_inception

SPACE = "inception:7ff4a85c3a63"  # the space of the default_1.pt FID Inception


def test_adm_file_round_trips_through_plain_numpy(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    labels = np.array([3, 0, 9, 9, 1])
    path = write_adm_npz(tmp_path / "s.npz", gray, labels)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (5, 8, 8, 3)
    assert all((x[..., c] == gray).all() for c in range(3))  # grayscale repeated to RGB, values untouched
    assert y.dtype == np.int64 and y.tolist() == [3, 0, 9, 9, 1]
    images, read_labels = read_adm_npz(path)
    assert (images == x).all() and read_labels.tolist() == [3, 0, 9, 9, 1]
    # RGB stays as it is; unconditional samples (labels -1) carry no arr_1
    rgb = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    write_adm_npz(tmp_path / "u.npz", rgb, np.full(2, -1))
    with np.load(tmp_path / "u.npz") as f:
        assert f.files == ["arr_0"] and (f["arr_0"] == rgb).all()


def test_a_file_in_another_layout_is_refused(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(BadInput, match=r"f\.npz.*uint8 \[N, H, W, 3\]"):
        read_adm_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(BadInput, match="no `arr_0`"):
        read_adm_npz(tmp_path / "g.npz")
    with pytest.raises(BadInput, match="uint8"):
        write_adm_npz(tmp_path / "h.npz", np.zeros((2, 4, 4), np.float32))


def test_the_sample_stage_writes_its_images_in_the_adm_layout(tiny_run):
    out = tiny_run.rd.samples
    with np.load(out / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    adm, adm_labels = read_adm_npz(out / "samples_adm.npz")
    rgb = images[..., None] if images.ndim == 3 else images
    rgb = np.repeat(rgb, 3 // rgb.shape[-1], axis=-1)  # grayscale repeated, RGB kept
    assert (adm == rgb).all() and adm_labels.tolist() == labels.tolist()  # digits: class labels 0..9


def _stats_file(path, dim=2048, space=None, symmetric=True):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(dim, dim))
    sigma = a @ a.T if symmetric else a
    arrays = dict(mu=rng.normal(size=dim), sigma=sigma, **({} if space is None else dict(feature_space=space)))
    np.savez(path, **arrays)
    return path


def test_a_reference_of_another_feature_space_is_refused(tmp_path):
    path = _stats_file(tmp_path / "cifar_classifier.npz", dim=64)
    with pytest.raises(BadInput, match=r"cifar_classifier\.npz: mu has dim 64, not the 2048"):
        load_reference(path, SPACE)
    with pytest.raises(BadInput, match="not symmetric"):
        load_reference(_stats_file(tmp_path / "a.npz", dim=16, symmetric=False), SPACE, dim=16)
    with pytest.raises(BadInput, match="recorded in feature space inception:000000000000"):
        load_reference(_stats_file(tmp_path / "b.npz", dim=16, space="inception:000000000000"), SPACE, dim=16)
    np.savez(tmp_path / "c.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(BadInput, match="not `mu` and `sigma`"):
        load_reference(tmp_path / "c.npz", SPACE)
    # ADM's reference batches hold images and spatial statistics beside mu/sigma, and no feature_space
    adm = tmp_path / "VIRTUAL_adm.npz"
    rng = np.random.default_rng(2)
    np.savez(adm, arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=rng.normal(size=16), sigma=np.eye(16), mu_s=np.zeros(3))
    ref = load_reference(adm, SPACE, dim=16)
    assert ref.feature_space is None and ref.describe()["dim"] == 16 and len(ref.sha256) == 64


def test_without_a_reference_the_settings_are_those_of_before(tiny_run):
    """No ``reference`` key when it is null: metrics.json written before the option still counts as done."""
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import eval_group

    settings = evaluate.settings_of(tiny_run.settings(*eval_group()))["eval"]
    # nor the later options at their defaults: no Inception file, no DINOv2 file, and where the cache lives
    assert not {"reference", "inception_score", "sfid", "dinov2_weights", "dinov2_model", "reference_cache"} & set(
        settings
    )


@pytest.mark.parametrize("n", [5, 40])  # fewer images than dimensions, and more
def test_fd_to_a_reference_equals_the_fd_of_the_two_gaussians(n):
    from ddm.eval.reference import ReferenceStats

    rng = np.random.default_rng(n)
    real = rng.normal(size=(60, 24)) * np.linspace(0.5, 2, 24) + 3
    mu, sigma = gaussian_stats(real)
    ref = ReferenceStats(mu, sigma, None, "", None, mu_s=mu[:6], sigma_s=sigma[:6, :6])
    x = rng.normal(size=(n, 24)) * 1.5 + 2.5
    # the same number to rounding (either way is off the exact value by about 1e-8, relative)
    assert ref.fd(x) == pytest.approx(frechet_distance(*gaussian_stats(x), mu, sigma), rel=1e-7)
    assert ref.fd(x) == pytest.approx(ref.fd(x))  # the cached root gives the same number again
    assert ref.sfd(x[:, :6]) == pytest.approx(frechet_distance(*gaussian_stats(x[:, :6]), mu[:6], sigma[:6, :6]))
    assert ref.fd(real) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(BadInput, match=r"features must be \[N, 24\]"):
        ref.fd(x[:, :5])


@needs_real_inception
def test_fid_against_saved_statistics_equals_fid_from_the_features(tmp_path):
    from ddm.eval.inception import load_inception

    inception = load_inception(REAL_INCEPTION)
    generated, real = inception(digits(0, 12)), inception(digits(100, 12))
    path = write_reference(tmp_path / "digits_ref.npz", real, inception.space)
    ref = load_reference(path, inception.space)
    assert ref.feature_space == inception.space == SPACE
    direct = frechet_distance(*gaussian_stats(generated), *gaussian_stats(real))
    assert ref.fd(generated) == pytest.approx(direct, rel=1e-6)  # rounding of 2048-d eigenvalues, either way
    # the same number as the sample-space formula the held-out comparison uses (rounding of 2048-d eigenvalues)
    assert ref.fd(generated) == pytest.approx(frechet_distance_features(generated, real), rel=1e-4)
    assert ref.fd(real) == pytest.approx(0.0, abs=1e-3)


@needs_real_inception
def test_metrics_and_report_name_the_reference(tiny_run, tmp_path):
    from ddm.stages import evaluate
    from tests.test_evaluate_stage import OVERRIDES, eval_group

    ref_path = write_reference(tmp_path / "ref.npz", np.random.default_rng(3).normal(size=(40, 2048)), SPACE)
    run = tiny_run.copy(tmp_path / "run")
    overrides = [*eval_group(), f"eval.feature_net.cache_dir={tmp_path / 'cache'}", *OVERRIDES]
    overrides += [f"eval.inception_weights={REAL_INCEPTION}", "eval.num_samples=10", "eval.strategies=[top1]"]
    overrides += ["eval.fm_loss.per_expert=false", "eval.flops.measure_images=0"]
    wrong = _stats_file(tmp_path / "small.npz", dim=64)
    with pytest.raises(BadInput, match=r"small\.npz: mu has dim 64"):
        evaluate.run(run.settings(*overrides, f"eval.reference={wrong}"))
    metrics = evaluate.run(run.settings(*overrides, f"eval.reference={ref_path}"))
    space = metrics["feature_spaces"][SPACE]
    ref = load_reference(ref_path, SPACE)
    assert space["reference"] == dict(
        kind="stats_file",
        file=str(ref_path),
        sha256=ref.sha256,
        feature_space=SPACE,
        dim=2048,
        num_images=40,
        image_size=None,  # write_reference was not told: no size to check against the samples'
        spatial=False,
    )
    assert metrics["settings"]["eval"]["reference_sha256"] == ref.sha256  # new statistics at that path: redone
    top1 = space["strategies"]["top1"]
    assert top1["fd_reference"] > 0 and top1["fd_reference"] != top1["fd"]
    report = (run.rd.root / "evaluation" / "report.md").read_text()
    assert f"`{ref_path}` (sha256 {ref.sha256[:12]}" in report
    shutil.rmtree(run.rd.root)
