"""`ddm submit submit.stage=prepare` and `ddm status` for the parts of data/: the parts not done as one array
job (or local processes), their merge after them, and each part's state."""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest

from ddm.artifacts import RunDir
from ddm.data.ingest import part_path
from ddm.errors import BadInput, MissingInput
from ddm.io import read_json, write_json
from ddm.launch import overrides, sbatch, slurm, stage_jobs
from ddm.launch.stage_parts import PREPARE
from ddm.stages import prepare, status, submit

# digits in 6 shards of 300: each of 3 parts writes 2
DIGITS = ["data=digits", "data.shard_size=300"]


def overrides_for(run_dir, *extra) -> list[str]:
    return [*DIGITS, f"run_dir={run_dir}", "submit.stage=prepare", *extra]


def submit_prepare(make_cfg, run_dir, *extra) -> dict:
    ovr = overrides_for(run_dir, *extra)
    return submit.run(make_cfg(*ovr, run_dir=run_dir), overrides=ovr)


def mark_done(run_dir, part: int, parts: int) -> None:
    """A part's record, as its job leaves it last (submit and status look for the file only)."""
    write_json(part_path(RunDir(run_dir).data, part, parts), dict(part=part, parts=parts, units=[]))


def queued(job_id: str, task: int | None, state: str = "PENDING") -> slurm.QueuedJob:
    return slurm.QueuedJob(job_id, task, state, "ddm:run:prepare-parts" if task is not None else "ddm:run:prepare", "")


# -- on SLURM --------------------------------------------------------------------------------------


def test_dry_run_sends_the_missing_parts_as_one_array_and_the_merge_after_it(make_cfg, tmp_path, no_slurm, capsys):
    run = tmp_path / "run"  # no clusters, no partitions: prepare needs none
    mark_done(run, 1, 4)
    result = submit_prepare(make_cfg, run, "data.parts=4", "submit.dry_run=true", "island=gpu")
    assert result["parts_done"] == [1] and result["parts_submitted"] == [0, 2, 3] and result["manifest"] == "submitted"
    out = capsys.readouterr().out
    array, merge = out.split("# --- ")[1:]
    assert "#SBATCH --array=0,2-3\n" in array and "--job-name=ddm:run:prepare-parts" in array
    assert '"data.part=$SLURM_ARRAY_TASK_ID"' in array and "data.parts=4" in array and " -m ddm prepare" in array
    assert "--gres" not in out and "--signal" not in out and "--ntasks-per-node=1\n" in out  # no GPU to write shards
    assert "--array" not in merge and "data.part=" not in merge.replace("data.parts=4", "")
    assert "--job-name=ddm:run:prepare\n" in merge and "data.parts=4" in merge
    assert "sbatch --parsable --dependency=afterok:ARRAY_JOB_ID --kill-on-invalid-dep=yes " in merge
    assert not (run / "slurm").exists() and not (run / "logs").exists()  # a dry run writes nothing


def test_the_merge_waits_for_the_new_array_and_every_part_queued_before(make_cfg, tmp_path, fake_slurm):
    run = tmp_path / "run"
    mark_done(run, 0, 4)
    fake_slurm["queued"] = ({2: queued("9_2", 2, "RUNNING")}, queued("10", None))  # an earlier merge waits
    result = submit_prepare(make_cfg, run, "data.parts=4")
    assert result["parts_done"] == [0] and result["parts_queued"] == [2] and result["parts_submitted"] == [1, 3]
    (array, array_args), (merge, merge_args) = fake_slurm["submitted"]
    assert result["parts_job"] == "101" and result["manifest_job"] == "102" and array_args == []
    assert "#SBATCH --array=1,3\n" in array.read_text() and array.parent == run.resolve() / "slurm"
    assert merge_args == ["--dependency=afterok:101:9_2", "--kill-on-invalid-dep=yes"]
    assert fake_slurm["cancelled"] == ["10"]  # it waited for parts 1 and 3 never sent: replaced
    for j in (1, 3):  # SLURM writes each task's log there and creates no folder
        assert (run / "logs" / "prepare" / f"part-000{j}").is_dir()
    assert not (run / "logs" / "prepare" / "part-0000").exists()


def test_nothing_or_only_the_merge_is_left_to_submit(make_cfg, tmp_path, fake_slurm):
    run = tmp_path / "run"
    for j in range(3):
        mark_done(run, j, 3)
    fake_slurm["queued"] = ({}, queued("7", None))
    queued_merge = submit_prepare(make_cfg, run, "data.parts=3")
    assert queued_merge["parts_submitted"] == [] and queued_merge["manifest"] == "queued (7 PENDING)"
    assert fake_slurm["submitted"] == [] and fake_slurm["cancelled"] == []

    fake_slurm["queued"] = ({}, None)
    merge_only = submit_prepare(make_cfg, run, "data.parts=3")
    ((merge, args),) = fake_slurm["submitted"]
    assert merge_only["parts_job"] is None and merge_only["manifest_job"] == "101" and args == []  # no dependency
    assert "merge" in merge.name and "data.part=" not in merge.read_text().replace("data.parts=3", "")

    write_json(RunDir(run).data_manifest, dict(num_samples=0, shards=[]))
    done = submit_prepare(make_cfg, run, "data.parts=3")
    assert done["manifest"] == "done" and done["parts_submitted"] == [] and len(fake_slurm["submitted"]) == 1


