"""FlashAttention-2 varlen (`prolong_varlen`) against the exact document-masked path on CUDA, in the recipe's
precision (fp32 weights, bf16 autocast: Lightning's bf16-mixed).

Both are compared with an fp32 reference (transformers' eager Llama on each document alone): flash's error must be
of the size of the document-masked path's own bf16 error, and documents must stay isolated."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from tests.helpers.model_batches import make_packed_batch

pytestmark = pytest.mark.gpu

VOCAB = 512
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
DOC_LENGTHS = [[400, 1, 300, 323], [1024], [100, 500, 424]]


def build(attn: str, state=None):
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                           kernels=KernelSettings(attn_implementation=attn, docmask_block_size=256), seq_len=1024)
    module.configure_model()
    if state is not None:
        module.model.load_state_dict(state)
    return module.cuda()


def bf16_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def on_cuda(batch):
    return move_data_to_device(batch, torch.device("cuda"))  # as the Trainer moves a PackedBatch


def fp32_reference(state, batch):
    """Hidden states (B, L, d) with every document run alone through transformers' eager Llama in fp32."""
    from transformers import LlamaForCausalLM

    config = build("docmask", state).model.config
    config._attn_implementation = "eager"
    reference = LlamaForCausalLM(config).cuda()
    reference.load_state_dict(state)
    rows = []
    with torch.no_grad():
        for row, lengths in enumerate(DOC_LENGTHS):
            start, pieces = 0, []
            for n in lengths:
                ids = batch.input_ids[row : row + 1, start : start + n]
                pieces.append(reference.model(input_ids=ids).last_hidden_state[0])
                start += n
            rows.append(torch.cat(pieces))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def state():
    pytest.importorskip("flash_attn")
    return {k: v.clone() for k, v in build("docmask").model.state_dict().items()}


def test_flash_matches_docmask_and_fp32_reference(state):
    batch = on_cuda(make_packed_batch(DOC_LENGTHS, VOCAB, seed=0))
    expected = fp32_reference(state, batch)
    with torch.no_grad(), bf16_autocast():
        flash = build("flash", state)(batch).float()
        docmask = build("docmask", state)(batch).float()
        auto = build("auto", state)(batch).float()
    flash_err = (flash - expected).abs().max().item()
    docmask_err = (docmask - expected).abs().max().item()
    assert torch.equal(auto, flash)  # auto picks flash on CUDA
    assert (flash - docmask).abs().max().item() <= 0.05 * expected.abs().max().item()
    assert flash_err <= 2 * docmask_err + 1e-2, (flash_err, docmask_err)


def test_flash_gradients_match_docmask(state):
    batch = on_cuda(make_packed_batch(DOC_LENGTHS, VOCAB, seed=1))
    weights = torch.randn(3, 1024, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    grads = {}
    for attn in ("flash", "docmask"):
        module = build(attn, state)
        with bf16_autocast():
            hidden = module(batch)
        (hidden.float() * weights).sum().backward()
        grads[attn] = {n: p.grad.float() for n, p in module.model.named_parameters() if p.grad is not None}
    assert grads["flash"].keys() == grads["docmask"].keys()
    for name, ref in grads["docmask"].items():
        diff = (grads["flash"][name] - ref).norm() / ref.norm()
        assert diff <= 0.05, (name, diff.item())


def test_flash_keeps_documents_isolated(state):
    module = build("flash", state)
    batch = on_cuda(make_packed_batch(DOC_LENGTHS, VOCAB, seed=2))
    changed = batch.replace(input_ids=batch.input_ids.clone())
    changed.input_ids[0, :400] = (changed.input_ids[0, :400] + 1) % VOCAB
    with torch.no_grad(), bf16_autocast():
        before, after = module(batch).float(), module(changed).float()
    assert (before[0, :400] - after[0, :400]).abs().max().item() > 1e-2
    assert (before[0, 400:] - after[0, 400:]).abs().max().item() <= 1e-6
    assert (before[1:] - after[1:]).abs().max().item() <= 1e-6
