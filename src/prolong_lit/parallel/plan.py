"""The parallel plan: how one rank's model and data are laid out over the devices of a run.

One owner: the strategy (`prolong_lit.parallel.strategy.FSDP2Strategy`) is configured with the parallel settings
and builds the plan from its device mesh once the process group exists; the LightningModule and the DataModule
ask the trainer's strategy for it (`plan_of`). Under any other strategy the plan is the plain one: every rank a
data-parallel rank, no sequence parallelism, no activation checkpointing, and FSDP2 over the data-parallel
dimension of Lightning's own ModelParallelStrategy mesh when that is the strategy.

The mesh (`build_world_mesh`) has the dimensions ("replicate", "shard") when sequence parallelism is off, and
("replicate", "dp_shard", "sp") with "dp_shard" x "sp" flattened into "shard" when it is on: FSDP2 always shards
over "shard" (every rank of a replica, sequence-parallel ranks included, holds a different slice of the weights),
and a sequence-parallel group is the "sp" dimension, P consecutive ranks (one node when P <= GPUs per node).
The ranks of one group read the same samples, so the data-parallel rank is global_rank // P.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from prolong_lit.errors import ConfigError
from prolong_lit.parallel.fsdp import ShardingConfig
from prolong_lit.parallel.sequence import SP_SETTING, SequenceParallel

log = logging.getLogger(__name__)

REPLICATE_DIM, SHARD_DIM = "replicate", "shard"  # FSDP2Strategy's mesh: HSDP replicas x FSDP shards
DP_SHARD_DIM, SP_DIM = "dp_shard", "sp"  # with sequence parallelism, SHARD_DIM = DP_SHARD_DIM x SP_DIM flattened
LIGHTNING_DP_DIM, LIGHTNING_TP_DIM = "data_parallel", "tensor_parallel"  # Lightning's ModelParallelStrategy's mesh


DEFAULT_SHARDING = ShardingConfig()  # FSDP2 in fp32 with fp32 gradient reduction


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """This rank's layout: what the module shards and recomputes, what the DataModule reads.

    Args:
        global_rank: this process's rank in the world.
        world_size: all ranks of the run.
        sequence_parallel: this rank's sequence-parallel group; None when every rank holds whole rows.
        shard_mesh: the mesh FSDP2 shards the model over (1-D: FSDP; 2-D ("replicate", "shard"): HSDP); None
            leaves the model unsharded.
        sharding: how FSDP2 shards and computes (mixed precision, offload, resharding); used with `shard_mesh`.
        activation_checkpointing: what every block recomputes in backward: False (nothing), "full" (its whole
            forward) or "selective" (all but the attention kernels); FSDP2Strategy normalises true to "full".
    """

    global_rank: int = 0
    world_size: int = 1
    sequence_parallel: SequenceParallel | None = None
    shard_mesh: DeviceMesh | None = None
    sharding: ShardingConfig = DEFAULT_SHARDING
    activation_checkpointing: bool | str = False

    @property
    def sequence_parallel_size(self) -> int:
        """P, the ranks that share every row (1: no sequence parallelism)."""
        return 1 if self.sequence_parallel is None else self.sequence_parallel.size

    @property
    def data_parallel_size(self) -> int:
        """The ranks that read different samples: world / P."""
        return self.world_size // self.sequence_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among them: the ranks of a sequence-parallel group are consecutive."""
        return self.global_rank // self.sequence_parallel_size


