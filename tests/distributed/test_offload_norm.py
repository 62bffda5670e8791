"""The gradient norm of CPU-offloaded FSDP2 shards (`model/offload_norm.py`), 2 CPU processes (gloo).

Under NCCL the norm of offloaded shards cannot be reduced as CPU tensors; `offloaded_total_norm` reduces one
scalar on the compute device instead. Here the compute device is the CPU (gloo), so the result can be set against
torch's own `get_total_norm` of the same DTensors (sharded unevenly, and replicated: counted once), and clipping
with it must scale the shards exactly as clipping with torch's norm does."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.ports import free_port

pytestmark = pytest.mark.distributed


def params_with(grads) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    return params


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from prolong_lit.model.offload_norm import offloaded_on_device_mesh, offloaded_total_norm

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    for placement in (Shard(0), Replicate()):
        fulls = [torch.randn(5, 3, generator=gen), torch.randn(8, generator=gen), torch.randn(1, 4, generator=gen)]
        grads = [distribute_tensor(t, mesh, [placement]) for t in fulls]
        expected = torch.nn.utils.get_total_norm(grads).full_tensor()
        norm = offloaded_total_norm(grads, reduce_device=torch.device("cpu"))
        truth = torch.cat([t.flatten() for t in fulls]).double().norm().float()
        clipped, reference = params_with(grads), params_with(grads)
        torch.nn.utils.clip_grads_with_norm_(clipped, 0.5, norm)  # as the module clips with the logged norm
        torch.nn.utils.clip_grads_with_norm_(reference, 0.5, expected)
        clip_diff = max((a.grad.full_tensor() - b.grad.full_tensor()).abs().max().item()
                        for a, b in zip(clipped, reference))
        scaled = clipped[0].grad.full_tensor().norm().item() / fulls[0].norm().item()
        results.put((rank, str(placement), norm.full_tensor().item(), expected.item(), truth.item(),
                     offloaded_on_device_mesh(grads), clip_diff, scaled))
    dist.destroy_process_group()


def test_offloaded_norm_equals_torch_norm_sharded_and_replicated():
    world = 2
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_worker, args=(world, free_port(), results), nprocs=world, join=True, start_method="spawn")
    rows = [results.get(timeout=30) for _ in range(2 * world)]
    for rank, placement, ours, torchs, truth, offloaded, clip_diff, scaled in rows:
        assert ours == pytest.approx(torchs, rel=1e-6), (rank, placement)
        assert ours == pytest.approx(truth, rel=1e-6), (rank, placement)  # replicated copies counted once
        assert offloaded is False  # a CPU mesh reduces CPU tensors itself: torch's own path is used
        assert clip_diff <= 1e-7, (rank, placement)
        assert scaled == pytest.approx(0.5 / truth, rel=1e-5)  # clipped to norm 0.5: every shard scaled alike
