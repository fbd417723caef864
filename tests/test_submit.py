"""`ddm submit` and `ddm status` without a cluster: rendered scripts, what gets submitted, job states."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ddm.io import write_json
from ddm.launch import naming, overrides, sbatch, slurm
from ddm.stages import status, submit
from tests.fabricate import make_partitions

REPO = Path(__file__).resolve().parent.parent


def fake_run(run_dir: Path, k: int = 4):
    """Partitions and a cluster report for K experts, as `ddm partition` leaves them."""
    rd = make_partitions(run_dir, sizes=(10,) * k)
    write_json(rd.cluster_report, dict(k=k, clustering_id="c0ffee", sizes=[10] * k))
    return rd


def finish(rd, k: int, steps: int = 20, loss: float = 0.5) -> None:
    write_json(rd.expert_record(k), dict(expert_id=k, steps=steps, final_loss=loss, resumed_from=None))


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.setattr(slurm, "available", lambda: False)


@pytest.fixture
def fake_slurm(monkeypatch):
    """SLURM that records what is submitted; `queued` holds the run's queue as (experts, router)."""
    state = dict(submitted=[], queued=({}, None))
    monkeypatch.setattr(slurm, "available", lambda: True)
    monkeypatch.setattr(slurm, "run_jobs", lambda run_dir: state["queued"])

    def fake_sbatch(path, extra_args=None):
        state["submitted"].append(Path(path))
        return str(100 + len(state["submitted"]))

    monkeypatch.setattr(slurm, "sbatch", fake_sbatch)
    return state


def cfg_for(make_cfg, run_dir, *extra):
    ovr = ["experiment=tiny", f"run_dir={run_dir}", *extra]
    return make_cfg(*ovr, run_dir=run_dir), ovr


# -- rendering -----------------------------------------------------------------------------------