def test_one_part_is_one_job_that_writes_the_manifest(make_cfg, tmp_path, fake_slurm):
    result = submit_prepare(make_cfg, tmp_path / "run")
    ((script, args),) = fake_slurm["submitted"]
    text = script.read_text()
    assert result["parts"] == 1 and result["parts_submitted"] == [] and result["manifest_job"] == "101"
    assert "--array" not in text and "data.part" not in text and " -m ddm prepare" in text and args == []


def test_a_part_task_runs_prepare_with_its_part(make_cfg, tmp_path):
    """The rendered array script, executed with a stand-in python: task 2 writes part 2, its Hydra logs in its
    own folder, beside the log SLURM writes there (the same zero-padded number)."""
    run = tmp_path / "my run"
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake_python.chmod(0o755)
    user = [*DIGITS, "data.parts=3", "data.part=1", "submit.stage=prepare"]  # the task sets data.part itself
    args = overrides.job_overrides(user, "demo", str(run))
    text = sbatch.parts_script(PREPARE, run, [0, 2], args, make_cfg().island, python=str(fake_python))
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_JOB_ID="77", ARGS_OUT=str(tmp_path / "args.txt"))
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
    part_dir = run.resolve() / "logs" / "prepare" / "part-0002"
    assert (tmp_path / "args.txt").read_text().splitlines() == [
        "-m",
        "ddm",
        "prepare",
        "data.part=2",
        f"hydra.run.dir={part_dir}/hydra/slurm-77_2",
        "name=demo",
        f"run_dir='{run.resolve()}'",
        *DIGITS,
        "data.parts=3",
    ]
    assert f"#SBATCH --output={run.resolve()}/logs/prepare/part-%4a/slurm-%A_%a.out" in text.replace('"', "")


# -- on this machine -------------------------------------------------------------------------------


def test_local_dry_run_divides_the_cores_between_the_parts(make_cfg, tmp_path, no_slurm, monkeypatch, capsys):
    monkeypatch.setattr(stage_jobs, "available_cores", lambda: 8)
    run = tmp_path / "run"
    mark_done(run, 1, 3)
    result = submit_prepare(make_cfg, run, "data.parts=3", "submit.launcher=local", "submit.dry_run=true")
    assert result["parts_started"] == [0, 2] and result["parallel"] == 2
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if " -m ddm prepare " in line]
    assert [c[4] for c in commands[:2]] == ["data.part=0", "data.part=2"]
    assert all("data.workers=4" in c and "data.parts=3" in c for c in commands[:2])  # 2 at a time x 4 = 8 cores
    assert len(commands) == 3 and not any(a.startswith(("data.part=", "data.workers")) for a in commands[2][4:])
    mine = submit_prepare(
        make_cfg,
        run,
        "data.parts=3",
        "submit.launcher=local",
        "submit.dry_run=true",
        "data.workers=3",
        "submit.parallel=1",
    )
    assert mine["parallel"] == 1
    assert [a for a in shlex.split(capsys.readouterr().out) if a.startswith("data.workers")] == ["data.workers=3"] * 3


@pytest.mark.slow
def test_local_parts_then_the_merge_write_what_one_job_writes(make_cfg, tmp_path, no_slurm):
    one = RunDir(tmp_path / "one")
    prepare.run(make_cfg(*DIGITS, run_dir=one.root))
    many = RunDir(tmp_path / "many")
    prepare.run(make_cfg(*DIGITS, "data.parts=3", "data.part=1", run_dir=many.root))  # part 1 by hand, first

    result = submit_prepare(make_cfg, many.root, "data.parts=3", "submit.launcher=local", "submit.parallel=2")
    assert result["parts_done"] == [1] and result["parts_started"] == [0, 2]
    assert result["jobs"] == {"part-0000": "done", "part-0002": "done", "merge": "done"}
    logs = many.root / "logs" / "prepare"
    assert sorted(p.name for p in logs.iterdir()) == ["merge", "part-0000", "part-0002"]  # part 1 not rerun
    header = next((logs / "part-0002").glob("local-*.out")).read_text().splitlines()[0]
    assert " -m ddm prepare data.part=2 " in header and "data.parts=3" in header and "data.workers=" in header

    manifest = read_json(many.data_manifest)
    assert manifest == read_json(one.data_manifest) and len(manifest["shards"]) == 6
    for shard in manifest["shards"]:
        assert (many.data / shard["path"]).read_bytes() == (one.data / shard["path"]).read_bytes()
    assert not (many.data / "parts").exists()

    again = submit_prepare(make_cfg, many.root, "data.parts=3", "submit.launcher=local")
    assert again["manifest"] == "done" and again["parts_started"] == [] and "jobs" not in again
    assert sorted(p.name for p in logs.iterdir()) == ["merge", "part-0000", "part-0002"]


