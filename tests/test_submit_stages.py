"""`ddm submit submit.stage=embed|partition|encode` and `ddm status` for them: the parts (clusters) not done as one
array job, or local processes, the merge after them where the stage has one, and each part's state."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ddm.artifacts import RunDir
from ddm.embed import embedding_file, keys_file
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, write_json, write_text
from ddm.launch import lock
from ddm.launch.encode_job import job_folder
from ddm.stages import status, submit
from ddm.stages.runner import run_stage
from tests.test_submit_prepare import queued

DATA = dict(
    num_samples=6,
    keys_sha256="k",
    shards=[dict(path=f"shard-{i:06d}.tar", num_samples=1, sha256=f"s{i}") for i in range(6)],
)


def submit_stage(make_cfg, run_dir, stage: str, *extra) -> dict:
    ovr = [f"run_dir={run_dir}", f"submit.stage={stage}", *extra]
    return submit.run(make_cfg(*ovr, run_dir=run_dir), overrides=ovr)


def scripts(out: str) -> list[str]:
    """The scripts a dry run printed, in order."""
    return out.split("# --- ")[1:]


# -- embed: data shards 0..5 in 3 parts of 2


def embedded(rd: RunDir, part: int, parts: int, shards: range, files=None) -> None:
    """Part ``part``'s record as its job writes it first, and the files of ``files`` of its shards (default: all)."""
    write_json(
        rd.embeddings / "parts" / f"part-{part:04d}-of-{parts:04d}.json", dict(start=shards.start, stop=shards.stop)
    )
    for i in shards if files is None else files:
        write_text(rd.embeddings / keys_file(i), "k\n")
        np.save(rd.embeddings / embedding_file(i), np.zeros((1, 2), np.float16))


def test_embed_parts_go_out_on_gpus_and_their_merge_after_them_on_cpus(make_cfg, tmp_path, no_slurm, capsys):
    rd = RunDir(tmp_path / "run")
    write_json(rd.data_manifest, DATA)
    embedded(rd, 1, 3, range(2, 4))  # done
    embedded(rd, 2, 3, range(4, 6), files=[4])  # started, shard 5 not embedded yet: not done
    result = submit_stage(
        make_cfg, rd.root, "embed", "embed.parts=3", "embed.part=1", "island=gpu", "submit.dry_run=true"
    )
    assert result["parts_done"] == [1] and result["parts_submitted"] == [0, 2] and result["manifest"] == "submitted"
    array, merge = scripts(capsys.readouterr().out)
    assert "#SBATCH --array=0,2\n" in array and "--job-name=ddm:run:embed-parts\n" in array
    assert "#SBATCH --gres=gpu:1\n" in array and "#SBATCH --ntasks-per-node=1\n" in array  # one process, its GPU
    assert '"embed.part=$SLURM_ARRAY_TASK_ID"' in array and " -m ddm embed" in array and "embed.parts=3" in array
    assert "embed.part=1" not in array  # the task sets its own part
    assert f"--output={rd.root.resolve()}/logs/embed/part-%4a/slurm-%A_%a.out" in array
    assert "--job-name=ddm:run:embed\n" in merge and "--array" not in merge and "--gres" not in merge  # no GPU
    assert " -m ddm embed" in merge and "embed.parts=3" in merge and "embed.part=" not in merge.replace("parts", "")
    assert "sbatch --parsable --dependency=afterok:ARRAY_JOB_ID --kill-on-invalid-dep=yes " in merge

    write_json(rd.embeddings_manifest, {})
    done = submit_stage(make_cfg, rd.root, "embed", "embed.parts=3", "submit.dry_run=true")
    assert done["manifest"] == "done" and done["parts_submitted"] == [] and capsys.readouterr().out == ""


def test_embed_needs_data_and_one_part_is_one_gpu_job(make_cfg, tmp_path, fake_slurm):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(MissingInput, match=r"submit.stage=embed: no .*data/manifest.json"):
        submit_stage(make_cfg, rd.root, "embed")
    write_json(rd.data_manifest, DATA)
    result = submit_stage(make_cfg, rd.root, "embed", "island=gpu")
    ((script, args),) = fake_slurm["submitted"]
    text = script.read_text()
    assert result["parts_submitted"] == [] and result["manifest_job"] == "101" and args == []
    assert "--gres=gpu:1" in text and "--array" not in text and " -m ddm embed" in text  # all of it, on a GPU
    assert (rd.root / "logs" / "embed" / "embed").is_dir()


