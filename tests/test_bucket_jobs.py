"""`ddm status` and `ddm submit` on a run that lives in a bucket: what each island's jobs left there, seen from
any machine, and jobs sent with the bucket's URL so each pulls what it needs itself."""

from __future__ import annotations

import os
import platform

import pytest

from ddm.errors import BadInput
from ddm.stages import status, submit
from ddm.stages.runner import run_stage
from ddm.store import ObjectStore
from ddm.store import lock as store_lock
from ddm.store.mirror import push_folder
from tests.test_run_in_bucket import TINY


@pytest.fixture
def bucket_run(s3_bucket, tmp_path):
    """A tiny run in a bucket up to its partitions, expert 0 trained on island a; ``on(machine, *more)`` gives the
    overrides of a command run on another machine with the bucket alone."""
    from ddm.config import settings

    run = f"{s3_bucket}/run"

    def on(machine, *more):
        return [*TINY, f"run_dir={run}", f"store.cache={tmp_path / machine}", *more]

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, settings(on("data")))
    run_stage("train-expert", settings(on("island-a", "expert.id=0")))
    return run, on


def test_status_shows_each_islands_jobs_from_the_bucket(bucket_run, tmp_path, no_slurm, capsys):
    from ddm.config import settings

    run, on = bucket_run
    store = ObjectStore(run)
    holder = store_lock.acquire(store, "experts/expert-01", "train-expert 1")  # a job of another island, running
    store.put_json(dict(message="the router's loss is nan at step 3"), "router/failed.json")
    seen = run_stage("status", settings(on("laptop")))
    assert [e["state"] for e in seen["experts"]] == ["done", "running"] and seen["router"]["state"] == "failed"
    assert seen["experts"][0]["steps"] == 6 and f"on {platform.node()}" in seen["experts"][0]["detail"]
    assert f"pid {os.getpid()} on host" in seen["experts"][1]["detail"]
    assert "loss is nan at step 3" in seen["router"]["detail"]
    assert capsys.readouterr().out.startswith(f"run {run}: K=2; experts: 1 done, 1 running; router: failed")

    # the job died; its last upload (step 5, as its index says) is what a resubmitted job resumes from
    store_lock.release(store, "experts/expert-01", holder)
    ckpt = tmp_path / "node" / "experts" / "expert-01" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a checkpoint")
    push_folder(store, tmp_path / "node", "experts/expert-01/checkpoints", only=("last.ckpt",), about=dict(step=5))
    seen = status.run(settings(on("laptop")))
    assert seen["experts"][1]["state"] == "stopped" and seen["experts"][1]["steps"] == 5
    # the machine that asked holds the small records it read, none of the run's data or weights
    held = {p.relative_to(tmp_path / "laptop").as_posix() for p in (tmp_path / "laptop").rglob("*") if p.is_file()}
    assert not any(p.endswith((".tar", ".pt", ".ckpt", ".npy")) for p in held), sorted(held)


def test_an_expert_whose_folder_was_not_pushed_whole_is_not_done(bucket_run, no_slurm):
    """A record in the bucket whose folder's index does not list it (a push cut off before its index) is not a
    finished expert: status and submit go by the index."""
    from ddm.config import settings

    run, on = bucket_run
    store = ObjectStore(run)
    store.put_json(dict(steps=6, final_loss=0.1), "experts/expert-01/record.json")
    seen = status.run(settings(on("laptop")))
    assert seen["experts"][1]["state"] == "missing"
    ovr = on("login", "submit.launcher=local", "submit.dry_run=true")
    assert submit.run(settings(ovr), overrides=ovr)["experts_started"] == [1]


