"""Sequence parallelism over NCCL, one process per GPU, against P = 1 on one GPU with the same rows.

Two paths: the exact document-masked attention in fp32 (the loss and gradients must match within 1e-5, as on
CPU), and the fastest GPU varlen kernel present under bf16 autocast (flash's own backward is not
deterministic, so the comparison is at bf16's scale). NCCL refuses two ranks on one GPU: needs >= 2 GPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.ports import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sequence parallelism needs >= 2 GPUs"),
]

VOCAB = 512
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}  # tiny: 4 query heads, 2 kv heads
DOC_LENGTHS = [[400, 1, 300, 323], [1024], [100, 500, 424]]  # documents across the chunks of P = 2
SEQ_LEN = 1024


def build(attn: str, device: torch.device, plan=None):
    """The tiny model on `device`, laid out by `plan` (a sequence-parallel one: the attention's twin), or alone."""
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=SEQ_LEN,
                           kernels=KernelSettings(attn_implementation=attn, docmask_block_size=256,
                                                  loss_chunk_size=512))
    if plan is not None:
        module.set_parallel_plan(plan)
    module.configure_model()
    return module.to(device)


def make_batch(device: torch.device):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from tests.helpers.model_batches import make_packed_batch

    return move_data_to_device(make_packed_batch(DOC_LENGTHS, vocab=VOCAB, seed=0), device)


def loss_and_grads(module, batch, scale: int, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss_sum, _ = module.compute_loss_sum(batch)
    (loss_sum / int(batch.step_loss_tokens) * scale).backward()
    return loss_sum.detach(), {n: p.grad.detach().clone() for n, p in module.model.named_parameters()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    from prolong_lit.model.sequence_batch import shard_batch
    from prolong_lit.parallel.plan import build_plan

    device = torch.device("cuda", rank)
    # one sequence-parallel group of all ranks, the model unsharded (sequence parallelism alone)
    plan = build_plan("cuda", rank, world, sequence_parallel_size=world, sharding=None)
    for attn, bf16 in _paths():
        module = build(attn, device, plan)
        loss_sum, grads = loss_and_grads(module, shard_batch(make_batch(device), plan.sequence_parallel), world, bf16)
        dist.all_reduce(loss_sum)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world  # what DDP does
        if rank == 0:
            torch.save({"loss_sum": loss_sum.cpu(), "grads": {k: g.cpu() for k, g in grads.items()}},
                       Path(out_dir) / f"{attn}.pt")
    dist.destroy_process_group()


def _paths() -> list[tuple[str, bool]]:
    """(attention, bf16): docmask in fp32, and the fastest GPU kernel present (fa4, flash, torch_varlen) in bf16."""
    from prolong_lit.model.varlen_kernels import available_kernels

    fast = available_kernels(torch.device("cuda", 0))
    return [("docmask", False)] + [(fast[0], True)] * bool(fast)


def test_nccl_sequence_parallel_equals_one_gpu(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    device = torch.device("cuda", 0)
    for attn, bf16 in _paths():
        got = torch.load(tmp_path / f"{attn}.pt")
        loss_sum, grads = loss_and_grads(build(attn, device), make_batch(device), 1, bf16)
        if not bf16:
            assert abs(got["loss_sum"].item() - loss_sum.item()) / loss_sum.item() <= 1e-5
            diff = max((got["grads"][k] - g.cpu()).abs().max().item() for k, g in grads.items())
            assert diff <= 1e-5, (attn, diff)
        else:
            assert abs(got["loss_sum"].item() - loss_sum.item()) / loss_sum.item() <= 2e-3
            for name, grad in grads.items():
                error = (got["grads"][name] - grad.cpu()).norm() / grad.norm().clamp(min=1e-12)
                assert error <= 2e-2, (attn, name, error.item())
