"""partitions/ written by separate jobs (``cluster.partition_parts``), then merged: the same bytes as one job's.

One digits run, prepared and clustered at random into K=5 once per module; each test partitions a copy of it.
With 2 parts, part 0 writes clusters 0, 2, 4 and part 1 clusters 1, 3.
"""

from __future__ import annotations

import shutil

import pytest

from ddm.artifacts import RunDir
from ddm.config import settings
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json
from ddm.stages.runner import run_stage

BASE = (
    "data=digits",
    "data.limit=120",
    "data.shard_size=16",
    "cluster=random",
    "cluster.k=5",
    "cluster.min_shards_per_partition=2",
    "cluster.partition_shard_size=5",
)
PART_CLUSTERS = {0: ["cluster-00", "cluster-02", "cluster-04"], 1: ["cluster-01", "cluster-03"]}


def cfg(root, *overrides):
    return settings([f"run_dir={root}", *BASE, *overrides])


def part(j, *more):
    return ("cluster.partition_parts=2", f"cluster.partition_part={j}", *more)


MERGE = ("cluster.partition_parts=2",)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A run with data/ and clusters/ and nothing after."""
    root = tmp_path_factory.mktemp("clustered")
    for stage in ("prepare", "cluster"):
        run_stage(stage, cfg(root))
    return root


@pytest.fixture(scope="module")
def one_job(clustered, tmp_path_factory):
    """The same run partitioned by one job: what the parts and their merge must reproduce byte for byte."""
    root = copy_run(clustered, tmp_path_factory.mktemp("one_job"))
    run_stage("partition", cfg(root))
    return RunDir(root)


def copy_run(clustered, dest):
    for name in ("data", "clusters"):
        shutil.copytree(clustered / name, dest / name)
    return dest


@pytest.fixture
def run(clustered, tmp_path):
    return RunDir(copy_run(clustered, tmp_path))


def contents(rd: RunDir, folders=None) -> dict:
    """Every file of the partitions (or of ``folders`` under partitions/), but the records of checked data shards,
    by path: its bytes."""
    roots = [rd.partitions / f for f in folders] if folders else [rd.partitions]
    return {
        str(p.relative_to(rd.partitions)): p.read_bytes()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("verified")
    }


def stamps(rd: RunDir, folders) -> dict:
    """Every file under ``folders``: (mtime in ns, inode, bytes)."""
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes())
        for f in folders
        for p in sorted((rd.partitions / f).rglob("*"))
        if p.is_file()
    }


def cluster_folders(rd: RunDir) -> list[str]:
    return sorted(p.name for p in rd.partitions.glob("cluster-*"))


def test_parts_then_merge_are_the_bytes_of_one_job(run, one_job):
    first = run_stage("partition", cfg(run.root, *part(1)))
    assert first["clusters"] == PART_CLUSTERS[1] and not first.skipped
    assert cluster_folders(run) == PART_CLUSTERS[1]  # its clusters, no other
    assert not run.partitions_index.exists()  # a part never writes the index
    run_stage("partition", cfg(run.root, *part(0)))
    assert cluster_folders(run) == sorted(PART_CLUSTERS[0] + PART_CLUSTERS[1])
    assert not run.partitions_index.exists()
    # each part checked data/ in a record of its own: parts started at once never write one file
    assert sorted(p.name for p in run.partitions.glob("verified*")) == [
        "verified-part-0000-of-0002.json",
        "verified-part-0001-of-0002.json",
    ]
    before_merge = stamps(run, cluster_folders(run))
    run.partition(7).mkdir()  # left by an earlier clustering into more clusters: no part writes it
    (run.partition(7) / "manifest.json").write_text("{}")
    merged = run_stage("partition", cfg(run.root, *MERGE))
    assert not run.partition(7).exists()
    assert stamps(run, cluster_folders(run)) == before_merge  # the merge copies nothing
    expected = contents(one_job)
    assert "manifest.json" in expected and "cluster-04/shard-000001.tar" in expected
    assert contents(run) == expected
    assert merged == read_json(one_job.partitions_index) and merged["sizes"] == [24] * 5
    # the timing of each part under its own name, the merge's under the stage's
    for job in ("partition-part-0000", "partition-part-0001", "partition"):
        assert run.timing(job).exists(), job


def test_a_finished_partition_is_kept_whatever_the_parts(run, clustered, tmp_path_factory):
    """partition_parts / partition_part say how the work is shared, not what it makes: never a reason to refuse."""
    run_stage("partition", cfg(run.root))
    index = run.partitions_index.read_bytes()
    assert run_stage("partition", cfg(run.root, *MERGE)).skipped
    assert run_stage("partition", cfg(run.root, *part(1))).skipped
    assert run.partitions_index.read_bytes() == index
    # and the other way: merged parts, then one job
    other = RunDir(copy_run(clustered, tmp_path_factory.mktemp("other")))
    for j in (0, 1):
        run_stage("partition", cfg(other.root, *part(j)))
    run_stage("partition", cfg(other.root, *MERGE))
    assert run_stage("partition", cfg(other.root)).skipped


def test_the_merge_names_a_part_not_done_and_writes_nothing(run):
    run_stage("partition", cfg(run.root, *part(0)))
    with pytest.raises(MissingInput, match=r"parts 1 of cluster.partition_parts=2 are not done .*cluster-01 holds no "):
        run_stage("partition", cfg(run.root, *MERGE))
    assert not run.partitions_index.exists()
    assert cluster_folders(run) == PART_CLUSTERS[0]
    with pytest.raises(MissingInput, match=r"`ddm partition cluster.partition_parts=2 cluster.partition_part=J`"):
        run_stage("partition", cfg(run.root, *MERGE))
    # a cluster of the part whose shards went missing since is not taken either
    run_stage("partition", cfg(run.root, *part(1)))
    (run.partition(3) / "shard-000000.tar").unlink()
    with pytest.raises(MissingInput, match=r"cluster-03/shard-000000.tar.*cluster.partition_part=1 redo=true"):
        run_stage("partition", cfg(run.root, *MERGE))
    assert not run.partitions_index.exists()


def test_a_part_never_touches_another_parts_clusters(run, one_job):
    run_stage("partition", cfg(run.root, *part(0)))
    mine = stamps(run, PART_CLUSTERS[0])
    assert len(mine) > 6
    run_stage("partition", cfg(run.root, *part(1)))
    assert stamps(run, PART_CLUSTERS[0]) == mine
    run_stage("partition", cfg(run.root, *part(1, "redo=true")))  # rewrites its own clusters, and only them
    assert stamps(run, PART_CLUSTERS[0]) == mine
    run_stage("partition", cfg(run.root, *MERGE))
    assert contents(run) == contents(one_job)


def test_a_done_part_is_skipped_and_a_cut_one_resumes(run, one_job):
    run_stage("partition", cfg(run.root, *part(0)))
    before = stamps(run, PART_CLUSTERS[0])
    again = run_stage("partition", cfg(run.root, *part(0)))
    assert again.skipped and again["clusters"] == PART_CLUSTERS[0]
    assert stamps(run, PART_CLUSTERS[0]) == before
    # a part cut short: cluster-02 has no manifest (it is written last); the rerun writes cluster-02 alone
    (run.partition(2) / "manifest.json").unlink()
    (run.partition(2) / "shard-000001.tar").unlink()
    resumed = run_stage("partition", cfg(run.root, *part(0)))
    assert not resumed.skipped
    kept = ["cluster-00", "cluster-04"]
    assert stamps(run, kept) == {p: s for p, s in before.items() if "cluster-02" not in p}
    assert contents(run, ["cluster-02"]) == contents(one_job, ["cluster-02"])


def test_parts_made_with_other_settings_are_refused(run):
    run_stage("partition", cfg(run.root, *part(0)))
    run_stage("partition", cfg(run.root, *part(1, "cluster.partition_shard_size=7")))
    with pytest.raises(BadInput, match=r"cluster-01 was made with other settings \(cluster\.partition_shard_size 7 "):
        run_stage("partition", cfg(run.root, *MERGE))
    assert not run.partitions_index.exists()
    with pytest.raises(BadInput, match=r"`ddm partition cluster.partition_parts=2 cluster.partition_part=0 redo=true`"):
        run_stage("partition", cfg(run.root, *part(0, "cluster.partition_shard_size=7")))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("cluster.partition_parts=0",), r"cluster.partition_parts=0: give the number of jobs"),
        (("cluster.partition_parts=6",), r"cluster.partition_parts=6 is more than the 5 clusters"),
        (part(2), r"cluster.partition_part=2 is not one of the 2 parts: give 0..1, or null"),
    ],
)
def test_impossible_parts_are_refused(run, overrides, message):
    with pytest.raises(BadInput, match=message):
        run_stage("partition", cfg(run.root, *overrides))
    assert not run.partitions.exists()