def test_submit_sends_a_buckets_unfinished_experts_with_its_url(bucket_run, tmp_path, fake_slurm):
    from ddm.config import settings

    run, on = bucket_run
    bucket_path = run.split("://", 1)[1]
    ovr = on("login", "expert.steps=7")
    result = submit.run(settings(ovr), overrides=ovr)
    assert result["experts_done"] == [0] and result["experts_submitted"] == [1] and result["router"] == "submitted"
    assert result["run_dir"] == run
    (expert_script, _), (router_script, _) = fake_slurm["submitted"]
    script = expert_script.read_text()
    # the job is given the URL, the queue's comment names it, the logs go to this machine's working copy
    assert f"run_dir={run} " in script and f"--comment={run}\n" in script and "--job-name=ddm:run:expert" in script
    working_copy = (tmp_path / "login" / "s3" / bucket_path).resolve()
    assert f"--output={working_copy}/experts/expert-%2a/slurm-%A_%a.out" in script
    assert expert_script.is_relative_to(working_copy) and "expert.steps=7" in script
    assert f"run_dir={run} " in router_script.read_text()

    # a job of another island holds expert 1: not sent again
    holder = store_lock.acquire(ObjectStore(run), "experts/expert-01", "train-expert 1")
    fake_slurm["submitted"].clear()
    again = submit.run(settings(ovr), overrides=ovr)
    assert again["experts_submitted"] == [] and again["experts_locked"] == [1]
    assert [p.name.split("-")[0] for p, _ in fake_slurm["submitted"]] == ["router"]  # not running yet
    store_lock.release(ObjectStore(run), "experts/expert-01", holder)


def test_the_local_launcher_starts_jobs_that_pull_from_the_bucket(bucket_run, no_slurm, capsys):
    from ddm.config import settings

    run, on = bucket_run
    ovr = on("box", "submit.launcher=local", "submit.dry_run=true")
    result = submit.run(settings(ovr), overrides=ovr)
    assert result["experts_started"] == [1] and result["router"] == "started"
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(commands) == 2 and all(f"run_dir={run} " in c for c in commands), commands


def test_a_stage_in_parts_is_refused_on_a_bucket(s3_bucket, tmp_path, no_slurm):
    from ddm.config import settings

    ovr = [*TINY, f"run_dir={s3_bucket}/run", f"store.cache={tmp_path}", "submit.stage=prepare", "data.parts=2"]
    with pytest.raises(BadInput, match=rf"submit.stage=prepare .* \({s3_bucket}/run\) does not do yet"):
        submit.run(settings(ovr), overrides=ovr)


def test_a_rerun_whose_check_needs_more_than_it_pulled_pulls_all_it_reads(bucket_run, monkeypatch, caplog):
    """A finished stage runs first on what its check reads; one that lacks a file there (here the partition
    stage, told it reads nothing) pulls everything it reads and runs again, and still only finds its work done."""
    import logging

    from ddm.config import settings
    from ddm.store import stage_io

    run, on = bucket_run
    monkeypatch.setitem(stage_io.CHECKS, "partition", ())
    with caplog.at_level(logging.INFO, logger="ddm"):
        assert run_stage("partition", settings(on("again"))).skipped
    assert "partition: no " in caplog.text and "pulling all it reads" in caplog.text


@pytest.mark.slow
def test_a_two_rank_island_trains_one_expert_from_the_bucket(bucket_run, tmp_path):
    """Two DDP ranks on one node, one working copy: only global rank 0 takes the bucket's lock and pushes; the
    other rank finds the partition pulled (no second download) and trains beside it."""
    import subprocess
    import sys

    from tests.fabricate import FAST_JOB

    run, on = bucket_run
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("DDM_STAGE", None)
    job = [*on("node", "expert.id=1", "expert.steps=4"), *FAST_JOB, "island.devices=2", "island.strategy=ddp"]
    out = subprocess.run(
        [sys.executable, "-m", "ddm", "train-expert", *job], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    store = ObjectStore(run)
    record = store.read_json("experts/expert-01/record.json")
    assert record["hardware"]["world_size"] == 2 and record["steps"] == 4
    assert not store.exists("experts/expert-01/lock.json")
    pulled = [line for line in out.stderr.splitlines() if "train-expert: pulled" in line]
    assert len(pulled) == 2 and "pulled 0 files" not in pulled[0] and "pulled 0 files" in pulled[1], pulled
    assert out.stderr.count("train-expert: pushed") == 1


def test_a_plan_reads_the_classes_of_the_data_in_the_bucket(bucket_run, capsys):
    from ddm.config import settings

    run, on = bucket_run
    before = ObjectStore(run).list()
    shown = run_stage("plan", settings(on("laptop", "data.num_classes=3")))
    assert shown is not None and ObjectStore(run).list() == before  # it wrote nothing
    assert "expert" in capsys.readouterr().out