def test_status_shows_each_embed_part_until_the_manifest_exists(make_cfg, tmp_path, fake_slurm, capsys):
    rd = RunDir(tmp_path / "run")
    write_json(rd.data_manifest, DATA)
    embedded(rd, 0, 3, range(0, 2), files=[0])  # its job stopped after shard 0
    embedded(rd, 1, 3, range(2, 4))
    log = rd.root / "logs" / "embed" / "part-0000" / "slurm-5_0.out"
    write_text(log, "CUDA out of memory\n")
    fake_slurm.update(array="embed-parts", queued=({2: queued("5_2", 2, "RUNNING")}, None))
    result = status.run(make_cfg("embed.parts=3", run_dir=rd.root))
    assert result["stage"] == "embed" and [r["state"] for r in result["part_rows"]] == ["missing", "done", "running"]
    assert [r["name"] for r in result["part_rows"]] == ["part-0000", "part-0001", "part-0002"]
    assert result["manifest"]["name"] == "merge" and result["manifest"]["state"] == "missing"
    out = capsys.readouterr().out
    assert "embed not complete; parts (embed.parts=3): 1 done, 1 running, 1 missing; merge: missing" in out
    assert str(log) in out and "5_2 RUNNING" in out

    fake_slurm["queued"] = ({}, None)
    seen = status.run(make_cfg(run_dir=rd.root))  # embed.parts read from the records
    assert seen["parts"] == 3 and [r["state"] for r in seen["part_rows"]] == ["missing", "done", "missing"]

    write_json(rd.embeddings_manifest, {})
    with pytest.raises(MissingInput, match="not been clustered"):  # embedded: the line of a run to cluster
        status.run(make_cfg(run_dir=rd.root))


# -- partition: K=4 clusters in 2 parts, part 0 writing clusters 0 and 2, part 1 clusters 1 and 3


def clustered(rd: RunDir, k: int = 4) -> None:
    write_json(rd.data_manifest, DATA)
    write_json(rd.cluster_report, dict(k=k, clustering_id="c1"))


def partitioned(rd: RunDir, cluster: int, clustering: str = "c1") -> None:
    from ddm.data.shards import shards_digest

    write_json(rd.partition_manifest(cluster), dict(clustering_id=clustering, data_shards_sha256=shards_digest(DATA)))


def test_partition_parts_go_out_on_cpus_and_their_merge_after_them(make_cfg, tmp_path, fake_slurm):
    rd = RunDir(tmp_path / "run")
    clustered(rd)
    for cluster, clustering in ((0, "c1"), (1, "c1"), (2, "c0"), (3, "c1")):  # cluster 2: of an earlier clustering
        partitioned(rd, cluster, clustering)
    fake_slurm.update(array="partition-parts")
    result = submit_stage(make_cfg, rd.root, "partition", "cluster.partition_parts=2", "island=gpu")
    assert result["parts_done"] == [1] and result["parts_submitted"] == [0]
    (array, array_args), (merge, merge_args) = fake_slurm["submitted"]
    text = array.read_text()
    assert "#SBATCH --array=0\n" in text and "--gres" not in text and "--job-name=ddm:run:partition-parts" in text
    assert '"cluster.partition_part=$SLURM_ARRAY_TASK_ID"' in text and "cluster.partition_parts=2" in text
    assert " -m ddm partition" in merge.read_text() and "--gres" not in merge.read_text()
    assert array_args == [] and merge_args == ["--dependency=afterok:101", "--kill-on-invalid-dep=yes"]
    assert (rd.root / "logs" / "partition" / "part-0000").is_dir()

    write_json(rd.partitions_index, dict(clustering_id="c0"))  # of the earlier clustering: not complete
    assert submit_stage(make_cfg, rd.root, "partition", "cluster.partition_parts=2")["parts_submitted"] == [0]
    write_json(rd.partitions_index, dict(clustering_id="c1"))
    done = submit_stage(make_cfg, rd.root, "partition", "cluster.partition_parts=2")
    assert done["manifest"] == "done" and len(fake_slurm["submitted"]) == 4


# -- encode: one task per cluster, no merge


