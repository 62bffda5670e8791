"""Activation checkpointing policies on the tiny Llama (one process, packed documents, fp32): `full` and
`selective` give the loss and gradients of no checkpointing; `selective` runs each attention kernel once (its
outputs kept) while recomputing the rest of the layer (the MLP runs again in backward), `full` runs both twice."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prolong_lit.errors import ConfigError
from prolong_lit.model.checkpointing import is_attention_op
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from prolong_lit.parallel.plan import ParallelPlan
from prolong_lit.parallel.strategy import FSDP2Strategy
from tests.helpers.model_batches import make_packed_batch
from tests.helpers.tiny_model import OVERRIDES, VOCAB

ROWS = [[20, 1, 43], [64]]  # 4 documents; with blocks of 16 queries: 2 + 1 + 3 + 4 SDPA calls per layer
LAYERS = 2  # the tiny Llama's
TOLERANCE = 1e-6  # fp32, same operations in the same order: observed 0


class AttentionCalls(TorchDispatchMode):
    """Counts the attention kernels that actually run (the selective recompute's saved ones never reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += is_attention_op(func)
        return func(*args, **(kwargs or {}))


def run(policy):
    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                           kernels=KernelSettings(attn_implementation="docmask", docmask_block_size=16))
    module.set_parallel_plan(ParallelPlan(activation_checkpointing=policy))
    module.configure_model()
    module.train()
    mlp_calls: list[int] = []
    # a pre-hook: the recompute stops as soon as it has what backward needs, before the MLP's forward returns
    module.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    batch = make_packed_batch(ROWS, VOCAB, seed=3)
    with AttentionCalls() as forward:
        loss_sum, _ = module.compute_loss_sum(batch)
    with AttentionCalls() as backward:
        loss_sum.backward()
    grads = {name: p.grad for name, p in module.model.named_parameters()}
    return loss_sum.item(), grads, forward.calls, backward.calls, len(mlp_calls)


@pytest.fixture(scope="module")
def runs():
    return {policy: run(policy) for policy in (False, "full", "selective")}


def test_policies_give_the_gradients_of_no_checkpointing(runs):
    loss, grads = runs[False][:2]
    for policy in ("full", "selective"):
        assert runs[policy][0] == pytest.approx(loss, rel=TOLERANCE)
        for name, grad in grads.items():
            diff = ((runs[policy][1][name] - grad).abs().max() / grad.abs().max()).item()
            assert diff <= TOLERANCE, (policy, name, diff)


def test_selective_keeps_attention_and_recomputes_the_rest(runs):
    per_forward = runs[False][2]
    assert per_forward == LAYERS * (2 + 1 + 3 + 4)  # the SDPA calls of ROWS in every layer
    # (forward attention calls, backward attention calls, layer-0 MLP runs)
    assert runs[False][2:] == (per_forward, 0, 1)
    assert runs["full"][2:] == (per_forward, per_forward, 2)  # the whole layer again
    assert runs["selective"][2:] == (per_forward, 0, 2)  # the MLP again, the attention kernels not


def test_unknown_policy_names_the_setting():
    with pytest.raises(ConfigError, match=r"trainer\.strategy\.init_args\.activation_checkpointing: 'some'"):
        FSDP2Strategy(activation_checkpointing="some")
    assert FSDP2Strategy(activation_checkpointing=True).activation_checkpointing == "full"
    assert FSDP2Strategy(activation_checkpointing="selective").activation_checkpointing == "selective"
