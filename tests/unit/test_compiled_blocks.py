"""`model.kernels.compile_blocks`: each decoder layer compiled (inductor, CPU) with the attention kernel left out.

20 training micro-batches of the tiny Llama, each with different documents (their number and lengths), under full
activation checkpointing (the composition the recipe uses: checkpointing, then compilation, then sharding): the
compiled model's loss and gradients equal the eager model's within fp32 tolerance at every step, and after the
warm-up (the first two micro-batches: the first compile, then one recompile that makes the shapes dynamic) no
graph is compiled again. Composition with FSDP2 and selective checkpointing: tests/distributed/test_compiled_fsdp.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from prolong_lit.model.module import LongContextLM
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from prolong_lit.parallel.plan import ParallelPlan
from tests.helpers.model_batches import make_packed_batch
from tests.helpers.tiny_model import OVERRIDES, VOCAB

pytestmark = pytest.mark.slow  # inductor's C++ compilation: ~1 min on 2 cores

SEQ_LEN, STEPS, WARM_UP = 64, 20, 2
TOLERANCE = 1e-5  # max |difference| / max |gradient| per parameter; observed ~1e-6 (inductor fuses differently)


def build(compile_blocks: bool) -> LongContextLM:
    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=SEQ_LEN,
                           kernels=KernelSettings(attn_implementation="docmask", docmask_block_size=16,
                                                  compile_blocks=compile_blocks))
    module.set_parallel_plan(ParallelPlan(activation_checkpointing="full"))
    module.configure_model()
    return module.train()


def varying_rows(rng: random.Random) -> list[list[int]]:
    """Two rows of SEQ_LEN tokens cut into random documents."""
    rows = []
    for _ in range(2):
        left, row = SEQ_LEN, []
        while left:
            row.append(rng.randint(1, left))
            left -= row[-1]
        rows.append(row)
    return rows


def step(module: LongContextLM, batch) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss_sum, _ = module.compute_loss_sum(batch)
    loss_sum.backward()
    return loss_sum.item(), {name: p.grad for name, p in module.model.named_parameters()}


def test_compiled_layers_match_eager_without_recompiling():
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = build(False), build(True)
    rng = random.Random(0)
    graphs = []
    for index in range(STEPS):
        batch = make_packed_batch(varying_rows(rng), VOCAB, seed=index)
        ref_loss, ref_grads = step(eager, batch)
        loss, grads = step(compiled, batch)
        assert loss == pytest.approx(ref_loss, rel=TOLERANCE), index
        for name, grad in ref_grads.items():
            diff = ((grads[name] - grad).abs().max() / grad.abs().max()).item()
            assert diff <= TOLERANCE, (index, name, diff)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the layers were compiled (not silently run eagerly)
    assert graphs[-1] == graphs[WARM_UP - 1], graphs  # no graph compiled after the warm-up
    assert all("compiler.disable" in reason for reason in counters["graph_break"])  # only around attention