def test_encode_sends_the_clusters_neither_encoded_nor_locked(make_cfg, tmp_path, fake_slurm, capsys):
    rd = RunDir(tmp_path / "run")
    clustered(rd)
    write_json(rd.partitions_index, dict(clustering_id="c1", num_clusters=4))
    for k in range(4):
        write_json(rd.partition_manifest(k), dict(clustering_id="c1", keys_sha256=f"keys{k}"))
    write_json(rd.latent(0) / "manifest.json", dict(clustering_id="c1", keys_sha256="keys0"))  # encoded
    write_json(rd.latent(2) / "manifest.json", dict(clustering_id="c0", keys_sha256="keys2"))  # of another one
    holder = lock.acquire(job_folder(rd, 1), "encode cluster 1")  # a live job encodes cluster 1
    try:
        vae = ("vae=sd", "vae.pretrained=/weights/vae", "island=gpu")
        result = submit_stage(make_cfg, rd.root, "encode", *vae)
        assert result["parts_done"] == [0] and result["parts_running"] == [1] and result["parts_submitted"] == [2, 3]
        ((script, args),) = fake_slurm["submitted"]  # no merge: each cluster's latents are whole on their own
        text = script.read_text()
        assert "#SBATCH --array=2-3\n" in text and "--gres=gpu:1" in text and "--job-name=ddm:run:encode\n" in text
        assert '"vae.clusters=$SLURM_ARRAY_TASK_ID"' in text and " -m ddm encode" in text and args == []
        asked = submit_stage(make_cfg, rd.root, "encode", *vae, "vae.clusters=[0,1,3]")  # some clusters only
        assert asked["parts_done"] == [0] and asked["parts_running"] == [1] and asked["parts_submitted"] == [3]
        assert "#SBATCH --array=3\n" in (text := fake_slurm["submitted"][1][0].read_text())
        assert "vae.clusters=[" not in text  # the task names its cluster
        assert f"{rd.root.resolve()}/logs/encode/cluster-%2a/slurm-%A_%a.out" in text

        fake_slurm.update(array="encode", queued=({3: queued("7_3", 3)}, None))
        shown = status.run(make_cfg(*vae, run_dir=rd.root))
        assert [r["state"] for r in shown["part_rows"]] == ["done", "running", "missing", "queued"]
        assert (
            shown["manifest"] is None
            and "clusters (K=4): 1 done, 1 running, 1 queued, 1 missing" in capsys.readouterr().out
        )
        again = submit_stage(make_cfg, rd.root, "encode", *vae)
        assert again["parts_submitted"] == [2] and "#SBATCH --array=2\n" in fake_slurm["submitted"][2][0].read_text()
    finally:
        lock.release(job_folder(rd, 1), holder)
    with pytest.raises(BadInput, match="vae=none"):
        submit_stage(make_cfg, rd.root, "encode")


# -- on this machine: partitions/ by two local jobs and their merge, as one job writes it

BASE = ("data=digits", "data.limit=120", "data.shard_size=16", "cluster=random", "cluster.k=4")


@pytest.mark.slow
def test_local_partition_parts_write_what_one_job_writes(make_cfg, tmp_path, no_slurm):
    one = RunDir(tmp_path / "one")
    for stage in ("prepare", "cluster"):
        run_stage(stage, make_cfg(*BASE, run_dir=one.root))
    many = RunDir(tmp_path / "many")
    for name in ("data", "clusters"):
        shutil.copytree(one.root / name, many.root / name)
    run_stage("partition", make_cfg(*BASE, run_dir=one.root))

    extra = ("cluster.partition_parts=2", "submit.launcher=local", "submit.parallel=2")
    result = submit_stage(make_cfg, many.root, "partition", *BASE, *extra)
    assert result["parts_started"] == [0, 1] and result["jobs"] == {
        "part-0000": "done",
        "part-0001": "done",
        "merge": "done",
    }
    header = next((many.root / "logs" / "partition" / "part-0001").glob("local-*.out")).read_text().splitlines()[0]
    assert " -m ddm partition cluster.partition_part=1 " in header and "data.workers=" in header

    def contents(rd: RunDir) -> dict:
        files = sorted(p for p in rd.partitions.rglob("*") if p.is_file() and not p.name.startswith("verified"))
        return {str(p.relative_to(rd.partitions)): p.read_bytes() for p in files}

    assert contents(many) == contents(one) and len(read_json(many.partitions_index)["sizes"]) == 4
    again = submit_stage(make_cfg, many.root, "partition", *BASE, *extra)
    assert again["manifest"] == "done" and again["parts_started"] == [] and "jobs" not in again
