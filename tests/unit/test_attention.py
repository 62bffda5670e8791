"""Document-masked attention: equal to transformers' eager Llama run on each document alone, isolated across
documents, usable for ordinary (padded, cached) calls, and never quadratic in the packed row length."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from prolong_lit.data.format import PackedBatch
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from tests.helpers.memory_probe import LargestTensor
from tests.helpers.model_batches import make_packed_batch
from tests.helpers.tiny_model import OVERRIDES, VOCAB, eager_copy

# Three rows of 96 tokens: several documents, a one-token document, a whole-row document.
DOC_LENGTHS = [[40, 1, 30, 25], [96], [10, 50, 36]]


def build_module(attn: str, block: int = 8, **kwargs) -> LongContextLM:
    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(overrides=OVERRIDES),
                           kernels=KernelSettings(attn_implementation=attn, docmask_block_size=block), **kwargs)
    module.configure_model()
    return module.eval()


def per_document_logits(reference: LlamaForCausalLM, batch: PackedBatch, doc_lengths) -> torch.Tensor:
    """Logits (B, L, V) with every document run alone through the reference model."""
    rows = []
    for row, lengths in enumerate(doc_lengths):
        start, pieces = 0, []
        for n in lengths:
            pieces.append(reference(input_ids=batch.input_ids[row : row + 1, start : start + n]).logits[0])
            start += n
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


@pytest.mark.parametrize("attn,block", [("docmask", 8), ("docmask", 1), ("auto", 1024), ("sdpa", 0)])
def test_packed_logits_equal_eager_per_document(attn, block):
    # sdpa is transformers' own packed path (dense mask), included as a second witness of the reference.
    module = build_module(attn, block=max(block, 1))
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=3)
    with torch.no_grad():
        logits = module.model.lm_head(module(batch))  # (B, L, V)
        expected = per_document_logits(eager_copy(module), batch, DOC_LENGTHS)
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-5, f"{attn} (block {block}) differs from eager per document by {diff}"


def test_docmask_gradients_equal_eager_per_document():
    module = build_module("docmask", block=16)
    reference = eager_copy(module)
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=4)
    weights = torch.randn(3, 96, VOCAB, generator=torch.Generator().manual_seed(0))  # a generic scalar of logits
    (module.model.lm_head(module(batch)) * weights).sum().backward()
    (per_document_logits(reference, batch, DOC_LENGTHS) * weights).sum().backward()
    ref_grads = dict(reference.named_parameters())
    worst = 0.0
    for name, param in module.model.named_parameters():
        expected = ref_grads[name].grad
        worst = max(worst, ((param.grad - expected).abs().max() / expected.abs().max()).item())
    assert worst <= 1e-5, f"relative gradient difference {worst}"


def test_documents_are_isolated():
    module = build_module("docmask", block=8)
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=5)
    changed = batch.replace(input_ids=batch.input_ids.clone())
    changed.input_ids[0, :40] = (changed.input_ids[0, :40] + 1) % VOCAB  # rewrite row 0's first document
    with torch.no_grad():
        before, after = module(batch), module(changed)
    assert not torch.allclose(before[0, :40], after[0, :40])  # the rewritten document itself changes
    assert torch.equal(before[0, 40:], after[0, 40:])  # its neighbours in the row do not, bit for bit
    assert torch.equal(before[1:], after[1:])


def test_packed_position_ids_without_cu_seq_lens_stay_isolated():
    module = build_module("docmask", block=8)
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=6)
    with torch.no_grad():
        with_cu = module(batch)
        without = module.model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    assert (with_cu - without).abs().max().item() <= 1e-6


def test_padded_batch_and_generation_match_eager():
    module = build_module("docmask")
    reference = eager_copy(module)
    prompt = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        ours = module.model(input_ids=prompt, attention_mask=attention_mask).logits
        theirs = reference(input_ids=prompt, attention_mask=attention_mask).logits
        real = attention_mask.bool()
        assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=6, do_sample=False, use_cache=True,
                      pad_token_id=0)
        generated = module.model.generate(prompt, **kwargs)
        expected = reference.generate(prompt, **kwargs)
    assert generated.shape == (2, 18)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("doc_lengths", [[[128] * 16], [[2048]]], ids=["16-docs", "one-doc"])
def test_docmask_memory_is_not_quadratic_in_row_length(doc_lengths):
    length, block = 2048, 128
    module = build_module("docmask", block=block).train()
    heads = module.hf_config.num_attention_heads
    batch = make_packed_batch(doc_lengths, VOCAB, seed=7)
    with LargestTensor() as largest:
        module(batch).sum().backward()
    # the largest legitimate tensors: one block's scores against its document's keys, or the MLP's activations
    longest = max(doc_lengths[0])
    bound = max(heads * block * longest, length * module.hf_config.intermediate_size)
    assert largest.numel <= bound, (largest.numel, largest.op)
    assert largest.numel * 4 <= length * length


def test_largest_tensor_check_catches_transformers_dense_mask():
    """The same check flags transformers' own packed mask (a dense L x L tensor): it can fail."""
    length = 1024
    module = build_module("sdpa").train()
    batch = make_packed_batch([[256] * 4], VOCAB, seed=8)
    with LargestTensor() as largest:
        module(batch).sum().backward()
    assert largest.numel >= length * length


def test_attn_implementation_errors():
    with pytest.raises(ValueError, match=r"model\.kernels\.attn_implementation: 'flash_attention_3' is unknown"):
        LongContextLM(kernels=KernelSettings(attn_implementation="flash_attention_3"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError,
                           match=r"model\.kernels\.attn_implementation: 'flash' cannot run here \(flash-attn 2"):
            LongContextLM(kernels=KernelSettings(attn_implementation="flash"))
