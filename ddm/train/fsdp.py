"""FSDP inside one island: every network sharded per DiT block over the island's devices.

``island.strategy: fsdp`` gives the Trainer an ``FSDPIslandStrategy``. Its
``shard`` puts each ``DiTBlock`` of a network in its own FSDP unit and the rest
of the network (patch and condition embeddings, final layer) in one more, so a
rank holds a 1/N slice of every parameter, gradient and optimizer state, and
gathers one block's full weights only while that block runs.

It is built on FSDP2 (``torch.distributed.fsdp.fully_shard``, through
Lightning's ``ModelParallelStrategy``), not on Lightning's ``FSDPStrategy``
(FSDP1), for three reasons:

- FSDP2 shards each parameter on its first dimension as a ``DTensor``, over one
  mesh. The EMA copy of a network, sharded the same way, then holds on every
  rank exactly the slice of each parameter that the live network holds there:
  the EMA update (``ddm.train.ema``) is a local lerp of matching slices, with no
  communication, and equals the update of the unsharded EMA. FSDP1 flattens a
  unit's parameters into one buffer and shards that, so a parameter's slice
  depends on what else is in its unit.
- gradient-norm clipping works on the sharded gradients (Lightning refuses
  ``gradient_clip_algorithm="norm"`` under FSDP1);
- it runs on CPU with gloo, so this code is tested where there is no GPU
  (Lightning's FSDPStrategy refuses the CPU accelerator: "The strategy `fsdp`
  requires a GPU accelerator"; FSDP1 itself, given no device, stops with "FSDP
  needs a non-CPU accelerator device").

Sharding ``full`` spreads each parameter over every device of the island;
``hybrid`` shards within each node and keeps one replica per node, so the
per-block gathers stay on a node's fast links and only the gradient reduction
crosses nodes (each GPU then holds 1/devices-per-node of the state instead of
1/all-devices).

Under ``precision: bf16-mixed`` on GPUs each unit gathers its parameters in bf16 and
reduces its gradients in fp32 (``mixed_precision_policy``): half the bytes of
every all-gather and the matmuls' own dtype under autocast, while the sharded
master weights, the optimizer and the EMA stay fp32 and gradient sums keep fp32's
precision. Forward inputs are not cast: the timestep and the residual stream stay
fp32 as under autocast alone (bf16 has 8 bits of mantissa, too few for t near 1).

Checkpoints hold the full, unsharded state (gathered on global rank 0, written
by it as one file through ``AtomicCheckpointIO``): the same keys as a DDP or
single-device checkpoint, so a job resumes on an island of any shape, and the
resume and status code read one kind of file. For a DiT-XL/2 (about 0.9B
parameters: weights, EMA and AdamW's two moments, all float32) rank 0 holds
about 14 GB of host memory while it writes one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ddm.errors import BadInput
from ddm.models.dit import DiTBlock
from ddm.settings import Island

SHARDINGS = ("full", "hybrid")
# The modules that become their own FSDP unit: the repeated transformer blocks hold nearly all parameters.
BLOCK_TYPES = (DiTBlock,)


def mixed_precision_policy(precision: str, device_type: str = "cuda") -> MixedPrecisionPolicy:
    """The FSDP2 policy for an island's Lightning ``precision`` on devices of ``device_type``.

    ``bf16-mixed`` on CUDA: parameters all-gathered in bf16, gradients reduce-scattered in
    fp32, forward inputs left as they are. Any other precision: FSDP's default
    (parameters and gradients in their own dtype: fp32 for ``32-true``, bf16 for
    ``bf16-true``). ``16-mixed`` keeps the default too: its loss scaler expects
    fp32 gradients from the reduction, and autocast casts the weights for each matmul.
    CPU islands (gloo: tests, laptops) keep the default as well: CPU autocast does not
    cast a LayerNorm's bf16 weight to fp32 as CUDA autocast does, so the router's head
    would meet an fp32 input with a bf16 weight.
    """
    if str(precision) == "bf16-mixed" and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def shard_network(net: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard ``net`` in place over ``mesh``: one FSDP unit per DiT block, one for the rest of it.

    A 1-D mesh shards over all its ranks; a 2-D mesh (replicate, shard) shards
    along its second dimension and replicates along its first. Every unit gets
    ``mp_policy`` (default: gather and reduce in the parameters' dtype). Sharding a
    network twice leaves it as it is (Lightning may call ``configure_model`` again).
    """
    if isinstance(net, FSDPModule):
        return net
    policy = mp_policy or MixedPrecisionPolicy()
    blocks = [m for m in net.modules() if isinstance(m, BLOCK_TYPES)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def unit_policies(net: nn.Module) -> dict[str, MixedPrecisionPolicy]:
    """Each FSDP unit's mixed-precision policy, by unit name (``""`` is ``net`` itself)."""
    return {name: m._get_fsdp_state()._mp_policy for name, m in net.named_modules() if isinstance(m, FSDPModule)}


def is_sharded(net: nn.Module) -> bool:
    return isinstance(net, FSDPModule)


def sharding_units(net: nn.Module) -> list[str]:
    """The names of the FSDP units inside ``net`` (``""`` is ``net`` itself)."""
    return [name for name, m in net.named_modules() if isinstance(m, FSDPModule)]


def unsharded_class(net: nn.Module) -> type[nn.Module]:
    """The class a network had before ``fully_shard`` (which swaps it for an ``FSDP<name>`` subclass)."""
    return next(c for c in type(net).__mro__ if not issubclass(c, FSDPModule))


def full_copy(net: nn.Module) -> nn.Module | None:
    """An unsharded copy of ``net`` with its full weights, on CPU, on global rank 0; None on other ranks.

    Under sharding every rank of the island must call this: gathering the shards
    is a collective (rank 0 alone would wait forever). The copy is built from
    ``net.config()``, so it is a plain network that samples without any process
    group. An unsharded ``net`` is returned as it is.
    """
    if not is_sharded(net):
        return net
    # cpu_offload: the full tensors go to rank 0's host memory, one at a time; the other ranks get none
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    copy = unsharded_class(net)(**net.config())
    copy.load_state_dict(state, strict=True)
    return copy.eval()


class FSDPIslandStrategy(ModelParallelStrategy):
    """Data parallelism with sharded state over one island's devices (no tensor parallelism).

    The LightningModule asks for its networks to be sharded in ``configure_model``
    (``ddm.train.modules``); checkpoints are full state dicts in one file.
    """

    def __init__(self, num_nodes: int, devices_per_node: int, sharding: str = "full", precision: str = "32-true"):
        if sharding not in SHARDINGS:
            raise BadInput(f"island.sharding={sharding!r} is not one of {', '.join(SHARDINGS)}: pick one")
        # Lightning's mesh: every rank data-parallel, none tensor-parallel; its dims name the roles it plays.
        super().__init__(
            data_parallel_size=num_nodes * devices_per_node,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
        )
        self.sharding = sharding
        self.precision_name = str(precision)
        self._shard_mesh: DeviceMesh | None = None

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.sharding == "hybrid":
            shape = (self.num_nodes, self.num_processes)
            self._shard_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))
        else:
            self._shard_mesh = self.device_mesh["data_parallel"]

    @property
    def shard_mesh(self) -> DeviceMesh:
        """The mesh the networks are sharded over: 1-D (full), or (nodes, devices per node) (hybrid)."""
        if self._shard_mesh is None:
            raise RuntimeError("the sharding mesh exists once the island's processes have started")
        return self._shard_mesh

    def shard(self, net: nn.Module) -> nn.Module:
        return shard_network(net, self.shard_mesh, self.policy_for(self.root_device.type))

    def policy_for(self, device_type: str) -> MixedPrecisionPolicy:
        """The mixed-precision policy of every unit this island shards, on devices of ``device_type``."""
        return mixed_precision_policy(self.precision_name, device_type)


def island_strategy(island: Island):
    """The Trainer's ``strategy`` for an island: an ``FSDPIslandStrategy`` for ``fsdp``, else the name as given."""
    name = str(island.strategy)
    if name.startswith("fsdp") and name != "fsdp":
        raise BadInput(
            f"island.strategy={name!r}: ddm shards experts with its own FSDP strategy; use island.strategy=fsdp "
            f"(island.sharding=full|hybrid, island.activation_checkpointing=true|false)"
        )
    if name != "fsdp":
        return island.strategy
    devices, nodes = island.devices, island.num_nodes
    if not (isinstance(devices, int) and isinstance(nodes, int) and devices > 0 and nodes > 0):
        raise BadInput(
            f"island.devices={devices!r}, island.num_nodes={nodes!r}: an fsdp island shards over a fixed "
            f"number of devices; give both as positive integers (e.g. island.devices=8 island.num_nodes=2)"
        )
    return FSDPIslandStrategy(
        nodes,
        devices,
        sharding=str(island.sharding),
        precision=str(island.precision),
    )
