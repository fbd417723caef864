"""A run that lives in a bucket (``run_dir=s3://...``): every stage on a fresh machine that has only the bucket."""

from __future__ import annotations

import numpy as np
import pytest

from ddm.errors import BadInput, Locked
from ddm.stages.runner import run_stage
from ddm.store import ObjectStore
from ddm.store import lock as store_lock

TINY = ("experiment=tiny", "expert.steps=6", "router.steps=6")


@pytest.mark.slow
def test_the_tiny_pipeline_runs_from_a_bucket_each_stage_on_a_fresh_island(s3_bucket, tmp_path):
    from ddm.config import settings

    run = f"{s3_bucket}/run"

    def on_island(name, *more):
        return settings([*TINY, f"run_dir={run}", f"store.cache={tmp_path / name}", *more])

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, on_island(stage))
    store = ObjectStore(run)
    for k in (0, 1):
        run_stage("train-expert", on_island(f"expert-{k}", f"expert.id={k}"))
        island = tmp_path / f"expert-{k}"
        pulled = {p.relative_to(island).as_posix() for p in island.rglob("*") if p.is_file()}
        other = f"cluster-{1 - k:02d}"
        # isolation: the expert's island holds its own partition and the lineage files, no other cluster's data
        assert not any(other in p and "manifest.json" not in p for p in pulled), sorted(pulled)
        assert not any(p.startswith(("embeddings/", "data/shard")) for p in pulled)
    assert store.exists("experts/expert-00/expert.pt") and store.exists("experts/expert-01/record.json")
    run_stage("train-router", on_island("router"))
    made = run_stage("sample", on_island("sampler", "sample.num_samples=6"))
    assert store.exists("samples/samples.npz") and store.exists("timings/sample.json")
    local = tmp_path / "check" / "samples.npz"
    store.get_file("samples/samples.npz", local)
    assert len(np.load(local)["images"]) == made["num_images"]
    # the evaluation on its own machine: the data, the experts, the router and the samples come from the bucket
    from tests.test_evaluate_stage import OVERRIDES as EVAL

    fast = [o for o in EVAL if o.startswith("eval.")]
    metrics = run_stage("evaluate", on_island("evaluator", *fast, f"eval.feature_net.cache_dir={tmp_path / 'fnet'}"))
    assert store.read_json("evaluation/metrics.json")["feature_spaces"] == metrics["feature_spaces"]
    # every stage again, each on a fresh machine: each finds its work finished from its record alone, pulls none of
    # what it made (not the samples, not the expert's weights) and pushes nothing
    from ddm.store.mirror import INDEX
    from ddm.store.objects import working_copy_path
    from ddm.store.stage_io import stage_io

    indexes = {k: store.read_bytes(k) for k in store.list() if k.endswith(INDEX)}
    evaluator = (*fast, f"eval.feature_net.cache_dir={tmp_path / 'fnet'}")
    again = {"prepare": (), "embed": (), "cluster": (), "partition": (), "train-expert": ("expert.id=0",)}
    again.update({"train-router": (), "sample": ("sample.num_samples=6",), "evaluate": evaluator})
    for stage, more in again.items():
        assert run_stage(stage, on_island(f"again-{stage}", *more)).skipped, stage
        io = stage_io(stage, 0)
        (wrote,) = io.writes
        copy = working_copy_path(run, tmp_path / f"again-{stage}")
        pulled = {p.relative_to(copy).as_posix() for p in (copy / wrote).rglob("*") if p.is_file()}
        assert pulled == {io.markers[wrote]}, (stage, sorted(pulled))
        if io.checks is not None:  # nor what it reads: its check needs manifests, not shards (data/, a partition)
            heavy = [p.name for p in copy.rglob("*") if p.suffix in (".tar", ".npy", ".pt")]
            assert not heavy, (stage, heavy)
    assert {k: store.read_bytes(k) for k in store.list() if k.endswith(INDEX)} == indexes

    # the cluster router's temperature, fitted on another machine: it adds route_tau.json to the router's folder
    # and keeps what that folder and the evaluation's listed
    from ddm.store.mirror import read_index

    listed = {f: set(read_index(store, f)["files"]) for f in ("router", "evaluation")}
    tau = run_stage("fit-route-tau", on_island("tau", *fast))
    assert set(read_index(store, "router")["files"]) == listed["router"] | {"route_tau.json"}
    assert set(read_index(store, "evaluation")["files"]) == listed["evaluation"]
    routed = ("sample.router=clusters", "sample.strategy=sample", "sample.route_tau=fitted", "sample.num_samples=6")
    assert run_stage("sample", on_island("routed", *routed, "redo=true"))["settings"]["route_tau"] == "fitted"
    assert run_stage("fit-route-tau", on_island("tau-again", *fast)).skipped and tau["tau"] > 0


