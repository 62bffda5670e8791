"""Every GPU attention kernel present (fa4, flash, torch_varlen) against the exact document-masked path on CUDA, in
the recipe's precision: bf16 tensors and bf16 parameters (what FSDP2's param_dtype gives), no autocast.

Kernel level: forward and backward against an fp32 per-document SDPA reference, with the docmask path's own bf16
error as the yardstick; GQA (8 query heads per 2 kv heads), head dim 128, documents of 1 token to 4K; a rewritten
document changes no other. Model level: the tiny Llama in bf16, each kernel's hidden states and gradients against
docmask's, and `auto` runs the first kernel present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.model_batches import make_packed_batch

pytestmark = pytest.mark.gpu

VOCAB = 512
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
DOC_LENGTHS = [[400, 1, 300, 323], [1024], [100, 500, 424]]
KERNEL_DOCS = [1, 2, 17, 128, 1000, 4096, 3000]  # one row of 8,244 tokens


def present_kernels() -> list[str]:
    if not torch.cuda.is_available():
        return []
    from prolong_lit.model.varlen_kernels import available_kernels

    return available_kernels(torch.device("cuda"))


KERNELS = present_kernels()


def on_cuda(batch):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, torch.device("cuda"))  # as the Trainer moves a PackedBatch


def attention_inputs(seed: int, heads: int = 8, kv_heads: int = 2, dim: int = 128):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(KERNEL_DOCS)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    return [randn(1, heads, total, dim), randn(1, kv_heads, total, dim), randn(1, kv_heads, total, dim)]


def run(kernel: str, inputs, grad_out):
    """(output, [dq, dk, dv]) of one packed row with `kernel` or `docmask`."""
    from prolong_lit.model import attention

    bounds = [0]
    for n in KERNEL_DOCS:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    longest = max(KERNEL_DOCS)
    if kernel == "docmask":
        out = attention.docmask_attention_forward(None, *leaves, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                  max_length_q=longest, max_length_k=longest, doc_bounds=bounds,
                                                  docmask_block_size=512)[0]
    elif kernel == "reference":
        q, k, v = leaves
        repeats = q.shape[1] // k.shape[1]
        out = torch.cat([
            F.scaled_dot_product_attention(q[0, :, a:b], k[0, :, a:b].repeat_interleave(repeats, 0),
                                           v[0, :, a:b].repeat_interleave(repeats, 0), is_causal=True).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ])[None]
    else:
        out = attention.varlen_forward(kernel, *leaves, (cu, cu, longest, longest), 0.0, None)
    out.backward(grad_out.to(out.dtype))
    return out.detach().float(), [t.grad.float() for t in leaves]


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kernel", KERNELS or [pytest.param("none", marks=pytest.mark.skip("no GPU kernel"))])
def test_kernel_matches_fp32_reference_like_docmask(kernel):
    inputs = attention_inputs(0)
    grad_out = torch.randn(1, sum(KERNEL_DOCS), 8, 128, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_grads = run("reference", [t.float() for t in inputs], grad_out)
    doc_out, doc_grads = run("docmask", inputs, grad_out)
    out, grads = run(kernel, inputs, grad_out)
    # the kernel's bf16 error is of the size of the exact path's own (x2 + a floor of a few bf16 roundings)
    assert rel(out, ref_out) <= 2 * rel(doc_out, ref_out) + 1e-2
    for name, g, d, r in zip("qkv", grads, doc_grads, ref_grads):
        assert rel(g, r) <= 2 * rel(d, r) + 2e-2, (name, rel(g, r), rel(d, r))


@pytest.mark.parametrize("kernel", KERNELS or [pytest.param("none", marks=pytest.mark.skip("no GPU kernel"))])
def test_kernel_keeps_documents_isolated(kernel):
    inputs = attention_inputs(1)
    grad_out = torch.randn(1, sum(KERNEL_DOCS), 8, 128, device="cuda", dtype=torch.bfloat16)
    a, b = 148, 1148  # the 1000-token document
    changed = [t.clone() for t in inputs]
    for t in changed:
        t[:, :, a:b] = torch.randn_like(t[:, :, a:b])
    out, grads = run(kernel, inputs, grad_out)
    out2, grads2 = run(kernel, changed, grad_out)
    others = torch.ones(out.shape[1], dtype=torch.bool, device="cuda")
    others[a:b] = False
    assert rel(out2[0, a:b], out[0, a:b]) > 1e-1
    assert (out2[0, others] - out[0, others]).abs().max().item() <= 1e-3 * out.abs().max().item()
    for g, g2 in zip(grads, grads2):
        assert (g2[0][:, others] - g[0][:, others]).abs().max().item() <= 1e-3 * g.abs().max().item()


def build(attn: str, state=None):
    from prolong_lit.model.module import LongContextLM
    from prolong_lit.model.settings import KernelSettings, LlamaSettings

    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                           kernels=KernelSettings(attn_implementation=attn, docmask_block_size=256), seq_len=1024)
    module.configure_model()
    if state is not None:
        module.model.load_state_dict(state)
    return module.to("cuda", torch.bfloat16)  # bf16 parameters, no autocast: FSDP2's param_dtype path


@pytest.mark.parametrize("kernel", KERNELS or [pytest.param("none", marks=pytest.mark.skip("no GPU kernel"))])
def test_model_with_kernel_matches_docmask_in_bf16(kernel):
    state = {k: v.clone() for k, v in build("docmask").model.state_dict().items()}
    batch = on_cuda(make_packed_batch(DOC_LENGTHS, VOCAB, seed=0))
    weights = torch.randn(3, 1024, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    hidden, grads = {}, {}
    for attn in (kernel, "docmask"):
        module = build(attn, state)
        assert module.attn_kernel == attn
        out = module(batch)
        (out.float() * weights).sum().backward()
        hidden[attn] = out.detach().float()
        grads[attn] = {n: p.grad.float() for n, p in module.model.named_parameters() if p.grad is not None}
    assert rel(hidden[kernel], hidden["docmask"]) <= 2e-2
    for name, ref in grads["docmask"].items():
        assert rel(grads[kernel][name], ref) <= 5e-2, name


@pytest.mark.skipif(not KERNELS, reason="no GPU kernel")
def test_auto_runs_the_first_kernel_present():
    from prolong_lit.model.attention import AUTO, chosen_kernel

    assert chosen_kernel(AUTO, torch.device("cuda")) == KERNELS[0]
    state = {k: v.clone() for k, v in build("docmask").model.state_dict().items()}
    batch = on_cuda(make_packed_batch(DOC_LENGTHS, VOCAB, seed=1))
    with torch.no_grad():
        auto = build("auto", state)
        assert auto.attn_kernel == KERNELS[0]
        assert torch.equal(auto(batch), build(KERNELS[0], state)(batch))
