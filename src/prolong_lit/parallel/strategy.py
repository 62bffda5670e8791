"""FSDP2Strategy: the one owner of a run's parallelism, on Lightning's ModelParallelStrategy.

It keeps all of ModelParallelStrategy's machinery (the launcher, FSDP2 set-up, distributed checkpoints that resume
on any number of ranks) and replaces its ("data_parallel", "tensor_parallel") mesh, whose "auto" sizes would put
all devices of a node into tensor parallelism (which prolong_lit does not implement), with the run's parallel
plan (`prolong_lit.parallel.plan`): every parallel setting is configured here, and the LightningModule and the
DataModule read the plan from the trainer's strategy.

    replicate_size: 1        (1, W): FSDP, every parameter sharded over all W ranks
    replicate_size: nodes    (N, W / N): HSDP, sharded within each node, replicated across the N nodes
    replicate_size: R        (R, W / R): HSDP with R replicas of W / R ranks each

    trainer:
      strategy:
        class_path: prolong_lit.parallel.strategy.FSDP2Strategy
        init_args: {replicate_size: nodes, sequence_parallel_size: 8, activation_checkpointing: true,
                    param_dtype: bfloat16}

Precision: `param_dtype` is the compute dtype (FSDP2 gathers the parameters in it; the sharded fp32 master
weights and AdamW states stay fp32), so `trainer.precision` stays at its default 32-true: a `*-mixed` or `*-true`
precision beside a `param_dtype` is refused, so that one setting says what the run computes in.
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from prolong_lit.checkpoint_io import save_distributed_atomically
from prolong_lit.errors import ConfigError
from prolong_lit.parallel.fsdp import STRATEGY_SETTING, ShardingConfig
from prolong_lit.parallel.plan import ParallelPlan, build_plan, check_sequence_parallel_size


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 / HSDP data parallelism, sequence parallelism, mixed precision and activation checkpointing.

    Args:
        replicate_size: replicas of the model: 1 shards every parameter over all ranks (FSDP); `nodes` makes one
            replica per node, sharded within the node (HSDP); an integer R makes R replicas of world/R ranks.
        sequence_parallel_size: P, the ranks that share every row (Ulysses all-to-all attention; ProLong: 8 at
            512K). Must divide the ranks of a replica, the row length and the attention heads; the ranks of a
            group read the same samples, so the data-parallel size is world / P.
        activation_checkpointing: what every decoder layer recomputes in backward (needed at 64K and beyond):
            true or `full` (its whole forward: least memory), `selective` (all but the attention kernels, whose
            outputs and log-sum-exp are kept: the attention forward runs once), false (nothing).
        param_dtype: the compute dtype: FSDP2 gathers the parameters in it for forward and backward (bfloat16:
            the recipe's mixed precision, fp32 master weights kept sharded); null computes in fp32.
        reduce_dtype: the dtype gradients are reduced in (float32); null: param_dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer states on the CPU.
        reshard_after_forward: free each decoder layer's gathered parameters after its forward (less memory, one
            more all-gather per layer in backward).
        save_distributed_checkpoint: each rank saves its shards (a directory, torch.distributed.checkpoint) and
            resumes on any number of ranks; False gathers one full checkpoint file on rank 0.
        process_group_backend: torch.distributed backend; None picks nccl on CUDA, gloo on CPU.
        timeout: timeout of collective operations.
    """

    def __init__(
        self,
        replicate_size: int | Literal["nodes"] = 1,
        sequence_parallel_size: int = 1,
        activation_checkpointing: bool | Literal["full", "selective"] = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",  # unused: setup_environment builds the plan's mesh instead
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if replicate_size != "nodes" and (isinstance(replicate_size, bool) or not isinstance(replicate_size, int)
                                          or replicate_size < 1):
            raise ConfigError(
                f"{STRATEGY_SETTING}.replicate_size: {replicate_size!r} is neither a positive integer nor 'nodes'"
            )
        check_sequence_parallel_size(sequence_parallel_size)
        self.replicate_size = replicate_size
        self.sequence_parallel_size = sequence_parallel_size
        self.activation_checkpointing = checkpointing_policy(activation_checkpointing)
        self.sharding = ShardingConfig(param_dtype, reduce_dtype, cpu_offload, reshard_after_forward)
        self.parallel_plan: ParallelPlan | None = None  # built in setup_environment, once the process group exists

    @override
    def setup_environment(self) -> None:
        # ModelParallelStrategy.setup_environment with the plan's mesh instead of ("data_parallel", "tensor_parallel")
        self._check_precision()
        self._setup_distributed()
        replicas = self.num_nodes if self.replicate_size == "nodes" else self.replicate_size
        self.parallel_plan = build_plan(
            self.root_device.type, self.global_rank, self.world_size, replicas, self.sequence_parallel_size,
            self.sharding, self.activation_checkpointing,
        )
        self._device_mesh = self.parallel_plan.shard_mesh  # what Lightning's checkpointing reads, if anything

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        # A distributed checkpoint is written into a hidden directory and renamed into place, so a kill or a full
        # disk never leaves a half-written one where a resume looks (prolong_lit.checkpoint_io); a single file
        # goes through the trainer's CheckpointIO, atomic too.
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        save = partial(ModelParallelStrategy.save_checkpoint, self, checkpoint)
        save_distributed_atomically(save, Path(self.broadcast(str(filepath))), self)

    def _check_precision(self) -> None:
        precision = getattr(self.precision_plugin, "precision", "32-true")
        if self.sharding.param_dtype is not None and precision not in ("32-true", "32"):
            raise ConfigError(
                f"trainer.precision ({precision}) and {STRATEGY_SETTING}.param_dtype ({self.sharding.param_dtype}) "
                "both set the compute dtype; keep trainer.precision at 32-true (fp32 master weights) and let "
                "param_dtype say what the run computes in"
            )

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        assert self.parallel_plan is not None
        return {"num_replicas": self.parallel_plan.data_parallel_size, "rank": self.parallel_plan.data_parallel_rank}


AC_POLICIES = ("full", "selective")


def checkpointing_policy(value: bool | str) -> bool | str:
    """`activation_checkpointing` as the plan carries it: False, "full" (also for true) or "selective"."""
    if value is True:
        return "full"
    if value is False or value in AC_POLICIES:
        return value
    raise ConfigError(
        f"{STRATEGY_SETTING}.activation_checkpointing: {value!r} is not one of true, false, {', '.join(AC_POLICIES)}"
    )