def check_sequence_parallel_size(size: Any, world_size: int | None = None) -> None:
    """A clear error for a P that is not a positive integer or does not divide the world."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{SP_SETTING} must be an integer >= 1, got {size!r}")
    if world_size is not None and world_size % size:
        raise ConfigError(
            f"{SP_SETTING} ({size}) must divide the number of ranks ({world_size} = trainer.devices x "
            "trainer.num_nodes)"
        )


def build_world_mesh(device_type: str, world_size: int, replicate_size: int, sequence_parallel_size: int = 1
                     ) -> DeviceMesh:
    """The run's one device mesh (see the module docstring); its "shard" dimension spans replica's ranks."""
    if replicate_size < 1 or world_size % replicate_size:
        raise ConfigError(
            f"trainer.strategy.init_args.replicate_size: {replicate_size} does not divide the world size "
            f"{world_size} (trainer.num_nodes x trainer.devices)"
        )
    check_sequence_parallel_size(sequence_parallel_size, world_size // replicate_size)
    shard = world_size // replicate_size
    if sequence_parallel_size == 1:
        return init_device_mesh(device_type, (replicate_size, shard), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))
    dims = (replicate_size, shard // sequence_parallel_size, sequence_parallel_size)
    mesh = init_device_mesh(device_type, dims, mesh_dim_names=(REPLICATE_DIM, DP_SHARD_DIM, SP_DIM))
    # FSDP2 shards over dp_shard x sp together (torchtitan's `_flatten`, the only way to name a merged dimension)
    mesh[DP_SHARD_DIM, SP_DIM]._flatten(SHARD_DIM)
    return mesh


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: ("replicate", "shard") for HSDP (more than one replica), else "shard"."""
    if mesh[REPLICATE_DIM].size() > 1:
        return mesh[REPLICATE_DIM, SHARD_DIM]
    return mesh[SHARD_DIM]


def sequence_parallel_of(mesh: DeviceMesh) -> SequenceParallel | None:
    """This rank's sequence-parallel group: the "sp" dimension of the world mesh (None without one)."""
    if SP_DIM not in (mesh.mesh_dim_names or ()):
        return None
    sp_mesh = mesh[SP_DIM]
    return SequenceParallel(sp_mesh.get_group(), sp_mesh.get_local_rank(), sp_mesh.size())


def build_plan(
    device_type: str,
    global_rank: int,
    world_size: int,
    replicate_size: int = 1,
    sequence_parallel_size: int = 1,
    sharding: ShardingConfig | None = DEFAULT_SHARDING,
    activation_checkpointing: bool | str = False,
) -> ParallelPlan:
    """Build the world mesh and the plan read from it (collective: every rank calls it, after the process group
    exists). `sharding=None` keeps the model unsharded (sequence parallelism alone)."""
    mesh = build_world_mesh(device_type, world_size, replicate_size, sequence_parallel_size)
    plan = ParallelPlan(
        global_rank=global_rank,
        world_size=world_size,
        sequence_parallel=sequence_parallel_of(mesh),
        shard_mesh=None if sharding is None else fsdp_mesh(mesh),
        sharding=sharding or DEFAULT_SHARDING,
        activation_checkpointing=activation_checkpointing,
    )
    log.info("parallel plan on rank %d: mesh %s, data-parallel %d of %d, sequence-parallel size %d%s", global_rank,
             dict(zip(mesh.mesh_dim_names, mesh.shape)), plan.data_parallel_rank, plan.data_parallel_size,
             plan.sequence_parallel_size,
             f", activation checkpointing {activation_checkpointing}" if activation_checkpointing else "")
    return plan


def plan_of(strategy: Any) -> ParallelPlan:
    """The plan of a trainer's strategy: its own (FSDP2Strategy), else the plain plan of its world."""
    plan = getattr(strategy, "parallel_plan", None)
    if plan is not None:
        return plan
    from lightning.pytorch.strategies import ModelParallelStrategy

    sharded = isinstance(strategy, ModelParallelStrategy)
    return ParallelPlan(
        global_rank=strategy.global_rank,
        world_size=strategy.world_size,
        shard_mesh=lightning_data_parallel_mesh(strategy.device_mesh) if sharded else None,
    )


def lightning_data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The "data_parallel" dimension of Lightning's ModelParallelStrategy mesh, when it has no tensor parallelism
    (which prolong_lit does not implement; its 'auto' sizes put a node's devices into it)."""
    names = tuple(mesh.mesh_dim_names or ())
    tensor_parallel = mesh[LIGHTNING_TP_DIM].size() if LIGHTNING_TP_DIM in names else 1
    if LIGHTNING_DP_DIM not in names or tensor_parallel != 1:
        raise ConfigError(
            f"trainer.strategy: ModelParallelStrategy's mesh {names} puts {tensor_parallel} ranks into tensor "
            "parallelism, which prolong_lit does not implement (its 'auto' sizes do this on a single node); set "
            "data_parallel_size to the world size and tensor_parallel_size: 1, or use "
            "prolong_lit.parallel.strategy.FSDP2Strategy"
        )
    return mesh[LIGHTNING_DP_DIM]
