"""Compiled decoder layers composed with selective activation checkpointing and FSDP2 (2 CPU processes, gloo):
checkpointing, then compilation, then sharding; 3 micro-batches with different documents give the losses and
gathered gradients of the same sharded model run eagerly with full checkpointing, within fp32 tolerance."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.ports import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # inductor compiles on each rank: ~1-2 min

VOCAB = 256
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
BATCHES = [[[10, 30, 24], [64]], [[3, 61], [40, 24]], [[64], [1, 1, 62]]]  # per rank: rank r shifts by r
TOLERANCE = 1e-5


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings
    from prolong_lit.parallel.fsdp import ShardingConfig
    from prolong_lit.parallel.plan import build_plan
    from tests.helpers.model_batches import make_packed_batch

    results = {}
    for name, policy, compiled in (("eager", "full", False), ("compiled", "selective", True)):
        plan = build_plan("cpu", rank, world, sharding=ShardingConfig(), activation_checkpointing=policy)
        torch.manual_seed(0)
        module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=64,
                               kernels=KernelSettings(docmask_block_size=16, loss_chunk_size=32,
                                                      compile_blocks=compiled))
        module.set_parallel_plan(plan)
        module.configure_model()
        module.train()
        losses = []
        for index in range(len(BATCHES)):
            batch = make_packed_batch(BATCHES[(index + rank) % len(BATCHES)], vocab=VOCAB, seed=index)
            loss_sum, _ = module.compute_loss_sum(batch)
            loss_sum.backward()
            losses.append(loss_sum.item())
        grads = {key: p.grad.full_tensor() for key, p in module.model.named_parameters()}
        results[name] = {"losses": losses, "grads": grads}
    if rank == 0:
        from torch._dynamo.utils import counters

        results["graphs"] = counters["stats"]["unique_graphs"]
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


def test_compiled_selective_fsdp_matches_eager(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    results = torch.load(tmp_path / "results.pt")
    assert results["graphs"] > 0  # compiled for real
    ours, ref = results["compiled"], results["eager"]
    assert ours["losses"] == pytest.approx(ref["losses"], rel=TOLERANCE)
    for name, grad in ref["grads"].items():
        diff = ((ours["grads"][name] - grad).abs().max() / grad.abs().max()).item()
        assert diff <= TOLERANCE, (name, diff)
