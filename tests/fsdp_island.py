"""Deterministic expert training on an FSDP island of CPU processes, and its unsharded reference.

``python -m tests.fsdp_island OUT NODES DEVICES SHARDING RUNS`` is one rank of an
island; ``start_island`` starts all of them the way torchrun or srun would
(``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` in the
environment), so each process can run several Trainers one after the other.
Every rank trains on its own slice of one fixed global batch with noise that is
a function of the sample (``FixedNoiseExpert``), so the island's run and a
single process on the whole batch take the same steps (gradients clipped by
their global norm, which under sharding spans every rank's shards).

What each rank runs, through ``build_trainer`` as a job does:

- ``straight``: ``STEPS`` steps from the start, checkpointing every 2;
- ``resumed`` (when RUNS is ``both``): 2 steps, then a new module and Trainer
  resume from the newest checkpoint to ``STEPS``, with activation checkpointing on;
- ``crossed`` (when RUNS is ``both`` and ``OUT/crossed`` holds the checkpoint of
  2 unsharded steps): resume from it, sharded, to ``STEPS``.

Rank 0 writes ``OUT/result.pt``: the gathered (full) EMA and network weights of
both, the FSDP units, the parameters' shards, and how often block 0 ran.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddm.settings import Island, build
from ddm.train.fsdp import full_copy, sharding_units
from ddm.train.trainer import build_trainer, last_checkpoint
from tests.test_optimizer_steps import FixedNoiseExpert

STEPS, BATCH = 4, 8
GRAD_CLIP = 0.5  # below the gradient norm of these steps (about 1.3 at the first): the clipping acts on each
MODEL = dict(size="DiT-N/2", image_size=8, in_channels=1, num_classes=3)


class MomentumExpert(FixedNoiseExpert):
    """SGD with momentum: an optimizer state that a resume must restore (and that is linear in the gradients)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every step trains on (so a resume at any step sees what the straight run saw)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(3, (BATCH,), generator=g)


def island_config(
    strategy: str,
    nodes: int,
    devices: int,
    sharding: str = "full",
    checkpointing: bool = False,
    precision: str = "32-true",
) -> Island:
    return build(
        Island,
        dict(
            accelerator="cpu",
            devices=devices,
            num_nodes=nodes,
            strategy=strategy,
            sharding=sharding,
            activation_checkpointing=checkpointing,
            precision=precision,
            threads=1,
            accumulate_grad_batches=1,
        ),
        "island",
    )


def train(
    folder: Path, island, rank: int, world: int, steps: int, resume: bool = False, callbacks=(), grad_clip=GRAD_CLIP
) -> dict:
    """Fit a fresh expert (seed 0) on this rank's slice of the global batch; gather what the tests compare."""
    torch.manual_seed(0)
    module = MomentumExpert(
        model=MODEL, flow=dict(schedule="linear"), warmup_steps=1, total_steps=STEPS, label_dropout=0.0, ema_decay=0.9
    )
    init = _cpu_state(module.net)
    # a pre-hook: a recomputation in the backward pass stops early, before the block's end
    forwards = []
    module.net.trunk.blocks[0].register_forward_pre_hook(lambda *_: forwards.append(1))
    x, y = global_batch()
    per = BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    loader = DataLoader(TensorDataset(x[mine], y[mine]), batch_size=per, shuffle=False)
    trainer = build_trainer(island, folder, steps, ckpt_every=2, logger=False, callbacks=callbacks, grad_clip=grad_clip)
    ckpt = last_checkpoint(folder) if resume else None
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(ckpt) if ckpt else None)
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    info = dict(
        steps=int(trainer.global_step),
        resumed_from=str(ckpt) if ckpt else None,
        block0_forwards=len(forwards),
        net_units=sharding_units(module.net),
        ema_units=sharding_units(module.ema),
        ema_in_optimizer=any(id(p) in in_optimizer for p in module.ema.parameters()),
        ema_requires_grad=any(p.requires_grad for p in module.ema.parameters()),
        shards={
            name: (type(p).__name__, str(getattr(p, "placements", None)), tuple(p.shape), _local_numel(p))
            for name, p in [*module.net.named_parameters(prefix="net"), *module.ema.named_parameters(prefix="ema")]
        },
    )
    ema, net = full_copy(module.ema), full_copy(module.net)  # collectives: every rank takes part
    if ema is not None:
        info.update(ema=_cpu_state(ema), net=_cpu_state(net), init=init, ema_class=type(ema).__name__)
    return info


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _cpu_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def reference(folder: Path, grad_clip=GRAD_CLIP) -> dict:
    """The same training in this process, unsharded, on the whole global batch."""
    return train(folder, island_config("auto", 1, 1), rank=0, world=1, steps=STEPS, grad_clip=grad_clip)


def main(out: str, nodes: int, devices: int, sharding: str, runs: str) -> None:
    out_dir = Path(out)
    rank = int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])
    world = nodes * devices
    straight = train(out_dir / "straight", island_config("fsdp", nodes, devices, sharding), rank, world, STEPS)
    resumed = None
    if runs == "both":
        checkpointed = island_config("fsdp", nodes, devices, sharding, checkpointing=True)
        train(out_dir / "resumed", checkpointed, rank, world, 2)
        resumed = train(out_dir / "resumed", checkpointed, rank, world, STEPS, resume=True)
    crossed = None
    if runs == "both" and (out_dir / "crossed").is_dir():
        crossed = train(out_dir / "crossed", island_config("fsdp", nodes, devices, sharding), rank, world, STEPS, True)
    if rank == 0:
        torch.save(dict(straight=straight, resumed=resumed, crossed=crossed), out_dir / "result.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_island(out: Path, nodes: int, devices: int, sharding: str, runs: str = "both", timeout: float = 400) -> list:
    """Run every rank of a ``nodes`` x ``devices`` island on this machine; return the finished processes."""
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    port = _free_port()
    procs = []
    for rank in range(nodes * devices):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(nodes * devices),
            NODE_RANK=str(rank // devices),
            LOCAL_RANK=str(rank % devices),
        )
        env.pop("DDM_STAGE", None)
        cmd = [sys.executable, "-m", "tests.fsdp_island", str(out), str(nodes), str(devices), sharding, runs]
        log = open(out / f"rank-{rank}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # a rank that hangs (a collective the others never joined) is stopped, and so are the rest
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [proc for proc, _ in procs]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
