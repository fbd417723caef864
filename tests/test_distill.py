"""``ddm distill``: one student of the experts, its targets, record, FLOPs, resume, and sampling with it."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.distill.training import DistillModule, distill_target, teacher_velocity
from ddm.eval.flops import count_flops
from ddm.eval.flops_summary import distilled_training
from ddm.flow import FlowPath
from ddm.io import read_json, sha256_file
from ddm.models.dit import DiT
from ddm.sampling.checkpoints import load_expert
from ddm.sampling.draw import requested_settings
from ddm.stages import distill, train_expert
from ddm.stages import sample as sample_stage
from ddm.train.job import example_inputs
from tests.fabricate import FAST_JOB, make_partitions

NUM_CLASSES = 3
# The tiny experiment's networks (DiT-N/2 on 8x8) at the tests' fast job settings, on fabricated partitions.
DISTILL_FAST = ("distill.batch_size=8", "distill.warmup_steps=2", "distill.shuffle_buffer=10", "distill.steps=4")


def compose_cfg(run_dir, *overrides):
    from ddm.config import settings

    return settings(["experiment=tiny", f"run_dir={run_dir}", *FAST_JOB, "expert.steps=3", *DISTILL_FAST, *overrides])


def train_experts(run_dir, *overrides):
    for k in range(2):
        train_expert.run(compose_cfg(run_dir, f"expert.id={k}", *overrides))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Two experts trained a few steps on two fabricated clusters, and a student distilled from them."""
    root = tmp_path_factory.mktemp("distill") / "run"
    rd = make_partitions(root, sizes=(30, 20), num_classes=NUM_CLASSES)
    train_experts(root)
    record = distill.run(compose_cfg(root, "distill.ckpt_every=2"))
    return rd, record


def copy_run(rd: RunDir, dest) -> RunDir:
    shutil.copytree(rd.root, dest)
    return RunDir(dest)


def _randomised(seed: int, **config) -> DiT:
    torch.manual_seed(seed)
    net = DiT(**{**dict(size="DiT-N/2", image_size=8, in_channels=1, num_classes=NUM_CLASSES), **config})
    with torch.no_grad():  # DiT starts with zero output (adaLN-Zero): give it a real function
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _fixed_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    point = FlowPath().noised(x0, generator=g)
    y = torch.tensor([0, 1, 2, NUM_CLASSES, 0, NUM_CLASSES, 2, 1])[:n]  # two dropped labels (the null class)
    k = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])[:n]
    return point, y, k


# ---- the stage's artefacts ---------------------------------------------------------------------
def test_distill_writes_a_student_that_loads_as_an_expert(distilled):
    rd, record = distilled
    assert rd.distilled_record.exists() and read_json(rd.distilled_record) == record
    assert record["steps"] == 4 and record["samples_seen"] == 32 and record["num_experts"] == 2
    assert record["weights_sha256"] == sha256_file(rd.distilled_weights)
    net, meta = load_expert(rd.distilled_weights)  # an expert's file: the sampler's loader reads it
    assert isinstance(net, DiT) and meta["kind"] == "expert" and meta["steps"] == 4
    assert meta["model_config"] == load_expert(rd.expert_weights(0))[1]["model_config"]  # default: the experts' size
    assert meta["clustering_id"] == "c0ffee" and meta["num_experts"] == 2 and meta["label_dropout"] == 0.1
    experts = {f"expert-{k:02d}": sha256_file(rd.expert_weights(k)) for k in range(2)}
    assert meta["distilled_from"] == dict(clustering_id="c0ffee", num_experts=2, experts=experts)
    assert record["distilled_from"] == meta["distilled_from"]
    assert (rd.distilled / "checkpoints" / "last.ckpt").exists()


def test_a_finished_distillation_is_not_run_again(distilled):
    rd, record = distilled
    stamp = rd.distilled_weights.stat().st_mtime_ns
    assert distill.run(compose_cfg(rd.root)) == record
    assert rd.distilled_weights.stat().st_mtime_ns == stamp


