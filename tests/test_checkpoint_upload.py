"""``CheckpointUpload``: last.ckpt goes to the bucket in the background, frozen when the upload starts; a failed
upload stops training naming the URL; a signal sends the newest checkpoint before the job exits (against moto)."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from ddm.errors import Unusable
from ddm.store import ObjectStore
from ddm.store.mirror import INDEX, pull_folder
from ddm.train.checkpoint_upload import CheckpointUpload

JOB = "experts/expert-00"
FOLDER = f"{JOB}/checkpoints"


def save_checkpoint(path, step: int, fill: float) -> bytes:
    """A checkpoint a resume accepts, written as ddm's checkpoint IO does (a new file renamed onto the old)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ckpt = dict(global_step=step, state_dict={"w": torch.full((4096,), fill)}, loops={}, optimizer_states=[])
    torch.save(dict(ckpt, callbacks={}), tmp)
    os.replace(tmp, path)
    return path.read_bytes()


def trainer(step: int, max_steps: int = 100):
    return SimpleNamespace(is_global_zero=True, global_step=step, max_steps=max_steps)


class Gate:
    """Holds every ``put_file`` of ``store`` until ``release`` is set (20 s at most, then fails the upload)."""

    def __init__(self, store):
        self.started, self.release, self.calls = threading.Event(), threading.Event(), 0
        put_file = store.put_file

        def held(local, rel):
            self.calls += 1
            self.started.set()
            if not self.release.wait(20):
                raise TimeoutError("the test never released the upload")
            return put_file(local, rel)

        store.put_file = held


def uploaders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ddm-checkpoint-upload"]


def wait_idle(callback) -> None:
    deadline = time.monotonic() + 30
    while callback._thread is not None and callback._thread.is_alive():
        assert time.monotonic() < deadline, "the upload did not finish"
        time.sleep(0.02)


def in_bucket(store, tmp_path, name) -> tuple[bytes, int]:
    """last.ckpt as a job on a fresh node pulls it (checked against the index), and the index's step."""
    pull_folder(store, tmp_path / name, FOLDER)
    return (tmp_path / name / FOLDER / "last.ckpt").read_bytes(), store.read_json(f"{FOLDER}/{INDEX}")["step"]


@pytest.fixture
def job(s3_bucket, tmp_path):
    store = ObjectStore(f"{s3_bucket}/run")
    root = tmp_path / "run"
    return store, root, root / FOLDER / "last.ckpt"


def test_the_upload_runs_in_the_background_and_sends_the_checkpoint_as_it_was_when_it_started(job, tmp_path):
    store, root, last = job
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    first = save_checkpoint(last, 5, 1.0)
    gate = Gate(store)
    began = time.monotonic()
    callback.on_train_batch_end(trainer(7), None, None, None, 0)
    assert gate.started.wait(10), "no upload started"
    assert time.monotonic() - began < 5 and not gate.release.is_set()  # the step did not wait for the upload
    # a newer checkpoint while the upload is held, and a second due interval: no second upload
    second = save_checkpoint(last, 10, 2.0)
    callback.on_train_batch_end(trainer(12), None, None, None, 1)
    time.sleep(0.2)
    assert len(uploaders()) == 1 and gate.calls == 1
    assert (last.parent / ".upload" / "last.ckpt").read_bytes() == first
    gate.release.set()
    wait_idle(callback)
    assert in_bucket(store, tmp_path, "node-b") == (first, 5)  # the checkpoint's own step, not the trainer's
    assert not (last.parent / ".upload" / "last.ckpt").exists()
    # the next step after it finished takes the newer one; a finished fit waits for it and sends nothing more
    callback.on_train_batch_end(trainer(13), None, None, None, 2)
    callback.on_train_end(trainer(100), None)
    assert not uploaders() and gate.calls == 2 and callback.uploads == 2
    assert in_bucket(store, tmp_path, "node-c") == (second, 10)


def test_a_lightning_save_after_the_snapshot_leaves_the_snapshot_as_it_was(job, tmp_path):
    import lightning as L

    from ddm.train.checkpoint_io import AtomicCheckpointIO

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    store, root, last = job
    fit = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],  # as ddm's trainer saves
    )
    module = Tiny()
    fit.fit(module, torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4))
    fit.save_checkpoint(last)
    first = last.read_bytes()
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    gate = Gate(store)
    callback.on_train_batch_end(fit, module, None, None, 0)
    assert gate.started.wait(10)
    with torch.no_grad():
        module.layer.weight += 1.0
    fit.save_checkpoint(last)  # Lightning replaces last.ckpt while the upload holds its snapshot
    assert last.read_bytes() != first
    assert (last.parent / ".upload" / "last.ckpt").read_bytes() == first
    gate.release.set()
    wait_idle(callback)
    assert in_bucket(store, tmp_path, "node-b") == (first, 2)


