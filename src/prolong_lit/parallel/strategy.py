"""FSDP2Strategy: Lightning's ModelParallelStrategy with an all-data-parallel ("replicate", "shard") device mesh.

Lightning's ModelParallelStrategy builds a ("data_parallel", "tensor_parallel") mesh whose "auto" sizes put all
the devices of a node into tensor parallelism (which prolong_lit does not implement). This subclass keeps all of
its machinery (the launcher, FSDP2 set-up, distributed checkpoints that resume on any number of ranks) and builds
the mesh LongContextLM shards over (`prolong_lit.parallel.fsdp.fsdp_mesh`):

    replicate_size: 1        (1, W): FSDP, every parameter sharded over all W ranks
    replicate_size: nodes    (N, W / N): HSDP, sharded within each node, replicated across the N nodes
    replicate_size: R        (R, W / R): HSDP with R replicas of W / R ranks each

Every rank reads different data either way (the data-parallel world is the whole world).

    trainer:
      strategy:
        class_path: prolong_lit.parallel.strategy.FSDP2Strategy
        init_args: {replicate_size: nodes}
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from typing_extensions import override

from prolong_lit.parallel.fsdp import REPLICATE_DIM, SHARD_DIM

log = logging.getLogger(__name__)


def build_mesh(device_type: str, world_size: int, replicate_size: int) -> DeviceMesh:
    """The (replicate_size, world_size / replicate_size) ("replicate", "shard") mesh over all ranks."""
    if replicate_size < 1 or world_size % replicate_size:
        raise ValueError(
            f"trainer.strategy.init_args.replicate_size: {replicate_size} does not divide the world size "
            f"{world_size} (trainer.num_nodes x trainer.devices)"
        )
    shape = (replicate_size, world_size // replicate_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 / HSDP data parallelism for LongContextLM (which shards itself in `configure_model`).

    Args:
        replicate_size: replicas of the model: 1 shards every parameter over all ranks (FSDP); `nodes` makes one
            replica per node, sharded within the node (HSDP); an integer R makes R replicas of world/R ranks.
        save_distributed_checkpoint: each rank saves its shards (a directory, torch.distributed.checkpoint) and
            resumes on any number of ranks; False gathers one full checkpoint file on rank 0.
        process_group_backend: torch.distributed backend; None picks nccl on CUDA, gloo on CPU.
        timeout: timeout of collective operations.
    """

    def __init__(
        self,
        replicate_size: int | Literal["nodes"] = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",  # unused: setup_environment builds the mesh below
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if replicate_size != "nodes" and (isinstance(replicate_size, bool) or not isinstance(replicate_size, int)
                                          or replicate_size < 1):
            raise ValueError(
                f"trainer.strategy.init_args.replicate_size: {replicate_size!r} is neither a positive integer nor "
                "'nodes'"
            )
        self.replicate_size = replicate_size

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy.setup_environment, with our mesh instead of ("data_parallel", "tensor_parallel")
        self._setup_distributed()
        replicas = self.num_nodes if self.replicate_size == "nodes" else self.replicate_size
        self._device_mesh = build_mesh(self.root_device.type, self.world_size, replicas)
        log.info("device mesh %s %s", dict(zip(self._device_mesh.mesh_dim_names, self._device_mesh.shape)),
                 "(HSDP)" if replicas > 1 else "(FSDP)")
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh  # what configure_model shards over

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}
