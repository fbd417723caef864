"""Sampling in parts: sample i's draws come from (seed, i) alone, so P parts joined equal one job, bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ddm.errors import BadInput, MissingInput
from ddm.flow import FlowPath
from ddm.io import write_json
from ddm.sampling.indexed import RowStreams, index_noise
from ddm.sampling.parts import check_parts, part_files, part_range
from ddm.settings.values import changed
from tests.test_sampling import make_run, stage_cfg


def test_part_ranges_are_whole_batches_that_tile_the_run():
    for total, batch, parts in [(10, 4, 2), (10, 4, 3), (10, 4, 5), (7, 3, 1), (256, 64, 4), (5, 8, 2)]:
        spans = [part_range(total, batch, parts, j) for j in range(parts)]
        assert [i for s in spans for i in s] == list(range(total))
        assert all(s.start % batch == 0 for s in spans if len(s))  # a part starts where a one-job batch starts
    assert [tuple(part_range(10, 4, 2, j)) for j in range(2)] == [(0, 1, 2, 3), (4, 5, 6, 7, 8, 9)]


@pytest.mark.parametrize(
    "parts, part, match",
    [
        (0, None, "sample.parts=0"),
        (2, 2, "sample.part=2 is not one of the 2"),
        (2, -1, "give 0..1"),
        (1.5, None, "sample.parts=1.5"),
    ],
)
def test_bad_part_settings_are_named(parts, part, match):
    with pytest.raises(BadInput, match=match):
        check_parts(parts, part)


def test_index_noise_belongs_to_the_index_not_the_batch():
    path = FlowPath()
    whole = index_noise(path, 3, range(0, 6), (1, 2, 2))
    halves = torch.cat([index_noise(path, 3, range(0, 2), (1, 2, 2)), index_noise(path, 3, range(2, 6), (1, 2, 2))])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, index_noise(path, 4, range(0, 6), (1, 2, 2)))  # the seed matters
    assert not torch.equal(whole[0], whole[1])  # so does the index
    # standard normal draws: their moments over many indices
    many = index_noise(path, 0, range(2000), (4,))
    assert abs(float(many.mean())) < 0.05 and abs(float(many.std()) - 1) < 0.05


def test_row_streams_draw_each_row_from_its_own_stream_and_follow_the_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.0, 0.8]])
    a = RowStreams(5, [10, 11, 12]).multinomial(probs)
    # the same sample index draws the same expert whatever its batch
    b = torch.cat([RowStreams(5, [10]).multinomial(probs[:1]), RowStreams(5, [11, 12]).multinomial(probs[1:])])
    assert torch.equal(a, b) and a.shape == (3, 1)
    assert a[0, 0] != 0 and a[1, 0] == 0 and a[2, 0] != 1  # never an expert of zero probability
    # frequencies follow the probabilities (4000 samples, each its own stream)
    p = torch.tensor([[0.1, 0.6, 0.3]]).repeat(4000, 1)
    counts = torch.bincount(RowStreams(0, range(4000)).multinomial(p).squeeze(1), minlength=3) / 4000
    assert torch.allclose(counts, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)
    # a doubled batch (guidance routed separately): stream r % n, conditional rows first
    doubled = RowStreams(5, [10, 11, 12]).multinomial(torch.cat([probs, probs]))
    assert torch.equal(doubled[:3], a)
    with pytest.raises(ValueError, match="cannot draw for a batch of 4 rows"):
        RowStreams(5, [10, 11, 12]).multinomial(probs[:1].repeat(4, 1))
    # a cumulative sum that ends under 1 (rounding, exaggerated here): a draw above it goes to the last expert
    # of nonzero probability, never to the zero one after it
    short = torch.tensor([[0.3, 0.3, 0.0]]).repeat(200, 1)
    drawn = RowStreams(1, range(200)).multinomial(short).squeeze(1)
    assert set(drawn.tolist()) == {0, 1} and int((drawn == 1).sum()) > 100


def _parts_cfg(root, parts, part, **sample):
    return changed(stage_cfg(root, **sample), {"sample.parts": parts, "sample.part": part})


@pytest.mark.parametrize("strategy", ["top1", "sample"])
def test_two_parts_joined_equal_one_job(tmp_path, strategy):
    from ddm.stages import sample as stage

    sampling = dict(strategy=strategy, num_samples=5, batch_size=3, solver="euler", steps=2)
    one = make_run(tmp_path / "one", K=2)
    whole = stage.run(stage_cfg(one.root, **sampling))
    split = make_run(tmp_path / "split", K=2)
    # the same weights in both runs: copy the first run's networks
    for src, dst in [(one.router_weights, split.router_weights)] + [
        (one.expert_weights(k), split.expert_weights(k)) for k in range(2)
    ]:
        dst.write_bytes(src.read_bytes())
    for src, dst in [(one.router_record, split.router_record)] + [
        (one.expert_record(k), split.expert_record(k)) for k in range(2)
    ]:
        if src.exists():
            dst.write_bytes(src.read_bytes())

    first = stage.run(_parts_cfg(split.root, 2, 0, **sampling))
    assert first["range"] == [0, 6] and not split.samples_record.exists()  # 11 samples: batches 0-1, then 2-3
    with pytest.raises(MissingInput, match=r"parts 1 of sample.parts=2 are not done .*sample.part=J"):
        stage.run(_parts_cfg(split.root, 2, None, **sampling))
    second = stage.run(_parts_cfg(split.root, 2, 1, **sampling))
    assert second["range"] == [6, 11]
    joined = stage.run(_parts_cfg(split.root, 2, None, **sampling))

    a, b = np.load(one.samples / "samples.npz"), np.load(split.samples / "samples.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert int(a["num_grid"]) == int(b["num_grid"]) == 6
    adm_a, adm_b = np.load(one.samples / "samples_adm.npz"), np.load(split.samples / "samples_adm.npz")
    assert np.array_equal(adm_a["arr_0"], adm_b["arr_0"]) and np.array_equal(adm_a["arr_1"], adm_b["arr_1"])
    usage_a = json.loads((one.samples / "usage.json").read_text())
    usage_b = json.loads((split.samples / "usage.json").read_text())
    assert [r["counts"] for r in usage_a] == [r["counts"] for r in usage_b]
    for ra, rb in zip(usage_a, usage_b):
        assert rb["weights"] == pytest.approx(ra["weights"])
    for key in ("num_images", "num_grid", "experts_used", "settings", "models", "experts_per_sample"):
        assert joined[key] == whole[key], key
    assert joined["parts"]["count"] == 2 and len(joined["parts"]["wall_s"]) == 2

    # joined once: a part or the join asked again is skipped; so is a one-job run of the same settings
    assert stage.run(_parts_cfg(split.root, 2, 0, **sampling)) == joined and not (split.samples / "parts").exists()
    assert stage.run(stage_cfg(split.root, **sampling)) == joined


def test_more_parts_than_batches_leave_a_part_empty_and_still_join(tmp_path):
    from ddm.stages import sample as stage

    sampling = dict(num_samples=2, batch_size=4, solver="euler", steps=2)  # 8 samples: 2 batches
    rd = make_run(tmp_path, K=2)
    whole = stage.run(stage_cfg(rd.root, **sampling))
    images = np.load(rd.samples / "samples.npz")["images"]
    rd.samples_record.unlink()
    assert [stage.run(_parts_cfg(rd.root, 3, j, **sampling))["range"] for j in range(3)] == [[0, 0], [0, 4], [4, 8]]
    joined = stage.run(_parts_cfg(rd.root, 3, None, **sampling))
    assert joined["num_images"] == whole["num_images"] == 8
    assert np.array_equal(np.load(rd.samples / "samples.npz")["images"], images)


def test_a_damaged_or_stale_part_is_named(tmp_path):
    from ddm.stages import sample as stage

    rd = make_run(tmp_path, K=2)
    sampling = dict(num_samples=2, batch_size=4, solver="euler", steps=2)
    stage.run(_parts_cfg(rd.root, 2, 0, **sampling))
    stage.run(_parts_cfg(rd.root, 2, 1, **sampling))
    npz, js = part_files(rd.samples, 1, 2)
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])  # a copy cut off half-way
    with pytest.raises(BadInput, match=r"part-0001-of-0002.npz is missing or damaged .*sample.part=1 redo=true"):
        stage.run(_parts_cfg(rd.root, 2, None, **sampling))
    assert not rd.samples_record.exists()
    npz.write_bytes(good)
    # a part drawn with other settings than the join asks for
    with pytest.raises(BadInput, match=r"part-0000-of-0002.json was drawn with other settings"):
        stage.run(_parts_cfg(rd.root, 2, None, **dict(sampling, steps=3)))
    # a part's record naming another range (drawn with another batch size)
    record = json.loads(js.read_text())
    js.write_text(json.dumps(dict(record, range=[5, 8])))
    with pytest.raises(BadInput, match="another sample.batch_size"):
        stage.run(_parts_cfg(rd.root, 2, None, **sampling))
    js.write_text(json.dumps(record))
    assert stage.run(_parts_cfg(rd.root, 2, None, **sampling))["num_images"] == 8


# ---- ddm submit submit.stage=sample -------------------------------------------------------------
SAMPLING = (
    "sample.device=cpu",
    "sample.steps=2",
    "sample.solver=euler",
    "sample.per_class=2",
    "sample.num_samples=3",
    "sample.batch_size=4",
)


def _submit(make_cfg, run_dir, *extra) -> dict:
    from ddm.stages import submit

    ovr = [f"run_dir={run_dir}", "submit.stage=sample", *SAMPLING, *extra]
    return submit.run(make_cfg(*ovr, run_dir=run_dir), overrides=ovr)


def test_submit_sends_the_parts_not_drawn_on_gpus_then_their_join(make_cfg, tmp_path, no_slurm, capsys):
    from ddm.stages.runner import run_stage

    rd = make_run(tmp_path / "run", K=2)
    run_stage("sample", make_cfg(*SAMPLING, "sample.parts=3", "sample.part=1", run_dir=rd.root))  # part 1 drawn
    result = _submit(make_cfg, rd.root, "sample.parts=3", "island=gpu", "submit.dry_run=true")
    assert result["parts_done"] == [1] and result["parts_submitted"] == [0, 2]
    array, join = capsys.readouterr().out.split("# --- ")[1:]
    assert "#SBATCH --array=0,2\n" in array and "--job-name=ddm:run:sample-parts\n" in array
    assert "#SBATCH --gres=gpu:1\n" in array and '"sample.part=$SLURM_ARRAY_TASK_ID"' in array
    assert " -m ddm sample" in array and "sample.parts=3" in array
    assert "--job-name=ddm:run:sample\n" in join and "--gres" not in join and "--array" not in join
    assert "--dependency=afterok:ARRAY_JOB_ID" in join

    # a part drawn with other settings is not done: it goes out again
    other = _submit(make_cfg, rd.root, "sample.parts=3", "sample.steps=3", "submit.dry_run=true")
    assert other["parts_done"] == [] and other["parts_submitted"] == [0, 1, 2]
    capsys.readouterr()


def test_local_sample_parts_joined_equal_one_job(make_cfg, tmp_path, no_slurm):
    from ddm.stages.runner import run_stage

    one = make_run(tmp_path / "one", K=2)
    run_stage("sample", make_cfg(*SAMPLING, run_dir=one.root))
    many = tmp_path / "many"
    for name in ("router", "experts"):
        shutil.copytree(one.root / name, many / name)
    result = _submit(make_cfg, many, "sample.parts=2", "submit.launcher=local", "submit.parallel=2")
    assert result["parts_started"] == [0, 1] and result["jobs"] == {
        "part-0000": "done",
        "part-0001": "done",
        "merge": "done",
    }
    a, b = np.load(one.samples / "samples.npz"), np.load(many / "samples" / "samples.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    again = _submit(make_cfg, many, "sample.parts=2", "submit.launcher=local")
    assert again["manifest"] == "done" and again["parts_started"] == []


def test_cycled_labels_give_each_class_in_turn_and_a_bad_order_is_named(tmp_path):
    from ddm.sampling.grid import plan_labels
    from ddm.stages import sample as stage

    labels, grid = plan_labels(3, 1, 7, None, None, "cycle")
    assert grid == 3 and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    rd = make_run(tmp_path, K=2)
    record = stage.run(stage_cfg(rd.root, label_order="cycle", num_samples=6, solver="euler", steps=2))
    assert record["settings"]["label_order"] == "cycle"
    assert np.load(rd.samples / "samples.npz")["labels"][record["num_grid"] :].tolist() == [0, 1, 2, 0, 1, 2]
    # the default is left out of the settings: records made before the option stay valid
    assert "label_order" not in stage.run(stage_cfg(rd.root, solver="euler", steps=2))["settings"]
    with pytest.raises(BadInput, match="sample.label_order='sorted' is not one of random, cycle"):
        stage.run(stage_cfg(rd.root, label_order="sorted"))


def test_status_shows_the_sample_parts_until_they_are_joined(make_cfg, tmp_path, no_slurm, capsys):
    from ddm.stages import status
    from ddm.stages.runner import run_stage

    rd = make_run(tmp_path / "run", K=2)
    write_json(rd.cluster_report, dict(k=2))
    run_stage("sample", make_cfg(*SAMPLING, "sample.parts=2", "sample.part=1", run_dir=rd.root))
    shown = status.run(make_cfg(*SAMPLING, "sample.parts=2", run_dir=rd.root))
    assert shown["sampling"]["parts_done"] == [1] and shown["sampling"]["parts_missing"] == [0]
    assert "sample not complete" in capsys.readouterr().out
    run_stage("sample", make_cfg(*SAMPLING, "sample.parts=2", "sample.part=0", run_dir=rd.root))
    run_stage("sample", make_cfg(*SAMPLING, "sample.parts=2", run_dir=rd.root))
    assert status.run(make_cfg(*SAMPLING, "sample.parts=2", run_dir=rd.root))["sampling"] is None
