"""Chunked LM head + cross-entropy: the same sum, count and gradients as full-logits cross-entropy, without ever
holding the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prolong_lit.model.loss import IGNORE_INDEX, chunked_cross_entropy_sum
from tests.helpers.memory_probe import LargestTensor

B, L, D, V = 2, 37, 16, 50


def inputs(dtype: torch.dtype, masked_fraction: float = 0.3):
    torch.manual_seed(0)  # the LM head's initialisation
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, L, D, generator=gen, dtype=dtype, requires_grad=True)  # (B, L, d)
    head = torch.nn.Linear(D, V, bias=False).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=gen)  # (B, L)
    labels[torch.rand(B, L, generator=gen) < masked_fraction] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX  # a document start
    return hidden, head, labels


def full_logits_reference(hidden, head, labels):
    """Plain cross-entropy over the materialised logits, shifted per row."""
    logits = head(hidden[:, :-1])  # (B, L-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]  # (B, L-1)
    total = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX)
    return total, (targets != IGNORE_INDEX).sum()


def sum_and_grads(fn, hidden, head, labels):
    hidden.grad, head.weight.grad = None, None
    total, count = fn(hidden, head, labels)
    total.backward()
    return total.detach(), count, hidden.grad.clone(), head.weight.grad.clone()


@pytest.mark.parametrize("implementation", ["chunked", "checkpointed"])
@pytest.mark.parametrize("chunk_size", [1, 5, 2048])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_chunked_equals_full_cross_entropy(chunk_size, dtype, tolerance, implementation):
    # fp64: absolute tolerance 1e-6 (observed ~1e-13). fp32: relative 1e-5 (sums of ~50 terms of ~4).
    hidden, head, labels = inputs(dtype)
    ours = sum_and_grads(lambda h, m, y: chunked_cross_entropy_sum(h, y, m, chunk_size, implementation=implementation),
                         hidden, head, labels)
    ref = sum_and_grads(full_logits_reference, hidden, head, labels)
    assert int(ours[1]) == int(ref[1]) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    scale = 1.0 if dtype == torch.float64 else None
    for name, a, b in [("sum", ours[0], ref[0]), ("d hidden", ours[2], ref[2]), ("d weight", ours[3], ref[3])]:
        norm = scale if scale is not None else b.abs().max().item()
        diff = (a.double() - b.double()).abs().max().item() / norm
        assert diff <= tolerance, f"{name}: {diff}"


def test_loss_is_shifted_per_row():
    """Row 1's first label must not be predicted by row 0's last position (no shift across rows)."""
    hidden, head, labels = inputs(torch.float64, masked_fraction=0.0)
    labels[:, 0] = 3  # a real label on row 1's first token: only a flat (cross-row) shift would predict it
    total, count = chunked_cross_entropy_sum(hidden, labels, head, 4)
    assert int(count) == B * (L - 1)
    flat_wrong = F.cross_entropy(head(hidden.reshape(-1, D)[:-1]), labels.reshape(-1)[1:], reduction="sum",
                                 ignore_index=IGNORE_INDEX)
    assert abs(total.item() - full_logits_reference(hidden, head, labels)[0].item()) < 1e-9
    assert abs(total.item() - flat_wrong.item()) > 1e-3


@pytest.mark.parametrize("implementation", ["chunked", "checkpointed"])
def test_no_loss_tokens_gives_zero_and_a_connected_graph(implementation):
    hidden, head, labels = inputs(torch.float32)
    labels[:] = IGNORE_INDEX
    total, count = chunked_cross_entropy_sum(hidden, labels, head, 8, implementation=implementation)
    total.backward()
    assert int(count) == 0 and total.item() == 0.0
    assert head.weight.grad is not None and not head.weight.grad.any()


@pytest.mark.parametrize("implementation", ["chunked", "checkpointed"])
def test_full_logits_never_exist(implementation):
    """Forward and backward together never hold more than one chunk of logits."""
    hidden, head, labels = inputs(torch.float32, masked_fraction=0.0)
    chunk = 8
    with LargestTensor() as largest:
        total, _ = chunked_cross_entropy_sum(hidden, labels, head, chunk, implementation=implementation)
        total.backward()
    # one chunk's logits, the hidden states (and their gradient) or the head's weight gradient
    assert largest.numel <= max(chunk * V, B * L * D, V * D), (largest.numel, largest.op)
    with LargestTensor() as full:  # the check can fail: plain cross-entropy holds (B*(L-1), V)
        full_logits_reference(hidden, head, labels)[0].backward()
    assert full.numel >= B * (L - 1) * V


@pytest.mark.parametrize("chunk_size", [7, 2048])
def test_bf16_autocast_matches_the_checkpointed_path(chunk_size):
    """Under bf16 autocast (fp32 weights, bf16 matrix products) both implementations give the same sum and
    gradients up to bf16 rounding: the chunked one adds the chunks' weight gradients in fp32, autograd in the
    weight's dtype (fp32 here too), so they agree to a few bf16 ulps (relative 1e-2 of the largest entry)."""
    results = {}
    for implementation in ("chunked", "checkpointed"):
        hidden, head, labels = inputs(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[implementation] = sum_and_grads(
                lambda h, m, y, impl=implementation: chunked_cross_entropy_sum(h, y, m, chunk_size,
                                                                               implementation=impl),
                hidden, head, labels)
    ours, ref = results["chunked"], results["checkpointed"]
    assert ours[2].dtype == ref[2].dtype and ours[3].dtype == ref[3].dtype == torch.float32
    for name, a, b in [("sum", ours[0], ref[0]), ("d hidden", ours[2], ref[2]), ("d weight", ours[3], ref[3])]:
        diff = (a.double() - b.double()).abs().max().item() / b.abs().max().item()
        assert diff <= 1e-2, f"{name}: {diff}"


def test_chunked_keeps_no_logits_for_backward():
    """The chunked function saves its inputs only: between forward and backward nothing of size (n, V) lives."""
    hidden, head, labels = inputs(torch.float32, masked_fraction=0.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        total, _ = chunked_cross_entropy_sum(hidden, labels, head, 8, implementation="chunked")
    assert total.requires_grad and max(saved) <= max(B * L * D, V * D)


def test_liger_is_refused_where_it_cannot_run():
    """On a machine without CUDA (or without liger-kernel) the setting is refused by name, before the model is built."""
    from prolong_lit.errors import ConfigError
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings

    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/gpu/test_liger_loss.py runs the kernel")
    module = LongContextLM(kernels=KernelSettings(loss_implementation="liger"))
    with pytest.raises(ConfigError, match=r"model\.kernels\.loss_implementation: 'liger' needs a CUDA device"):
        module.configure_model()
    assert module.model is None
    with pytest.raises(ConfigError, match=r"model\.kernels\.loss_implementation: 'fused' is unknown"):
        KernelSettings(loss_implementation="fused")
