"""FSDP2 (`fully_shard`) of any model, given its blocks and its roots: the model-agnostic half of sharding.

The model-specific half (which modules are the blocks and roots, how a checkpoint is loaded into the shards)
lives beside the model (`prolong_lit.model.parallelize` for the Llama). Blocks are sharded first, each its own
group whose parameters are gathered for its forward and freed after it (`reshard_after_forward`); then the roots,
which keep their parameters gathered from forward to backward (FSDP2's default for roots: a root called several
times per step, such as an LM head run in chunks, all-gathers once per forward).

Mesh: a 1-D mesh shards every parameter over all its ranks (FSDP, placement `Shard(0)`); a 2-D
("replicate", "shard") mesh shards within each replica group and replicates across the groups (HSDP, placements
`(Replicate(), Shard(0))`; gradients are reduce-scattered within a group, then all-reduced across groups).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from prolong_lit.constants import DTYPES

log = logging.getLogger(__name__)

STRATEGY_SETTING = "trainer.strategy.init_args"  # where the sharding settings are configured


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """How FSDP2 shards and computes (FSDP2Strategy's `param_dtype`, `reduce_dtype`, `cpu_offload`,
    `reshard_after_forward`).

    Args:
        param_dtype: dtype of the gathered parameters, i.e. of forward/backward compute and of the all-gather
            (`bfloat16` for the recipe); None computes in the parameters' own dtype (fp32: full precision). The
            sharded parameters the optimizer steps keep their own dtype (fp32 master weights).
        reduce_dtype: dtype of the gradient reduce-scatter / all-reduce (`float32` keeps the sum exact-ish under
            bf16 compute); None reduces in param_dtype.
        cpu_offload: keep the sharded parameters, gradients and optimizer states in (pinned) CPU memory; the
            optimizer step then runs on the CPU.
        reshard_after_forward: free each decoder layer's gathered parameters after its forward and gather them
            again in backward (less memory, one more all-gather per layer).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for setting, value in ((f"{STRATEGY_SETTING}.param_dtype", self.param_dtype),
                               (f"{STRATEGY_SETTING}.reduce_dtype", self.reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{setting}: {value!r} is not one of {', '.join(DTYPES)} (or null)")

    def mp_policy(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(
            param_dtype=DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )

    def offload_policy(self) -> OffloadPolicy:
        # pinned: FSDP2 then also moves shards back to the CPU if a `module.to(device)` (Lightning's setup) moved them
        return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device this rank computes on: the mesh's device type (the current CUDA device for `cuda`)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def shard_modules(model: nn.Module, blocks: Iterable[nn.Module], roots: Iterable[nn.Module], mesh: DeviceMesh,
                  config: ShardingConfig) -> nn.Module:
    """`fully_shard` each block, then each root, in place; every parameter of `model` must end up in a group
    (a DTensor), else it would be neither gathered nor synchronised."""
    common = {"mesh": mesh, "mp_policy": config.mp_policy(), "offload_policy": config.offload_policy()}
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **common)
    for root in roots:
        # reshard_after_forward=None: FSDP2 decides at its lazy init, keeping the roots' parameters gathered
        fully_shard(root, reshard_after_forward=None, **common)
    plain = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
    if plain:
        raise RuntimeError(f"FSDP sharding left parameters outside every group: {plain[:5]}")
    return model