def test_an_expert_trained_on_another_island_is_refused_while_it_runs(s3_bucket, tmp_path):
    """The bucket's lock of experts/expert-00, held by a running job of another island: this job is refused,
    naming it, and pushes nothing; once released, the expert trains."""
    from ddm.config import settings

    def on_island(name, *more):
        return settings([*TINY, f"run_dir={s3_bucket}/run", f"store.cache={tmp_path / name}", *more])

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, on_island("data"))
    store = ObjectStore(f"{s3_bucket}/run")
    holder = store_lock.acquire(store, "experts/expert-00", "train-expert 0")
    with pytest.raises(Locked, match=rf"{s3_bucket}/run/experts/expert-00 is in use by another job, pid"):
        run_stage("train-expert", on_island("second", "expert.id=0"))
    assert not store.exists("experts/expert-00/expert.pt")
    store_lock.release(store, "experts/expert-00", holder)
    run_stage("train-expert", on_island("second", "expert.id=0"))
    assert store.exists("experts/expert-00/expert.pt") and not store.exists("experts/expert-00/lock.json")


def test_a_stage_that_cannot_run_on_a_bucket_yet_says_so(s3_bucket, tmp_path):
    from ddm.config import settings

    cfg = settings([*TINY, f"run_dir={s3_bucket}/run", f"store.cache={tmp_path}"])
    for stage in ("extend",):
        with pytest.raises(BadInput, match=rf"`ddm {stage}` does not run on a run in a bucket yet"):
            run_stage(stage, cfg)
    # a stage in parts: each part would push the folder with an index of its own files
    parts = settings([*TINY, f"run_dir={s3_bucket}/run", f"store.cache={tmp_path}", "data.parts=2", "data.part=0"])
    with pytest.raises(BadInput, match=r"data.parts=2: a stage in parts does not run on a run in a bucket"):
        run_stage("prepare", parts)
    assert not ObjectStore(f"{s3_bucket}/run").list()


@pytest.mark.slow
def test_an_expert_killed_on_one_node_resumes_on_another_from_its_uploaded_checkpoint(s3_bucket, tmp_path, caplog):
    """kill -9 mid-training: the bucket holds the last.ckpt uploaded at a checkpoint, never a half expert.pt; a
    job on a fresh node takes over the dead job's lock, pulls that checkpoint and resumes from its step."""
    import logging
    import os
    import signal
    import subprocess
    import sys
    import time

    from ddm.config import settings

    run = f"{s3_bucket}/run"

    def on_island(name, *more):
        return [*TINY, f"run_dir={run}", f"store.cache={tmp_path / name}", *more]

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, settings(on_island("data")))
    store = ObjectStore(run)
    long = ("expert.id=0", "expert.steps=300", "expert.ckpt_every=5", "store.checkpoint_every_s=0")
    job = subprocess.Popen(
        [sys.executable, "-m", "ddm", "train-expert", *on_island("node-a", *long)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    index = "experts/expert-00/checkpoints/.ddm-index.json"
    deadline = time.monotonic() + 300
    while not store.exists(index):
        assert job.poll() is None, "the job ended before it uploaded a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint was uploaded"
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not store.exists("experts/expert-00/expert.pt") and store.exists("experts/expert-00/lock.json")

    with caplog.at_level(logging.INFO, logger="ddm"):
        record = run_stage("train-expert", settings(on_island("node-b", *long)))
    assert "taking over the stale lock" in caplog.text
    assert record["resumed_from_step"] >= 5 and record["resumed_from_step"] % 5 == 0
    assert record["steps"] == 300 and store.exists("experts/expert-00/expert.pt")
    assert not store.exists("experts/expert-00/lock.json")


def test_the_command_line_keeps_hydras_logs_in_the_working_copy_not_in_a_folder_named_s3(tmp_path, monkeypatch):
    from ddm.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # extend does not run on a bucket yet: one line, status 2
        main(["extend", "run_dir=s3://bucket/big", f"store.cache={tmp_path / 'cache'}"])
    assert not (tmp_path / "s3:").exists()
    assert list((tmp_path / "cache" / "s3" / "bucket" / "big" / "logs" / "hydra").iterdir())


def test_a_failed_island_job_publishes_its_failure_and_a_later_success_clears_it(s3_bucket, tmp_path):
    from ddm.config import settings
    from ddm.errors import Diverged

    def on_island(name, *more):
        return settings([*TINY, f"run_dir={s3_bucket}/run", f"store.cache={tmp_path / name}", *more])

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, on_island("data"))
    store = ObjectStore(f"{s3_bucket}/run")
    with pytest.raises(Diverged):
        run_stage("train-expert", on_island("a", "expert.id=0", "expert.lr=1e30"))
    failure = store.read_json("experts/expert-00/failed.json")
    assert "loss is inf" in failure["message"] and not store.exists("experts/expert-00/expert.pt")
    assert not store.exists("experts/expert-00/lock.json")  # released on the way out
    run_stage("train-expert", on_island("b", "expert.id=0"))
    assert store.exists("experts/expert-00/expert.pt") and not store.exists("experts/expert-00/failed.json")


def _files(root) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_latent_run_in_a_bucket_encodes_each_cluster_on_its_island_and_trains_on_latents_alone(s3_bucket, tmp_path):
    """Each island encodes its own cluster (pulling that partition alone) and pushes its latents; an expert's job
    pulls its cluster's latents, not the pixels; the router trains on every cluster's latents; a rerun of encode
    on a fresh machine reads manifests only."""
    from ddm.config import settings
    from ddm.store.objects import working_copy_path
    from tests.test_latent_vae import save_tiny_vae

    run = f"{s3_bucket}/run"
    save_tiny_vae(tmp_path / "vae", in_channels=3, scaling_factor=0.5)
    latent = ("vae=sd", f"vae.pretrained={tmp_path / 'vae'}", "expert.steps=4", "router.steps=4")

    def on(name, *more):
        return settings([*TINY, *latent, f"run_dir={run}", f"store.cache={tmp_path / name}", *more])

    def pulled(name) -> set[str]:
        return _files(working_copy_path(run, tmp_path / name))

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, on("data"))
    for k in (0, 1):
        assert run_stage("encode", on(f"gpu-{k}", f"vae.clusters={k}"))["encoded"] == [k]
        files = pulled(f"gpu-{k}")
        assert any(f.startswith(f"partitions/cluster-{k:02d}/") and f.endswith(".tar") for f in files)
        assert not any(f.startswith(f"partitions/cluster-{1 - k:02d}/") and f.endswith(".tar") for f in files)
    store = ObjectStore(run)
    assert store.exists("latents/cluster-00/.ddm-index.json") and store.exists("latents/cluster-01/.ddm-index.json")

    for k in (0, 1):
        run_stage("train-expert", on(f"island-{k}", f"expert.id={k}"))
        files = pulled(f"island-{k}")
        assert any(f.startswith(f"latents/cluster-{k:02d}/") and f.endswith(".tar") for f in files)
        assert not any(f.startswith("partitions/") and f.endswith(".tar") for f in files), sorted(files)
        assert not any(f.startswith(f"latents/cluster-{1 - k:02d}/") for f in files)
    run_stage("train-router", on("router"))
    assert not any(f.startswith("partitions/") and f.endswith(".tar") for f in pulled("router"))
    made = run_stage("sample", on("sampler", "sample.num_samples=8"))
    local = store.get_file("samples/samples.npz", tmp_path / "check" / "samples.npz")
    assert np.load(local)["images"].shape == (made["num_images"], 8, 8)

    again = run_stage("encode", on("again"))
    assert again.skipped and again["done"] == [0, 1]
    assert not any(f.endswith(".tar") for f in pulled("again")), sorted(pulled("again"))