# ---- targets -----------------------------------------------------------------------------------
class Counting(torch.nn.Module):
    """A teacher that records the batch size of each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return self.net(x, t, y)


def test_the_teacher_target_is_each_samples_own_expert_run_once_on_its_samples():
    experts = [_randomised(0), _randomised(1)]
    point, y, k = _fixed_batch()
    teachers = [Counting(e) for e in experts]
    v = teacher_velocity(teachers, point.x_t, point.t, y, k)
    # each expert ran once, on exactly its own samples
    assert [t.calls for t in teachers] == [[int((k == 0).sum())], [int((k == 1).sum())]]
    with torch.no_grad():  # by hand, one sample at a time; the dropped ones with the null label
        one = [experts[int(k[i])](point.x_t[i : i + 1], point.t[i : i + 1], y[i : i + 1]) for i in range(8)]
    by_hand = torch.cat(one)
    assert torch.allclose(v, by_hand, atol=1e-5)
    # a dropped-label sample's target is its expert's unconditional velocity, not its conditional one
    i = 3  # cluster 0, null label
    with torch.no_grad():
        cond = experts[0](point.x_t[i : i + 1], point.t[i : i + 1], torch.tensor([0]))
    assert not torch.allclose(v[i : i + 1], cond, atol=1e-4)
    # an expert with no sample in the batch does not run
    only_one = teacher_velocity(teachers, point.x_t, point.t, y, torch.ones(8, dtype=torch.long))
    assert teachers[0].calls == [4] and teachers[1].calls == [4, 8]
    assert torch.allclose(only_one, experts[1](point.x_t, point.t, y), atol=1e-5)


def test_data_weight_mixes_the_data_velocity_into_the_target():
    experts = [_randomised(0), _randomised(1)]
    point, y, k = _fixed_batch()
    v = teacher_velocity(experts, point.x_t, point.t, y, k)
    assert torch.equal(distill_target(experts, point, y, k, 0.0), v)
    assert torch.allclose(distill_target(experts, point, y, k, 0.25), 0.25 * point.target + 0.75 * v, atol=1e-6)

    class Refuses(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("data_weight=1 runs no teacher")

    assert torch.equal(distill_target([Refuses(), Refuses()], point, y, k, 1.0), point.target)


def test_the_training_step_gives_teachers_the_labels_the_student_sees():
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(y.clone())
            return torch.zeros_like(x)

    module = DistillModule(
        model=dict(size="DiT-N/2", image_size=8, in_channels=1, num_classes=NUM_CLASSES),
        flow={},
        teachers=[Recording(), Recording()],
        label_dropout=1.0,  # every label dropped: the teachers must get the null label
    )
    x = torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        module.training_step((x, torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 1, 1, 0, 1])), 0)
    assert [s.tolist() for s in seen] == [[NUM_CLASSES] * 3, [NUM_CLASSES] * 3]
    assert "_teachers" not in dict(module.named_children()) and not any("teacher" in n for n in module.state_dict())


def test_the_student_learns_the_teachers_velocity_on_a_fixed_batch():
    experts = [_randomised(0), _randomised(1)]
    point, y, k = _fixed_batch()
    target = distill_target(experts, point, y, k)
    torch.manual_seed(0)
    student = DiT(size="DiT-N/2", image_size=8, in_channels=1, num_classes=NUM_CLASSES)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (student(point.x_t, point.t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# ---- faults ------------------------------------------------------------------------------------
def test_a_killed_distillation_resumes_from_its_last_checkpoint(distilled, tmp_path, monkeypatch):
    rd = copy_run(distilled[0], tmp_path / "run")
    shutil.rmtree(rd.distilled)
    cfg = compose_cfg(rd.root, "distill.steps=6", "distill.ckpt_every=2")
    original = DistillModule.training_step

    def crash_at_step_5(self, batch, idx):
        if self.global_step == 5:
            raise KeyboardInterrupt  # as a preemption would, without saving
        return original(self, batch, idx)

    monkeypatch.setattr(DistillModule, "training_step", crash_at_step_5)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        distill.run(cfg)
    assert not rd.distilled_record.exists() and not rd.distilled_weights.exists()
    assert torch.load(rd.distilled / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    monkeypatch.setattr(DistillModule, "training_step", original)
    record = distill.run(cfg)
    assert record["steps"] == 6 and record["resumed_from"].endswith("last.ckpt") and record["attempts"] == 2
    assert record["samples_seen"] == 48 and record["teacher_flops"] == 48 * record["teacher_forward_flops_mean"]


def test_distill_needs_every_expert(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(20, 20), num_classes=NUM_CLASSES)
    train_expert.run(compose_cfg(rd.root, "expert.id=0"))
    with pytest.raises(FileNotFoundError, match=r"experts \[1\] have no expert.pt.*train-expert"):
        distill.run(compose_cfg(rd.root))
    assert not rd.distilled.exists()


# ---- sampling with the student -----------------------------------------------------------------
def sample_cfg(rd: RunDir, *overrides):
    return compose_cfg(
        rd.root, "sample.device=cpu", "sample.steps=2", "sample.per_class=2", "sample.num_samples=3", *overrides
    )


def test_sample_model_distilled_samples_with_the_student_alone(distilled, tmp_path):
    rd = copy_run(distilled[0], tmp_path / "run")  # no router: the student needs none
    record = sample_stage.run(sample_cfg(rd, "sample.model=distilled"))
    images = np.load(rd.samples / "samples.npz")["images"]
    assert images.shape == (NUM_CLASSES * 2 + 3, 8, 8) and images.dtype == np.uint8
    assert record["model"] == "distilled" and record["settings"]["model"] == "distilled"
    assert record["experts_used"] == [] and record["distilled_from"] == distilled[1]["distilled_from"]
    assert not (rd.samples / "usage.json").exists() and (rd.samples / "grid.png").exists()
    # the ensemble's settings are today's: no `model` key, so samples made before the option still count
    assert "model" not in requested_settings(sample_cfg(rd).sample)


def test_a_missing_or_stale_student_is_refused(distilled, tmp_path):
    rd = copy_run(distilled[0], tmp_path / "run")
    weights = rd.distilled_weights.read_bytes()
    rd.distilled_weights.unlink()
    with pytest.raises(FileNotFoundError, match="no distilled model.*run `ddm distill`"):
        sample_stage.run(sample_cfg(rd, "sample.model=distilled"))
    rd.distilled_weights.write_bytes(weights)

    train_expert.run(compose_cfg(rd.root, "expert.id=1", "expert.steps=4", "redo=true"))  # expert 1 retrained
    with pytest.raises(ValueError, match=r"other experts.*experts \[1\].*ddm distill redo=true"):
        sample_stage.run(sample_cfg(rd, "sample.model=distilled"))
    with pytest.raises(ValueError, match="ddm distill redo=true"):
        distill.run(compose_cfg(rd.root))  # a finished student of other experts is not passed off as current
    with pytest.raises(ValueError, match="sample.model='mixture' is not one of ensemble, distilled"):
        sample_stage.run(sample_cfg(rd, "sample.model=mixture"))


# ---- FLOPs -------------------------------------------------------------------------------------
def test_flops_of_the_student_and_its_teachers_follow_the_formula(distilled, tmp_path):
    rd = copy_run(distilled[0], tmp_path / "run")
    shutil.rmtree(rd.distilled)
    record = distill.run(compose_cfg(rd.root, "distill.size=DiT-N/4", "distill.steps=2", "redo=true"))
    student, _ = load_expert(rd.distilled_weights)
    teacher, _ = load_expert(rd.expert_weights(0))
    assert record["size"] == "DiT-N/4" and record["experts_size"] == "DiT-N/2"
    f_student, f_teacher = (count_flops(n, *example_inputs(n)) for n in (student, teacher))
    assert f_student < f_teacher  # a smaller student: the two counts are told apart
    seen = 2 * 8
    assert record["forward_flops_per_sample"] == f_student
    assert record["train_flops"] == 3 * f_student * seen  # the student: forward + backward
    assert record["teacher_forward_flops_per_sample"] == {"expert-00": f_teacher, "expert-01": f_teacher}
    assert record["teacher_flops"] == f_teacher * seen  # one teacher forward per sample
    assert record["distill_flops"] == 3 * f_student * seen + f_teacher * seen
    experts = sum(read_json(rd.expert_record(k))["train_flops"] for k in range(2))
    assert record["experts_train_flops"] == experts and record["total_flops"] == experts + record["distill_flops"]
    # what the evaluate stage reports as the distilled model's training FLOPs
    jobs = {f"expert-{k:02d}": dict(flops=read_json(rd.expert_record(k))["train_flops"]) for k in range(2)}
    train = distilled_training(dict(jobs={**jobs, "router": dict(flops=123)}), record)
    assert train == dict(
        experts=experts,
        student=record["train_flops"],
        teacher_forward=record["teacher_flops"],
        total=record["total_flops"],
        samples_seen=seen,
    )
    json.dumps(record)  # the record is plain JSON


# ---- the paper table ---------------------------------------------------------------------------
def test_the_paper_table_can_have_a_distilled_row(make_cfg, tmp_path):
    from ddm.experiments.paper_table import make_plan
    from ddm.experiments.paper_table.results import rows_of

    plan = make_plan(make_cfg("experiment=paper_tiny", "paper.strategies=[top1,distilled]", "paper.estimate=false"))
    by = {(r.config.name, r.budget): r for r in plan.runs}
    largest = max(b for _, b in by)
    assert by[("clustered-k2", largest)].rows == ("top1", "distilled")
    assert by[("monolith", largest)].rows == ("single",) and "distilled" not in by[("clustered-k2", 6)].rows

    quality = dict(fd=1.0, precision=0.5, recall=0.5, classifier_accuracy=0.9, num_generated=10)
    jobs = {"expert-00": dict(flops=10), "expert-01": dict(flops=20), "router": dict(flops=5)}
    metrics = dict(
        feature_spaces={"classifier:abc": dict(strategies=dict(top1=quality, distilled=dict(quality, fd=2.0)))},
        fm_loss=dict(models={"ensemble-top1": dict(mean=0.3), "distilled": dict(mean=0.4)}),
        flops=dict(
            train=dict(jobs=jobs, distilled=dict(experts=30, student=6, teacher_forward=2, total=38)),
            sampling=dict(top1=dict(per_image=100), distilled=dict(per_image=80)),
        ),
    )
    top1, student = rows_of(by[("clustered-k2", largest)], metrics, {}, tmp_path)
    assert (top1["train_flops"], top1["fd"], top1["sampling_flops_per_image"]) == (35, 1.0, 100)
    assert (student["strategy"], student["fd"], student["fm_loss"], student["sampling_flops_per_image"]) == (
        "distilled",
        2.0,
        0.4,
        80,
    )
    # the experts' training, then the student's and its teachers' forwards; no router
    assert (student["train_flops"], student["train_flops_distill"], student["train_flops_router"]) == (38, 8, 0)