# -- status ----------------------------------------------------------------------------------------


def test_status_shows_each_part_until_the_manifest_exists(make_cfg, tmp_path, fake_slurm, capsys):
    run = tmp_path / "run"
    mark_done(run, 1, 4)
    log = run / "logs" / "prepare" / "part-0003" / "slurm-5_3.out"
    log.parent.mkdir(parents=True)
    log.write_text("BadInput: ...\n")  # a task that ended without its record
    fake_slurm["queued"] = ({2: queued("5_2", 2, "RUNNING"), 0: queued("5_0", 0)}, queued("6", None))
    result = status.run(make_cfg(*DIGITS, "data.parts=4", run_dir=run))
    assert [r["state"] for r in result["part_rows"]] == ["queued", "done", "running", "missing"]
    assert result["manifest"]["name"] == "merge" and result["manifest"]["state"] == "queued"
    assert result["parts_done"] == [1] and result["parts_queued"] == [0, 2] and result["parts_missing"] == [3]
    out = capsys.readouterr().out
    assert "parts (data.parts=4): 1 done, 1 running, 1 queued, 1 missing; merge: queued" in out.splitlines()[0]
    assert "5_2 RUNNING" in out and str(log) in out

    fake_slurm["queued"] = ({}, None)
    seen = status.run(make_cfg(*DIGITS, run_dir=run))  # data.parts read from the records
    assert seen["parts"] == 4 and [r["state"] for r in seen["part_rows"]] == ["missing", "done", "missing", "missing"]

    write_json(RunDir(run).data_manifest, dict(num_samples=0, shards=[]))
    with pytest.raises(MissingInput, match="not been clustered"):  # data/ is complete: the line of today
        status.run(make_cfg(*DIGITS, run_dir=run))

    fake_slurm["queued"] = ({0: queued("8_0", 0)}, None)  # queued tasks, no record: how many parts is unknown
    with pytest.raises(BadInput, match=r"give data\.parts=N"):
        status.run(make_cfg(*DIGITS, run_dir=tmp_path / "other"))
    assert status.run(make_cfg(*DIGITS, "data.parts=2", run_dir=tmp_path / "other"))["parts_queued"] == [0]


def test_user_overrides_reach_the_parts_but_data_part_does_not():
    user = ["data=digits", "data.parts=3", "data.part=1", "data.workers=2", "submit.stage=prepare"]
    assert overrides.job_overrides(user, "x", "/r") == [
        "name=x",
        "run_dir=/r",
        "data=digits",
        "data.parts=3",
        "data.workers=2",
    ]


# -- a real SLURM cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from tests.slurm_cluster import running_cluster

    yield from running_cluster()


@pytest.mark.slow
def test_a_two_part_prepare_on_slurm(cluster, make_cfg, tmp_path):
    run = RunDir(tmp_path / "run")
    extra = ["data.parts=2", "island.slurm.cpus_per_task=1"]  # one core each: both parts at once on 2 cores
    result = submit_prepare(make_cfg, run.root, *extra)
    assert result["parts_submitted"] == [0, 1] and result["parts_job"] and result["manifest_job"]
    seen = status.run(make_cfg(*DIGITS, *extra, run_dir=run.root))
    assert {r["state"] for r in seen["part_rows"]} <= {"queued", "running", "done"}, seen
    again = submit_prepare(make_cfg, run.root, *extra)  # SLURM's queue keeps them from going out twice
    assert again["parts_submitted"] == [] and sorted(again["parts_done"] + again["parts_queued"]) == [0, 1]
    assert again["manifest"].startswith(f"queued ({result['manifest_job']} ") and again.get("manifest_job") is None

    deadline = time.monotonic() + 300
    while cluster.queue() and time.monotonic() < deadline:
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(run.root.rglob("slurm-*.out")))
    assert not cluster.queue(), f"still queued after 300s: {cluster.queue()}\n{logs}\n{cluster.logs()}"
    assert run.data_manifest.exists(), logs
    one = RunDir(tmp_path / "one")
    prepare.run(make_cfg(*DIGITS, run_dir=one.root))
    assert read_json(run.data_manifest) == read_json(one.data_manifest)
    for j in (0, 1):
        assert (run.root / "logs" / "prepare" / f"part-000{j}" / f"slurm-{result['parts_job']}_{j}.out").exists()
    assert (run.root / "logs" / "prepare" / "merge" / f"slurm-{result['manifest_job']}.out").exists()
    assert submit_prepare(make_cfg, run.root, *extra)["manifest"] == "done"
