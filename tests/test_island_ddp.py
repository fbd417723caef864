"""Data parallelism inside one island: two CPU ranks (gloo) train one expert, launched as a user would."""

from __future__ import annotations

from ddm.io import read_json
from tests.fabricate import make_partitions, train_expert_on_two_ranks


def test_two_rank_ddp_island_trains_one_expert(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    out = train_expert_on_two_ranks(rd, tmp_path, "expert.id=1", "expert.steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    record = read_json(rd.expert_record(1))
    hw = record["hardware"]
    # The global batch of 8 is split over the island's 2 ranks; the run ends at exactly 4 steps.
    assert (hw["world_size"], hw["per_device_batch"], record["steps"], record["samples_seen"]) == (2, 4, 4, 32)
    assert hw["strategy"] == "DDPStrategy"
    assert not rd.expert(0).exists()  # the other expert's folder is untouched
