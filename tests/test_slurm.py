"""Against a real single-node SLURM cluster started on this machine (Debian's slurm-wlm and munge).

The tiny run is prepared in-process, then its experts go to SLURM as one array
job and its router as another job; every record and checkpoint is checked.
Then one expert is cancelled mid-training and resubmitted: it must resume
from its last checkpoint. Also: the Hydra submitit launcher and the plain
sbatch scripts in scripts/slurm/. Skipped, with the reason, only where SLURM
cannot be installed or started (not root, no apt-get).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddm.artifacts import RunDir
from ddm.io import read_json
from tests.slurm_cluster import SlurmCluster, running_cluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# One core and one thread per job, loading in the training process: 2 cores hold two jobs at once.
JOB_OVERRIDES = ["experiment=tiny", "island.num_workers=0", "island.threads=1", "island.slurm.cpus_per_task=1"]


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny run up to its partitions, as the login node would prepare it."""
    from ddm.config import settings
    from ddm.stages import cluster, embed, partition, prepare

    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    ovr = [*JOB_OVERRIDES, f"run_dir={run_dir}"]
    cfg = settings(ovr)
    for stage in (prepare, embed, cluster, partition):
        stage.run(cfg)
    return cfg, ovr, RunDir(run_dir)


def _compose(ovr):
    from ddm.config import settings

    return settings(ovr)


def _submit(ovr):
    from ddm.stages import submit

    return submit.run(_compose(ovr), overrides=ovr)