@pytest.mark.slow
def test_the_student_is_distilled_from_the_experts_in_the_bucket(s3_bucket, tmp_path):
    from ddm.config import settings
    from tests.test_distill import DISTILL_FAST

    run = f"{s3_bucket}/run"

    def on(name, *more):
        return settings([*TINY, *DISTILL_FAST, f"run_dir={run}", f"store.cache={tmp_path / name}", *more])

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, on("data"))
    for k in (0, 1):
        run_stage("train-expert", on(f"island-{k}", f"expert.id={k}"))
    record = run_stage("distill", on("student"))
    store = ObjectStore(run)
    assert store.read_json("distilled/record.json")["steps"] == record["steps"] == 4
    assert not store.exists("distilled/lock.json") and store.exists("distilled/expert.pt")
    made = run_stage("sample", on("sampler", "sample.model=distilled", "sample.num_samples=6"))
    assert made["num_images"] >= 6
    assert run_stage("distill", on("again")).skipped


@pytest.mark.slow
def test_the_pipeline_runs_on_a_bucket_and_a_report_is_written_from_anywhere(s3_bucket, tmp_path):
    """`ddm pipeline run_dir=s3://...` on one machine leaves the whole run in the bucket; `ddm report` on a fresh
    machine pulls records, manifests and each cluster's first shard (for the montage), and pushes report.md."""
    from ddm.config import settings
    from ddm.store.objects import working_copy_path

    run = f"{s3_bucket}/run"

    def on(name, *more):
        return settings([*TINY, "sample.num_samples=6", f"run_dir={run}", f"store.cache={tmp_path / name}", *more])

    assert run_stage("pipeline", on("box"))["run_dir"] == run
    store = ObjectStore(run)
    keys = set(store.list())
    for key in ("data/manifest.json", "experts/expert-01/expert.pt", "router/router.pt", "samples/samples.npz"):
        assert key in keys, key
    assert {"report.md", "montage.png", "timings/prepare.json"} <= keys
    store.remove("report.md")
    run_stage("report", on("laptop"))
    report = store.read_bytes("report.md").decode()
    assert "## Experts" in report and "## Wall time and memory per stage" in report and "montage.png" in report
    pulled = _files(working_copy_path(run, tmp_path / "laptop"))
    shards = sorted(f for f in pulled if f.endswith(".tar"))
    assert shards == [f"partitions/cluster-{k:02d}/shard-000000.tar" for k in (0, 1)], shards
    assert not any(f.endswith((".pt", ".npz")) for f in pulled)
