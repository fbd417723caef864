"""Runs in an object store: uploads complete or invisible, checked downloads, conditional creates, the job lock
(against a local S3 server, moto, through s3fs)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from ddm.errors import Locked, Unusable
from ddm.store import ObjectStore, is_url, redacted
from ddm.store import lock as store_lock


def test_urls_and_what_of_them_is_logged():
    assert is_url("s3://bucket/run") and is_url("gs://b/r") and is_url("memory://x")
    assert not is_url("runs/demo") and not is_url("/abs/run") and not is_url("C:/runs") and not is_url("file:///x")
    assert redacted("s3://AKIA:secret@bucket/run?X-Amz-Signature=abc") == "s3://bucket/run"
    assert redacted("https://user:pw@host:9000/b/run") == "https://host:9000/b/run"


def test_an_upload_is_complete_or_invisible(s3_bucket, tmp_path):
    store = ObjectStore(f"{s3_bucket}/run")
    local = tmp_path / "expert.pt"
    local.write_bytes(b"weights" * 1000)
    url = store.put_file(local, "experts/expert-00/expert.pt")
    assert url == f"{s3_bucket}/run/experts/expert-00/expert.pt"
    # a job killed mid-upload: its multipart upload has sent a part, but the object does not exist until completed
    writer = store.fs.open(store.key("experts/expert-01/expert.pt"), "wb", block_size=5 << 20)
    writer.write(b"x" * (6 << 20))
    writer.flush()  # the first 5 MiB part is on the server
    assert not store.exists("experts/expert-01/expert.pt")
    assert store.list("experts") == ["experts/expert-00/expert.pt"]
    writer.discard()  # the killed job never completes it
    writer.closed = True
    back = store.get_file("experts/expert-00/expert.pt", tmp_path / "down" / "expert.pt")
    assert back.read_bytes() == local.read_bytes()
    store.put_json({"steps": 3}, "experts/expert-00/record.json")
    assert store.read_json("experts/expert-00/record.json") == {"steps": 3}


def test_a_damaged_object_is_refused_naming_its_url(s3_bucket, tmp_path):
    from ddm.io import sha256_file

    store = ObjectStore(f"{s3_bucket}/run")
    local = tmp_path / "shard.tar"
    local.write_bytes(b"a" * 4096)
    recorded = sha256_file(local)
    store.put_bytes(b"a" * 4095 + b"b", "partitions/cluster-00/shard-000000.tar")  # one byte changed on the way
    target = tmp_path / "cache" / "shard-000000.tar"
    with pytest.raises(Unusable, match=rf"{s3_bucket}/run/partitions/cluster-00/shard-000000.tar does not match"):
        store.get_file("partitions/cluster-00/shard-000000.tar", target, sha256=recorded)
    assert not target.exists() and not list(target.parent.iterdir())  # nothing half-written left behind
    store.put_bytes(b"{not json", "router/record.json")
    with pytest.raises(Unusable, match=rf"{s3_bucket}/run/router/record.json is not valid JSON"):
        store.read_json("router/record.json")
    with pytest.raises(FileNotFoundError, match=rf"{s3_bucket}/run/router/router.pt does not exist"):
        store.get_file("router/router.pt", tmp_path / "router.pt")


def test_create_makes_an_object_only_if_none_has_its_key(s3_bucket):
    store = ObjectStore(f"{s3_bucket}/run")
    assert store.create("experts/expert-00/lock.json", b"first")
    assert not store.create("experts/expert-00/lock.json", b"second")
    assert store.read_bytes("experts/expert-00/lock.json") == b"first"


def test_two_islands_cannot_hold_one_experts_lock(s3_bucket):
    """Two jobs on one expert, each with its own view of the bucket (two islands): the second is refused."""
    island_a, island_b = ObjectStore(f"{s3_bucket}/run"), ObjectStore(f"{s3_bucket}/run")
    holder = store_lock.acquire(island_a, "experts/expert-03", "train-expert 3")
    where = rf"{s3_bucket}/run/experts/expert-03 is in use by another job, pid {holder['pid']}"
    with pytest.raises(Locked, match=where):
        store_lock.acquire(island_b, "experts/expert-03", "train-expert 3")
    other = store_lock.acquire(island_b, "experts/expert-04", "train-expert 4")  # another expert: free
    store_lock.release(island_a, "experts/expert-03", holder)
    assert store_lock.read_holder(island_a, "experts/expert-03") is None
    again = store_lock.acquire(island_b, "experts/expert-03", "train-expert 3")
    store_lock.release(island_a, "experts/expert-03", other)  # not its lock: left in place
    assert store_lock.read_holder(island_a, "experts/expert-03")["token"] == again["token"]


def test_a_stale_lock_is_taken_over_with_a_warning(s3_bucket, caplog):
    store = ObjectStore(f"{s3_bucket}/run")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = dict(store_lock.this_holder(), pid=gone.pid, pid_started=None, token="old")
    store.put_bytes(json.dumps(dead).encode(), "experts/expert-00/lock.json")
    with caplog.at_level(logging.WARNING, logger="ddm"):
        mine = store_lock.acquire(store, "experts/expert-00", "train-expert 0")
    assert "taking over the stale lock" in caplog.text and f"process {gone.pid}" in caplog.text
    assert store_lock.read_holder(store, "experts/expert-00")["token"] == mine["token"] != "old"


def test_a_lock_from_another_island_is_a_lease_that_runs_out(s3_bucket, monkeypatch, caplog):
    """A lock taken on another host by a job nothing here can judge (no SLURM job): refused while its lease is
    renewed, taken over once it was not renewed for its lease; `ddm status` then shows no job holding it."""
    import time

    monkeypatch.setattr("ddm.launch.slurm.available", lambda: False)
    store = ObjectStore(f"{s3_bucket}/run")
    elsewhere = dict(store_lock.this_holder(), host="spot-node-7", pid=4242, token="theirs", lease_s=60.0)
    store.put_json(dict(elsewhere, renewed=time.time() - 30), "experts/expert-00/lock.json")
    with pytest.raises(Locked, match=r"spot-node-7.*lease was renewed 3\d s ago"):
        store_lock.acquire(store, "experts/expert-00", "train-expert 0", lease_s=60)
    assert "pid 4242 on host spot-node-7" in store_lock.held_by(store, "experts/expert-00")
    store.put_json(dict(elsewhere, renewed=time.time() - 61), "experts/expert-00/lock.json")
    assert store_lock.held_by(store, "experts/expert-00") is None
    with caplog.at_level(logging.WARNING, logger="ddm"):
        mine = store_lock.acquire(store, "experts/expert-00", "train-expert 0", lease_s=60)
    assert "has not renewed it for 6" in caplog.text and mine["lease_s"] == 60
    # without a lease (the lock of a job of before, or lease_s=0) it cannot be judged: refused, as before
    store.put_json(dict(elsewhere, renewed=None, lease_s=None), "experts/expert-01/lock.json")
    with pytest.raises(Locked, match="cannot be checked"):
        store_lock.acquire(store, "experts/expert-01", "train-expert 1", lease_s=60)


def test_a_job_renews_its_lease_and_one_that_lost_its_lock_pushes_nothing(s3_bucket):
    import time

    store = ObjectStore(f"{s3_bucket}/run")
    holder = store_lock.acquire(store, "router", "train-router", lease_s=0.6)  # renewed every 0.1 s
    first = store_lock.read_holder(store, "router")["renewed"]
    with store_lock.Lease(store, "router", holder) as lease:
        deadline = time.monotonic() + 10
        while store_lock.read_holder(store, "router")["renewed"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        lease.check("train-router")  # still ours
        store.put_json(dict(holder, token="another job's", host="node-9"), "router/lock.json")  # taken over
        while lease.lost is None:
            assert time.monotonic() < deadline, "the lost lock was not noticed"
            time.sleep(0.05)
    with pytest.raises(Locked, match=r"router/lock.json was taken over by pid .* on host node-9.*nothing was pushed"):
        lease.check("train-router")
    assert store_lock.read_holder(store, "router")["token"] == "another job's"  # left to its holder


def test_a_store_without_atomic_puts_moves_a_finished_part_to_its_name(tmp_path):
    """memory:// (as a local or network file system) shows a file while it is written: the upload goes to a
    .part- key, which is never listed, and is moved to its name once whole."""
    store = ObjectStore(f"memory://{tmp_path.name}/run")
    assert not store.atomic_put
    store.fs.pipe_file(store.key("experts/expert-01/expert.pt") + ".part-deadbeef", b"half")
    store.put_bytes(b"whole", "experts/expert-00/expert.pt")
    assert store.list("experts") == ["experts/expert-00/expert.pt"] and not store.exists("experts/expert-01/expert.pt")
    assert store.read_bytes("experts/expert-00/expert.pt") == b"whole"


def _expert_folder(root, weights: bytes = b"w" * 5000):
    folder = root / "experts" / "expert-00"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "expert.pt").write_bytes(weights)
    (folder / "record.json").write_text('{"steps": 3}\n')
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"local state")
    (folder / ".lock.json.tmp").write_text("hidden")
    return folder


def test_a_folder_pushed_from_one_island_is_pulled_whole_by_another(s3_bucket, tmp_path):
    from ddm.store.mirror import INDEX, pull_file, pull_folder, push_folder

    store = ObjectStore(f"{s3_bucket}/run")
    island_a, island_b = tmp_path / "a", tmp_path / "b"
    _expert_folder(island_a)
    pushed = push_folder(store, island_a, "experts/expert-00")
    assert sorted(pushed["uploaded"]) == ["experts/expert-00/expert.pt", "experts/expert-00/record.json"]
    assert store.list("experts") == [f"experts/expert-00/{INDEX}", *sorted(pushed["uploaded"])]  # no local state
    assert push_folder(store, island_a, "experts/expert-00")["uploaded"] == []  # nothing changed: nothing sent

    pulled = pull_folder(store, island_b, "experts")
    assert sorted(pulled["downloaded"]) == sorted(pushed["uploaded"]) and pulled["bytes"] == 5000 + 13
    assert (island_b / "experts/expert-00/expert.pt").read_bytes() == b"w" * 5000
    (island_a / "experts/expert-00/expert.pt").write_bytes(b"v" * 5000)  # retrained: one file changes
    assert push_folder(store, island_a, "experts/expert-00")["uploaded"] == ["experts/expert-00/expert.pt"]
    again = pull_folder(store, island_b, "experts/expert-00")
    assert again["downloaded"] == ["experts/expert-00/expert.pt"] and again["kept"] == 1
    assert pull_file(store, tmp_path / "c", "experts/expert-00/record.json").read_text() == '{"steps": 3}\n'
    # a job's log, still being written as the job pushes, never goes; its uploaded checkpoints (an index of their
    # own) come only when asked for by name: a sampling machine pulls experts/, not every expert's optimizer state
    (island_a / "experts/expert-00/slurm-12_0.out").write_text("step 3\n")
    (island_a / "experts/expert-00/hydra").mkdir()
    (island_a / "experts/expert-00/hydra/train-expert.log").write_text("step 3\n")
    assert push_folder(store, island_a, "experts/expert-00")["uploaded"] == []
    (island_a / "experts/expert-00/checkpoints/last.ckpt").write_bytes(b"c" * 100)
    push_folder(store, island_a, "experts/expert-00/checkpoints", only=("last.ckpt",), about=dict(step=3))
    assert pull_folder(store, tmp_path / "d", "experts")["downloaded"] == sorted(pushed["uploaded"])
    resumed = pull_folder(store, tmp_path / "d", "experts/expert-00/checkpoints")
    assert resumed["downloaded"] == ["experts/expert-00/checkpoints/last.ckpt"]


def test_a_folder_not_pushed_whole_or_damaged_since_is_refused_naming_its_url(s3_bucket, tmp_path):
    from ddm.errors import MissingInput
    from ddm.store.mirror import pull_folder, push_folder

    store = ObjectStore(f"{s3_bucket}/run")
    _expert_folder(tmp_path / "a")
    store.put_file(tmp_path / "a/experts/expert-00/expert.pt", "experts/expert-00/expert.pt")  # killed before the index
    with pytest.raises(MissingInput, match=rf"{s3_bucket}/run/experts holds no finished folder"):
        pull_folder(store, tmp_path / "b", "experts")
    push_folder(store, tmp_path / "a", "experts/expert-00")
    store.put_bytes(b"x" * 5000, "experts/expert-00/expert.pt")  # replaced on the way
    with pytest.raises(Unusable, match=rf"{s3_bucket}/run/experts/expert-00/expert.pt does not match"):
        pull_folder(store, tmp_path / "b", "experts")
    store.remove("experts/expert-00/expert.pt")
    with pytest.raises(Unusable, match=r"expert.pt is listed in .* but is not there"):
        pull_folder(store, tmp_path / "c", "experts")


def test_a_file_checked_once_on_this_machine_is_not_read_again_until_it_changes(s3_bucket, tmp_path, monkeypatch):
    """The ranks of one job pull one after another into one working copy: the first checks each file's sha256,
    the others take the files unchanged since (same size and modification time) without reading them."""
    import os

    from ddm.io import sha256_file
    from ddm.store import mirror

    store = ObjectStore(f"{s3_bucket}/run")
    _expert_folder(tmp_path / "a")
    mirror.push_folder(store, tmp_path / "a", "experts/expert-00")
    first = mirror.pull_folder(store, tmp_path / "b", "experts/expert-00")
    assert len(first["downloaded"]) == 2
    reads = []
    monkeypatch.setattr(mirror, "sha256_file", lambda p: reads.append(p) or sha256_file(p))
    assert mirror.pull_folder(store, tmp_path / "b", "experts/expert-00")["kept"] == 2 and reads == []
    weights = tmp_path / "b" / "experts/expert-00/expert.pt"
    weights.write_bytes(b"x" * 5000)  # changed in place, same size: read, found wrong, downloaded again
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    again = mirror.pull_folder(store, tmp_path / "b", "experts/expert-00")
    assert again["downloaded"] == ["experts/expert-00/expert.pt"] and reads == [weights]
    assert weights.read_bytes() == b"w" * 5000


def test_transfers_run_side_by_side_and_the_first_error_stops_the_rest():
    """``each`` runs up to ``transfers`` calls at once (four calls that each wait for all four finish only if they
    run together); an error is raised once the calls under way end, and calls not begun are not begun."""
    import threading

    from ddm.store.mirror import each

    together = threading.Barrier(4, timeout=10)
    assert each(lambda i: together.wait() is not None and i * i, [1, 2, 3, 4], transfers=4) == [1, 4, 9, 16]
    begun = []

    def fail_first(i):
        begun.append(i)
        if i == 0:
            raise ConnectionError("the bucket went away")
        threading.Event().wait(0.05)
        return i

    with pytest.raises(ConnectionError, match="went away"):
        each(fail_first, list(range(50)), transfers=2)
    assert len(begun) < 50