def _logs(rd: RunDir) -> str:
    """Every SLURM job log of a run, for failure messages."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(rd.root.rglob("slurm-*.out")))


def wait_for(cluster: SlurmCluster, job_ids, timeout: float, rd: RunDir | None = None) -> None:
    """Until SLURM lists none of these jobs (or tasks of these array jobs)."""
    job_ids = {str(j) for j in job_ids if j}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = [line.split("|")[0] for line in cluster.queue()]
        if not any(j == jid or j.startswith(jid + "_") for j in listed for jid in job_ids):
            return
        time.sleep(1)
    pytest.fail(
        f"jobs {sorted(job_ids)} still queued after {timeout:.0f}s: {cluster.queue()}\n"
        f"{_logs(rd) if rd else ''}\n{cluster.logs()}"
    )


def cancel_for_good(cluster: SlurmCluster, job_id: str, timeout: float = 90) -> None:
    """``scancel`` a running job until SLURM no longer lists it. A training job may answer the SIGTERM by
    saving a checkpoint and requeueing itself; a user cancels the requeued, pending job once more."""
    from ddm.launch import slurm

    deadline = time.monotonic() + timeout
    while any(line.split("|")[0] == job_id for line in cluster.queue()):
        assert time.monotonic() < deadline, f"{job_id} still queued {timeout:.0f}s after scancel: {cluster.queue()}"
        try:
            slurm.scancel(job_id)
        except slurm.SlurmError:  # it ended between the check and the cancel
            pass
        time.sleep(2)


def test_submit_trains_every_expert_and_the_router(cluster, tiny):
    from ddm.stages import status

    cfg, ovr, rd = tiny
    k = int(read_json(rd.cluster_report)["k"])
    first = _submit(ovr)
    assert first["experts_submitted"] == list(range(k)) and first["expert_job"] and first["router_job"]

    # While they wait or run, SLURM's queue keeps them from being submitted twice.
    seen = status.run(cfg)
    assert {e["state"] for e in seen["experts"]} <= {"queued", "running"}, seen["experts"]
    again = _submit(ovr)
    assert again["experts_submitted"] == [] and sorted(again["experts_queued"] + again["experts_done"]) == list(
        range(k)
    )
    assert again["expert_job"] is None and again["router_job"] is None

    wait_for(cluster, [first["expert_job"], first["router_job"]], 300, rd)
    for i in range(k):
        record = rd.expert_record(i)
        assert record.exists(), f"expert {i} left no record\n{_logs(rd)}"
        assert read_json(record)["steps"] == cfg.expert.steps
        assert (rd.expert(i) / "checkpoints" / "last.ckpt").exists() and rd.expert_weights(i).exists()
        assert (rd.expert(i) / f"slurm-{first['expert_job']}_{i}.out").exists()  # each task logs in its folder
    assert read_json(rd.router_record)["steps"] == cfg.router.steps and rd.router_weights.exists()
    assert (rd.router / f"slurm-{first['router_job']}.out").exists()


def test_resubmitting_a_finished_run_submits_nothing(cluster, tiny):
    from ddm.stages import status

    cfg, ovr, rd = tiny
    before = cluster.command(["squeue", "-h", "-o", "%i"]).stdout
    result = _submit(ovr)
    assert result["experts_submitted"] == [] and result["router"] == "done" and result["scripts"] == []
    assert cluster.command(["squeue", "-h", "-o", "%i"]).stdout == before == ""
    table = status.run(cfg)
    assert all(e["state"] == "done" for e in table["experts"]) and table["router"]["state"] == "done"
    assert table["queue"] == "slurm"


def test_a_cancelled_expert_resumes_when_resubmitted(cluster, tiny):
    from ddm.stages import status

    cfg, ovr, rd = tiny
    steps = 600  # long enough (tens of seconds) to be cancelled mid-way even on a fast machine
    shutil.rmtree(rd.expert(1), ignore_errors=True)  # trained by the first test, when it ran
    longer = [*ovr, f"expert.steps={steps}", "expert.ckpt_every=20", "submit.experts=[1]", "submit.router=false"]
    first = _submit(longer)
    assert first["experts_submitted"] == [1] and first["router_job"] is None
    last = rd.expert(1) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert time.monotonic() < deadline, f"no checkpoint within 240s\n{_logs(rd)}"
        time.sleep(0.2)
    # A hand-started job on the same expert, beside the SLURM task: refused, naming that task.
    by_hand = subprocess.run(
        [sys.executable, "-m", "ddm", "train-expert", "expert.id=1", f"run_dir={rd.root}", *JOB_OVERRIDES],
        capture_output=True,
        text=True,
        timeout=240,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
    )
    assert by_hand.returncode == 2, by_hand.stderr[-3000:]
    assert f"array task {first['expert_job']}_1" in by_hand.stderr and "in use by another job" in by_hand.stderr
    cancel_for_good(cluster, f"{first['expert_job']}_1")
    assert not rd.expert_record(1).exists(), "the expert finished before it could be cancelled"
    assert status.run(_compose(longer))["experts"][1]["state"] in ("stopped", "failed")

    second = _submit(longer)
    assert second["experts_submitted"] == [1] and second["expert_job"] != first["expert_job"]
    wait_for(cluster, [second["expert_job"]], 300, rd)
    assert rd.expert_record(1).exists(), _logs(rd)
    record = read_json(rd.expert_record(1))
    assert record["steps"] == steps
    assert record["resumed_from"] and Path(record["resumed_from"]).name == "last.ckpt", record["resumed_from"]
    assert status.run(_compose(longer))["experts"][1]["state"] == "done"


def _copy_partitions(rd: RunDir, to: Path) -> RunDir:
    for sub in ("clusters", "partitions"):
        shutil.copytree(rd.root / sub, to / sub)
    return RunDir(to)


def test_hydra_submitit_launcher_trains_experts(cluster, tiny, tmp_path):
    """`ddm train-expert -m expert.id=0,1 hydra/launcher=submitit_slurm` sends one job per expert and waits."""
    _, _, rd = tiny
    other = _copy_partitions(rd, tmp_path / "launched")
    cmd = [
        sys.executable,
        "-m",
        "ddm",
        "train-expert",
        "-m",
        "expert.id=0,1",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *JOB_OVERRIDES,
        f"run_dir={other.root}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    for i in (0, 1):
        assert read_json(other.expert_record(i))["steps"] > 0


def test_plain_sbatch_scripts(cluster, tiny, tmp_path):
    """scripts/slurm/*.sbatch, submitted by hand with overrides after the script's name."""
    from ddm.stages import status

    _, _, rd = tiny
    other = _copy_partitions(rd, tmp_path / "plain")
    env = dict(os.environ, DDM_PYTHON=sys.executable)
    args = [*JOB_OVERRIDES, f"run_dir={other.root}"]
    common = ["--cpus-per-task=1", f"--chdir={tmp_path}"]
    name = other.root.name
    ids = []
    for script, opts in (
        (
            "experts.sbatch",
            ["--array=0-1", f"--job-name=ddm:{name}:expert", f"--output={tmp_path}/slurm-expert-%A_%a.out"],
        ),
        ("router.sbatch", [f"--job-name=ddm:{name}:router", f"--output={tmp_path}/slurm-router-%j.out"]),
    ):
        out = subprocess.run(
            ["sbatch", "--parsable", *common, *opts, str(REPO / "scripts" / "slurm" / script), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        ids.append(out.stdout.strip().split(";")[0])
    # `ddm status` finds hand-submitted jobs by their names
    seen = status.run(_compose(args))
    assert all(e["state"] in ("queued", "running") for e in seen["experts"]) and seen["router"]["state"] in (
        "queued",
        "running",
    )
    wait_for(cluster, ids, 300)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("slurm-*.out"))
    assert all(other.expert_record(i).exists() for i in (0, 1)), logs
    assert other.router_record.exists(), logs


def test_islands_that_share_only_a_bucket_submit_to_slurm(cluster, s3_bucket, tmp_path):
    """`ddm submit run_dir=s3://...` from a login node: each SLURM job pulls its own partition from the bucket and
    pushes its expert there; the logs stay on the island; `ddm status` on another machine sees them all done."""
    from ddm.config import settings
    from ddm.stages import status
    from ddm.stages.runner import run_stage
    from ddm.store import ObjectStore

    run = f"{s3_bucket}/run"

    def on(machine, *more):
        return [*JOB_OVERRIDES, f"run_dir={run}", f"store.cache={tmp_path / machine}", *more]

    for stage in ("prepare", "embed", "cluster", "partition"):
        run_stage(stage, settings(on("data")))
    first = _submit(on("login"))  # the jobs inherit the bucket's endpoint and credentials from the environment
    assert first["experts_submitted"] == [0, 1] and first["router_job"]
    working_copy = RunDir(tmp_path / "login" / "s3" / run.split("://", 1)[1])
    wait_for(cluster, [first["expert_job"], first["router_job"]], 300, working_copy)
    store = ObjectStore(run)
    keys = store.list()
    for i in (0, 1):
        assert f"experts/expert-{i:02d}/expert.pt" in keys, f"expert {i} is not in the bucket\n{_logs(working_copy)}"
        assert (working_copy.expert(i) / f"slurm-{first['expert_job']}_{i}.out").exists()  # the log stays here
    assert "router/router.pt" in keys and not any(k.endswith(".out") or "/hydra/" in k for k in keys), keys
    seen = status.run(settings(on("laptop")))
    assert [e["state"] for e in seen["experts"]] == ["done", "done"] and seen["router"]["state"] == "done"
    assert _submit(on("login"))["experts_submitted"] == []
