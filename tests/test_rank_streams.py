"""Each rank of an island draws its own t, noise and data; a resumed job does not redraw what it drew before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ddm.data.loader import seeded_shuffle
from ddm.train.streams import RankStreams
from tests.fabricate import make_partitions, train_expert_on_two_ranks

# Loaded by every Python process started with this folder on PYTHONPATH, DDP ranks included: it records
# what FlowPath.noised draws (t, the first noise values) and a digest of the clean batch, per rank.
RECORDER = """
import json, os
import ddm.flow

_noised = ddm.flow.FlowPath.noised


def noised(self, x0, t=None, eps=None, generator=None, **kwargs):
    point = _noised(self, x0, t=t, eps=eps, generator=generator, **kwargs)
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(os.path.join(os.environ["DDM_DRAWS_DIR"], f"rank-{rank}.jsonl"), "a") as f:
        f.write(json.dumps(dict(t=point.t.tolist(), eps=point.eps.flatten()[:8].tolist(),
                                data=float(x0.double().sum()))) + "\\n")
    return point


ddm.flow.FlowPath.noised = noised
"""


def _draws_after(rank: int, step: int, seed: int = 5) -> torch.Tensor:
    RankStreams(seed).on_train_start(SimpleNamespace(global_rank=rank, global_step=step), None)
    return torch.rand(6)


def test_streams_differ_by_rank_and_by_resumed_step_and_repeat_for_the_same_ones():
    torch.testing.assert_close(_draws_after(0, 0), _draws_after(0, 0))
    assert not torch.equal(_draws_after(0, 0), _draws_after(1, 0))
    assert not torch.equal(_draws_after(0, 0), _draws_after(0, 40))  # a resume at step 40 draws afresh
    assert not torch.equal(_draws_after(0, 0, seed=5), _draws_after(0, 0, seed=6))


def test_the_shuffle_buffer_follows_its_seed():
    def order(seed):
        return list(seeded_shuffle(16, 8, seed)(iter(range(200))))

    assert order(3) == order(3) and order(3) != order(4) and sorted(order(3)) == list(range(200))


def test_two_ddp_ranks_draw_different_noise_on_different_data(tmp_path):
    rd = make_partitions(tmp_path / "run", sizes=(40, 40))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER)
    draws = tmp_path / "draws"
    draws.mkdir()
    root = Path(__file__).resolve().parent.parent
    env = dict(
        DDM_DRAWS_DIR=str(draws), PYTHONPATH=os.pathsep.join([str(hook), str(root), os.environ.get("PYTHONPATH", "")])
    )
    out = train_expert_on_two_ranks(rd, tmp_path, "expert.id=0", "expert.steps=3", "expert.label_dropout=0", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [[json.loads(line) for line in (draws / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # one draw per step on each rank
    for a, b in zip(*ranks):
        assert a["t"] != b["t"] and a["eps"] != b["eps"], "both ranks drew the same noise"
        assert a["data"] != b["data"], "both ranks trained on the same samples"