def test_array_spec_holds_exactly_the_given_ids():
    assert sbatch.format_array([3]) == "3"
    assert sbatch.format_array([1, 3]) == "1,3"
    assert sbatch.format_array([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(ValueError):
        sbatch.format_array([])


def test_overrides_pass_through_except_what_the_job_sets_itself():
    user = [
        "experiment=tiny",
        "island=gpu",
        "expert.steps=400",
        "+foo.bar=1",
        "submit.experts=[0,1]",
        "submit.dry_run=true",
        "expert.id=3",
        "name=x",
        "run_dir=/elsewhere",
        "hydra.verbose=true",
    ]
    out = overrides.job_overrides(user, "big", "/runs/big run")
    assert out == [
        "name=big",
        "run_dir='/runs/big run'",
        "experiment=tiny",
        "island=gpu",
        "expert.steps=400",
        "+foo.bar=1",
    ]


def test_expert_script_requeues_signals_and_runs_this_python(make_cfg, tmp_path):
    cfg, _ = cfg_for(make_cfg, tmp_path / "run", "island.slurm.signal_before_s=90")
    args = overrides.job_overrides(["experiment=tiny", "island.threads=1"], cfg.name, str(tmp_path / "run"))
    text = sbatch.expert_array_script(tmp_path / "run", [1, 3], args, cfg.island)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in (
        "--array=1,3",
        "--requeue",
        "--signal=B:USR1@90",
        "--nodes=1",
        "--ntasks-per-node=1",
        f"--job-name={naming.run_job_name(tmp_path / 'run', 'expert')}",
        f"--comment={(tmp_path / 'run').resolve()}",
        f"--output={(tmp_path / 'run').resolve()}/experts/expert-%2a/slurm-%A_%a.out",
    ):
        assert f"#SBATCH {directive}" in lines, directive
    assert "--gres" not in text and "srun" not in text.split("exec ", 1)[1]  # a one-CPU island
    assert f"exec {shlex.quote(sys.executable)} -m ddm train-expert" in text
    assert "island.threads=1" in text and "experiment=tiny" in text


def test_gpu_islands_ask_for_their_gpus_and_start_ranks_with_srun(make_cfg, tmp_path):
    cfg, _ = cfg_for(
        make_cfg,
        tmp_path / "run",
        "island=gpu16_2node_fsdp",
        "island.slurm.partition=a100",
        "island.slurm.account=lab",
        "island.slurm.extra=['--qos=high']",
    )
    text = sbatch.expert_array_script(tmp_path / "run", [0], [], cfg.island)
    for directive in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gres=gpu:8",
        "--partition=a100",
        "--account=lab",
        "--qos=high",
        "--time=48:00:00",
        "--mem=480G",
    ):
        assert f"#SBATCH {directive}\n" in text, directive
    assert "exec srun --kill-on-bad-exit=1 " in text
    one_gpu = make_cfg("island=gpu", "island.slurm.gres=gpu:a100:1").island
    assert "#SBATCH --gres=gpu:a100:1\n" in sbatch.router_script(tmp_path / "run", [], one_gpu)


def test_rendered_script_runs_the_right_command(make_cfg, tmp_path):
    """Execute the script with a stand-in python: each override arrives as one argument, and the
    job's Hydra folder lands in the expert's own folder."""
    run_dir = tmp_path / "my run"
    cfg, _ = cfg_for(make_cfg, run_dir)
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake_python.chmod(0o755)
    user = ["experiment=tiny", "data.urls='/data/a {0..1}.tar'"]
    text = sbatch.expert_array_script(
        run_dir, [3], overrides.job_overrides(user, "tiny", str(run_dir)), cfg.island, python=str(fake_python)
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = dict(
        os.environ,
        SLURM_ARRAY_TASK_ID="3",
        SLURM_ARRAY_JOB_ID="77",
        SLURM_CPUS_PER_TASK="2",
        ARGS_OUT=str(tmp_path / "args.txt"),
    )
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
    argv = (tmp_path / "args.txt").read_text().splitlines()
    assert argv[:3] == ["-m", "ddm", "train-expert"]
    assert argv[3:] == [
        "expert.id=3",
        f"hydra.run.dir={run_dir.resolve()}/experts/expert-03/hydra/slurm-77_3",
        "name=tiny",
        f"run_dir='{run_dir.resolve()}'",
        "experiment=tiny",
        "data.urls='/data/a {0..1}.tar'",
    ]


def test_plain_sbatch_scripts_are_valid_and_documented():
    for name, needle in (("experts.sbatch", '"expert.id=$SLURM_ARRAY_TASK_ID"'), ("router.sbatch", "train-router")):
        path = REPO / "scripts" / "slurm" / name
        text = path.read_text()
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text and needle in text
        assert text.splitlines()[1].startswith("# ") and "sbatch " in text.split("#SBATCH")[0]


# -- what gets submitted -------------------------------------------------------------------------


def test_submit_sends_only_unfinished_unqueued_experts_as_one_array(make_cfg, tmp_path, fake_slurm):
    rd = fake_run(tmp_path / "run")
    finish(rd, 0)
    fake_slurm["queued"] = ({2: slurm.QueuedJob("9_2", 2, "RUNNING", "ddm:run:expert", str(rd.root))}, None)
    cfg, ovr = cfg_for(make_cfg, rd.root, "island.threads=1")
    result = submit.run(cfg, overrides=ovr)
    assert result["experts_done"] == [0] and result["experts_queued"] == [2]
    assert result["experts_submitted"] == [1, 3] and result["expert_job"] == "101"
    assert result["router"] == "submitted" and result["router_job"] == "102"
    expert_script, router_script = fake_slurm["submitted"]
    assert expert_script.parent == rd.root / "slurm" and expert_script.name.startswith("expert-array-")
    text = expert_script.read_text()
    assert "#SBATCH --array=1,3\n" in text and "island.threads=1" in text
    assert "train-router" in router_script.read_text()
    assert (rd.expert(1)).is_dir() and (rd.expert(3)).is_dir() and not rd.expert(2).exists()  # log folders


def test_a_finished_run_submits_nothing(make_cfg, tmp_path, fake_slurm):
    rd = fake_run(tmp_path / "run", k=2)
    finish(rd, 0), finish(rd, 1)
    write_json(rd.router_record, dict(steps=20, final_loss=0.1))
    cfg, ovr = cfg_for(make_cfg, rd.root)
    result = submit.run(cfg, overrides=ovr)
    assert result["experts_submitted"] == [] and result["router"] == "done"
    assert fake_slurm["submitted"] == [] and not (rd.root / "slurm").exists()


def test_a_queued_router_and_a_subset_of_experts(make_cfg, tmp_path, fake_slurm):
    rd = fake_run(tmp_path / "run")
    fake_slurm["queued"] = ({}, slurm.QueuedJob("5", None, "PENDING", "ddm:run:router", ""))
    cfg, ovr = cfg_for(make_cfg, rd.root, "submit.experts=[2,3]", "island=gpu")
    result = submit.run(cfg, overrides=ovr)
    assert result["experts_submitted"] == [2, 3] and result["router"].startswith("queued (5")
    (script,) = fake_slurm["submitted"]
    text = script.read_text()
    assert "#SBATCH --array=2-3\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert "island=gpu" in text and "submit.experts" not in text


def test_two_islands_in_one_run(make_cfg, tmp_path, fake_slurm):
    """Experts 0-1 on 8-GPU nodes, 2-3 on single GPUs: two calls, two arrays, one router."""
    rd = fake_run(tmp_path / "run")
    cfg, ovr = cfg_for(make_cfg, rd.root, "submit.experts=[0,1]", "island=gpu8_ddp")
    first = submit.run(cfg, overrides=ovr)
    fake_slurm["queued"] = (
        {i: slurm.QueuedJob(f"101_{i}", i, "PENDING", "ddm:run:expert", str(rd.root)) for i in (0, 1)},
        slurm.QueuedJob("102", None, "PENDING", "ddm:run:router", str(rd.root)),
    )
    cfg, ovr = cfg_for(make_cfg, rd.root, "island=gpu")  # all experts asked for: 0 and 1 are queued
    second = submit.run(cfg, overrides=ovr)
    assert first["experts_submitted"] == [0, 1] and second["experts_submitted"] == [2, 3]
    assert second["experts_queued"] == [0, 1] and second["router"].startswith("queued")
    big, router, small = (p.read_text() for p in fake_slurm["submitted"])
    assert "--gres=gpu:8" in big and "island=gpu8_ddp" in big and "srun" in big and "--array=0-1" in big
    assert "--gres=gpu:1" in small and "island=gpu\n" in small + "\n" and "--array=2-3" in small
    assert "train-router" in router


def test_dry_run_prints_and_submits_nothing(make_cfg, tmp_path, no_slurm, capsys):
    rd = fake_run(tmp_path / "run")
    finish(rd, 1)
    cfg, ovr = cfg_for(make_cfg, rd.root, "submit.dry_run=true")
    result = submit.run(cfg, overrides=ovr)
    out = capsys.readouterr().out
    assert result["experts_submitted"] == [0, 2, 3] and result["expert_job"] is None
    assert "#SBATCH --array=0,2-3" in out and "would run: sbatch --parsable" in out and "train-router" in out
    assert not (rd.root / "slurm").exists() and not rd.expert(0).exists()


def test_clear_errors(make_cfg, tmp_path, no_slurm):
    cfg, ovr = cfg_for(make_cfg, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="ddm cluster"):
        submit.run(cfg, overrides=ovr)
    rd = fake_run(tmp_path / "run", k=2)
    cfg, ovr = cfg_for(make_cfg, rd.root)
    with pytest.raises(slurm.SlurmError, match=r"SLURM is not available.*ddm train-expert expert.id="):
        submit.run(cfg, overrides=ovr)
    cfg, ovr = cfg_for(make_cfg, rd.root, "submit.experts=[1,5]", "submit.dry_run=true")
    with pytest.raises(ValueError, match="K=2"):
        submit.run(cfg, overrides=ovr)
    cfg, ovr = cfg_for(make_cfg, rd.root, "redo=true", "submit.dry_run=true")
    with pytest.raises(ValueError, match="redo"):
        submit.run(cfg, overrides=ovr)


def test_command_line_passes_its_overrides_to_the_jobs(tmp_path):
    """From `ddm submit ...`, the overrides come from Hydra itself."""
    rd = fake_run(tmp_path / "run", k=2)
    env = dict(os.environ, PATH=str(tmp_path / "no-slurm-here"), WANDB_MODE="offline")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddm",
            "submit",
            "experiment=tiny",
            f"run_dir={rd.root}",
            "expert.steps=77",
            "submit.dry_run=true",
            "submit.router=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-1" in out.stdout and "expert.steps=77" in out.stdout
    assert "submit.dry_run" not in out.stdout.split("#SBATCH --array")[1] and "train-router" not in out.stdout


# -- the queue and status ------------------------------------------------------------------------


def test_queue_lines_are_parsed_and_filtered_by_run(monkeypatch, tmp_path):
    run_dir = (tmp_path / "run").resolve()
    text = "\n".join(
        [
            f"7_1|1|RUNNING|ddm:run:expert|{run_dir}",
            "7_3|3|PENDING|ddm:run:expert|/some/other/run",  # same folder name, other run
            "8_2|2|PENDING|ddm:run:expert|",  # submitted by hand: no comment
            "9|N/A|PENDING|ddm:run:router|a|b",
        ]
    )  # a comment may hold the separator
    jobs = slurm.parse_queue(text)
    assert jobs[3].task_id is None and jobs[3].comment == "a|b" and jobs[0].running and not jobs[1].running
    monkeypatch.setattr(slurm, "queue", lambda names: [j for j in jobs if j.name in names])
    experts, router = slurm.run_jobs(run_dir)
    assert sorted(experts) == [1, 2] and router is None


def test_status_names_each_state(make_cfg, tmp_path, fake_slurm, capsys):
    rd = fake_run(tmp_path / "run", k=6)
    finish(rd, 0, steps=20, loss=0.25)
    write_json(rd.expert(1) / "failed.json", dict(error="FloatingPointError: NaN loss at step 7"))
    (rd.expert(2) / "checkpoints").mkdir(parents=True)
    for name in ("step-0000040.ckpt", "last.ckpt"):
        (rd.expert(2) / "checkpoints" / name).write_bytes(b"")
    fake_slurm["queued"] = (
        {
            3: slurm.QueuedJob("4_3", 3, "RUNNING", "ddm:run:expert", ""),
            4: slurm.QueuedJob("4_4", 4, "PENDING", "ddm:run:expert", ""),
        },
        None,
    )
    cfg, _ = cfg_for(make_cfg, rd.root)
    result = status.run(cfg)
    states = [e["state"] for e in result["experts"]]
    assert states == ["done", "failed", "stopped", "running", "queued", "missing"]
    assert result["router"]["state"] == "missing" and result["counts"]["done"] == 1
    assert result["experts"][0]["steps"] == 20 and result["experts"][2]["steps"] == 40
    out = capsys.readouterr().out
    assert "NaN loss at step 7" in out and "4_3 RUNNING" in out and "0.2500" in out
    assert out.splitlines()[1].split() == ["job", "state", "steps", "loss", "slurm", "detail"]


def test_status_without_slurm_says_queue_unknown(make_cfg, tmp_path, no_slurm, capsys):
    rd = fake_run(tmp_path / "run", k=2)
    finish(rd, 1)
    write_json(rd.router_record, dict(steps=20, final_loss=0.1))
    cfg, _ = cfg_for(make_cfg, rd.root)
    result = status.run(cfg)
    assert [e["state"] for e in result["experts"]] == ["missing", "done"]
    assert result["router"]["state"] == "done" and result["queue"] is None
    rows = capsys.readouterr().out.splitlines()[2:]
    assert all(" n/a " in row or row.rstrip().endswith("n/a") for row in rows)
    with pytest.raises(FileNotFoundError, match="not been clustered"):
        status.run(make_cfg(f"run_dir={tmp_path / 'nothing'}"))