def test_without_hard_links_the_upload_copies_the_checkpoint_as_it_was(job, tmp_path, monkeypatch):
    store, root, last = job

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    first = save_checkpoint(last, 5, 1.0)
    callback.on_train_batch_end(trainer(5), None, None, None, 0)
    save_checkpoint(last, 10, 2.0)  # before the thread has copied it: the open file keeps the old bytes
    wait_idle(callback)
    assert in_bucket(store, tmp_path, "node-b") == (first, 5)


@pytest.mark.parametrize("where", ["batch end", "train end"])
def test_a_failed_upload_stops_training_naming_the_url(s3_server, monkeypatch, tmp_path, where):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = ObjectStore("s3://no-such-bucket-for-ddm/run")  # a bucket that refuses every upload
    root = tmp_path / "run"
    save_checkpoint(root / FOLDER / "last.ckpt", 5, 1.0)
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    callback.on_train_batch_end(trainer(5), None, None, None, 0)
    wait_idle(callback)
    url = f"s3://no-such-bucket-for-ddm/run/{FOLDER}/last.ckpt"
    with pytest.raises(Unusable, match=f"uploading last.ckpt to {url} failed"):
        if where == "batch end":
            callback.on_train_batch_end(trainer(6), None, None, None, 1)
        else:
            callback.on_train_end(trainer(100), None)


def test_a_signal_stop_waits_for_the_upload_in_flight_then_sends_the_newest_checkpoint(job, tmp_path):
    store, root, last = job
    callback = CheckpointUpload(store, root, JOB, every_s=3600)
    callback._at -= 3600  # the interval has come round
    first = save_checkpoint(last, 5, 1.0)
    gate = Gate(store)
    callback.on_train_batch_end(trainer(5), None, None, None, 0)
    assert gate.started.wait(10)
    newest = save_checkpoint(last, 8, 3.0)  # the checkpoint the signal saved
    raised = []

    def end():
        try:
            callback.on_train_end(trainer(8), None)
        except Exception as exc:
            raised.append(exc)

    ending = threading.Thread(target=end)
    ending.start()
    ending.join(0.5)
    # it waits for the upload in flight: that upload's snapshot is untouched and no second upload began
    assert ending.is_alive() and gate.calls == 1
    assert (last.parent / ".upload" / "last.ckpt").read_bytes() == first
    gate.release.set()
    ending.join(30)
    assert not ending.is_alive() and not raised and not uploaders() and gate.calls == 2
    assert in_bucket(store, tmp_path, "node-b") == (newest, 8)


def test_a_failing_job_waits_a_bounded_time_for_the_upload_in_flight(job, tmp_path, monkeypatch):
    import ddm.train.checkpoint_upload as module

    store, root, last = job
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    first = save_checkpoint(last, 5, 1.0)
    gate = Gate(store)
    callback.on_train_batch_end(trainer(5), None, None, None, 0)
    assert gate.started.wait(10)
    monkeypatch.setattr(module, "JOIN_ON_ERROR_S", 0.2)
    began = time.monotonic()
    callback.on_exception(trainer(6), None, RuntimeError("a step failed"))  # gives up after the bound
    assert time.monotonic() - began < 5 and len(uploaders()) == 1
    monkeypatch.setattr(module, "JOIN_ON_ERROR_S", 30.0)
    failing = threading.Thread(target=callback.on_exception, args=(trainer(6), None, RuntimeError("a step failed")))
    failing.start()
    failing.join(0.3)
    assert failing.is_alive(), "on_exception did not wait for the upload in flight"
    gate.release.set()
    failing.join(30)
    assert not uploaders() and in_bucket(store, tmp_path, "node-b") == (first, 5)


def test_each_upload_is_a_new_object_so_one_cut_off_before_its_index_leaves_the_previous_whole(job, tmp_path):
    """The index names the object that holds last.ckpt; a new upload goes to a new object, the index follows, the
    old object goes: an upload killed between its object and its index leaves the previous checkpoint whole."""
    store, root, last = job
    callback = CheckpointUpload(store, root, JOB, every_s=0)
    first = save_checkpoint(last, 5, 1.0)
    callback.on_train_batch_end(trainer(5), None, None, None, 0)
    wait_idle(callback)
    save_checkpoint(last, 10, 2.0)
    put_json = store.put_json
    store.put_json = lambda *a: (_ for _ in ()).throw(ConnectionError("killed before the index"))
    callback.on_train_batch_end(trainer(10), None, None, None, 1)
    wait_idle(callback)
    with pytest.raises(Unusable, match="killed before the index"):
        callback.on_train_batch_end(trainer(11), None, None, None, 2)
    assert in_bucket(store, tmp_path, "node-b") == (first, 5)  # the index and its object agree
    store.put_json = put_json
    third = save_checkpoint(last, 15, 3.0)
    callback.on_train_batch_end(trainer(15), None, None, None, 3)
    wait_idle(callback)
    assert in_bucket(store, tmp_path, "node-c") == (third, 15)
    held = [k.rsplit("/", 1)[1] for k in store.list(FOLDER) if k.endswith(".ckpt")]
    assert held == [store.read_json(f"{FOLDER}/{INDEX}")["files"]["last.ckpt"]["object"]]  # the cut-off one went
