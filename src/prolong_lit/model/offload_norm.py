"""The gradient norm of CPU-offloaded FSDP2 shards under a GPU-only (NCCL) process group.

With `cpu_offload: true` FSDP2 keeps every gradient shard in CPU memory: a DTensor on the run's CUDA mesh whose
local tensor is on the CPU. `torch.nn.utils.get_total_norm` then reduces CPU tensors through the mesh's process
group, which under NCCL has no CPU backend ("No backend type associated with device type cpu"). Instead: each
rank's shards' squared norm on the CPU, one all-reduce of that scalar on the compute device over the sharded mesh
dimensions, and the result as a replicated DTensor whose local tensor is on the CPU again, so clipping
(`clip_grads_with_norm_`) scales the CPU shards in place with no collective at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def offloaded_on_device_mesh(grads: list[torch.Tensor]) -> bool:
    """Whether the gradients are CPU shards of DTensors on a non-CPU mesh (FSDP2 CPU offload on GPUs)."""
    return any(isinstance(g, DTensor) and g.device_mesh.device_type != "cpu" and g.to_local().device.type == "cpu"
               for g in grads)


def offloaded_total_norm(grads: list[DTensor], reduce_device: torch.device | None = None) -> DTensor:
    """The L2 norm of all `grads` (DTensors of one mesh, sharded or replicated per mesh dimension), reduced on
    `reduce_device` (default: the current CUDA device); a replicated DTensor whose local tensor is on the
    gradients' device."""
    mesh, placements = grads[0].device_mesh, grads[0].placements
    if any(g.device_mesh is not mesh or g.placements != placements for g in grads):
        raise ValueError("offloaded_total_norm: the gradients must share one mesh and one placement")
    if any(p.is_partial() for p in placements):
        raise ValueError(f"offloaded_total_norm: partial gradients {placements} are not reduced yet")
    local = [g.to_local() for g in grads]
    squared = torch.stack([t.detach().double().square().sum() for t in local]).sum()  # () this rank's shards
    if reduce_device is None:
        reduce_device = torch.device(mesh.device_type, torch.cuda.current_device())
    squared = squared.to(reduce_device)
    for dim, placement in enumerate(placements):
        if placement.is_shard():  # replicated dimensions hold copies: summing them would double count
            dist.all_reduce(squared, group=mesh.get_group(dim))
    norm = squared.sqrt().to(local[0].device, torch.float32)  # ()
    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)
