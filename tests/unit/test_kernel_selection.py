"""Choosing the attention kernel: auto's order, the loud fallback, the error for a kernel that is not here, each
kernel's calling contract (importable stand-ins with the real functions' signatures, which check what they are
given and compute the reference), and no host sync per layer.

The GPU kernels cannot run on CPU: only the availability probe (`varlen_kernels.find_kernel`) is replaced; the
adapters, the flattening and the model around them are the real code. tests/gpu/ runs the real kernels."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from prolong_lit.errors import ConfigError
from prolong_lit.model import attention, varlen_kernels
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from tests.helpers.model_batches import make_packed_batch
from tests.helpers.tiny_model import OVERRIDES, VOCAB

DOC_LENGTHS = [[40, 1, 30, 25], [96], [10, 50, 36]]
CUDA = torch.device("cuda", 0)  # a device descriptor only: nothing runs on it here


def reference_varlen(q, k, v, cu, scale):
    """Per-document causal SDPA in fp32 over flattened (T, H, D) tokens; GQA by repeating kv heads."""
    out = torch.empty(q.shape, dtype=torch.float32)
    bounds = cu.tolist()
    repeats = q.shape[1] // k.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd = q[a:b].float().transpose(0, 1)  # (H, n, D)
        kd = k[a:b].float().repeat_interleave(repeats, dim=1).transpose(0, 1)  # (H, n, D)
        vd = v[a:b].float().repeat_interleave(repeats, dim=1).transpose(0, 1)
        out[a:b] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale).transpose(0, 1)
    return out.to(q.dtype)


class Contract:
    """What every stand-in checks, and what it saw."""

    def __init__(self):
        self.calls = 0

    def check(self, q, k, v, cu_q, cu_k, max_q, max_k, same_heads=False):
        self.calls += 1
        assert q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
        assert q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0]  # flattened (T, H, D)
        assert (k.shape[1] == q.shape[1]) if same_heads else (k.shape[1] < q.shape[1])  # GQA kept where supported
        assert cu_q.dtype == torch.int32 and cu_q.device == q.device and cu_k is cu_q
        assert type(max_q) is int and max_q == max_k == int(cu_q.diff().max())
        assert int(cu_q[-1]) == q.shape[0]


def fa2_standin(contract):
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        contract.check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        assert causal is True and dropout_p == 0.0
        return reference_varlen(q, k, v, cu_seqlens_q, softmax_scale)
    return flash_attn_varlen_func


def fa4_standin(contract):
    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                               page_table=None, softmax_scale=None, causal=False, window_size=(None, None),
                               return_lse=False):
        assert qv is None  # everything after the tensors goes by keyword
        contract.check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        assert causal is True
        return reference_varlen(q, k, v, cu_seqlens_q, softmax_scale), None  # (out, lse) like older releases
    return flash_attn_varlen_func


def torch_varlen_standin(contract, version):
    """torch.nn.attention.varlen.varlen_attn as torch 2.9, 2.11 and 2.13 define it."""
    if version == "2.9":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            contract.check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, same_heads=True)
            assert is_causal is True
            return reference_varlen(query, key, value, cu_seq_q, None)
    elif version == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            contract.check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, same_heads=True)
            assert tuple(window_size) == (-1, 0)  # causal
            return reference_varlen(query, key, value, cu_seq_q, scale)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            contract.check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
            assert tuple(window_size) == (-1, 0) and enable_gqa is True
            return reference_varlen(query, key, value, cu_seq_q, scale)
    return varlen_attn


def present(monkeypatch, kernels: dict, any_device: bool = False):
    """Replace the availability probe: `kernels` (name -> function) are present on CUDA (or anywhere)."""
    def find_kernel(kernel, device):
        return kernels.get(kernel) if (any_device or device.type == "cuda") else None
    monkeypatch.setattr(varlen_kernels, "find_kernel", find_kernel)


def build(attn: str) -> LongContextLM:
    torch.manual_seed(0)
    module = LongContextLM(llama=LlamaSettings(overrides=OVERRIDES), kernels=KernelSettings(attn_implementation=attn))
    module.configure_model()
    return module.eval()


@pytest.mark.parametrize("present_kernels,expected", [
    (("fa4", "flash", "torch_varlen"), "fa4"),
    (("flash", "torch_varlen"), "flash"),
    (("torch_varlen",), "torch_varlen"),
    ((), "docmask"),
])
def test_auto_picks_the_fastest_kernel_present(monkeypatch, present_kernels, expected):
    present(monkeypatch, {k: object() for k in present_kernels})
    assert attention.chosen_kernel(attention.AUTO, CUDA) == expected
    assert attention.chosen_kernel(attention.AUTO, torch.device("cpu")) == "docmask"  # CPU tensors stay exact
    assert attention.chosen_kernel("prolong_sp_auto", CUDA) == expected  # the sequence-parallel twin too


def test_auto_fallback_on_cuda_is_loud(monkeypatch, caplog):
    present(monkeypatch, {})
    attention._warn_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="prolong_lit.model.attention"):
        assert attention.auto_kernel(CUDA) == "docmask"
        assert attention.auto_kernel(torch.device("cpu")) == "docmask"  # CPU: no warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "found no GPU varlen kernel" in warnings[0].getMessage()
    present(monkeypatch, {"torch_varlen": object()})
    attention._info_once.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prolong_lit.model.attention"):
        assert attention.auto_kernel(CUDA) == "torch_varlen"
    assert any("runs the torch_varlen kernel" in r.getMessage() for r in caplog.records)


def test_explicit_kernel_that_is_not_here_is_a_config_error(monkeypatch):
    if not torch.cuda.is_available():  # the real probe, on a CPU machine
        with pytest.raises(ConfigError, match=r"model\.kernels\.attn_implementation: 'fa4' cannot run here"):
            LongContextLM(kernels=KernelSettings(attn_implementation="fa4"))
    present(monkeypatch, {"torch_varlen": object()})
    with pytest.raises(ConfigError) as err:
        attention.resolve_attn_implementation("flash", CUDA)
    message = str(err.value)
    assert "model.kernels.attn_implementation: 'flash'" in message
    assert "torch_varlen: available" in message and "docmask: available" in message  # what is installed
    assert attention.resolve_attn_implementation("torch_varlen", CUDA) == attention.TORCH_VARLEN
    with pytest.raises(ConfigError, match="'flash_attention_3' is unknown"):
        KernelSettings(attn_implementation="flash_attention_3")


STANDINS = {
    "fa4": lambda c: fa4_standin(c),
    "flash": lambda c: fa2_standin(c),
    "torch_varlen-2.9": lambda c: torch_varlen_standin(c, "2.9"),
    "torch_varlen-2.11": lambda c: torch_varlen_standin(c, "2.11"),
    "torch_varlen-2.13": lambda c: torch_varlen_standin(c, "2.13"),
}


@pytest.mark.parametrize("standin", list(STANDINS))
def test_kernel_adapter_honours_the_calling_contract(monkeypatch, standin):
    """The real model, flattening and adapter around a stand-in: the outputs equal the exact docmask path's
    (bf16 inputs: the kernels have no fp32 path) and each kernel sees the contract it documents."""
    kernel = standin.split("-")[0]
    contract = Contract()
    present(monkeypatch, {kernel: STANDINS[standin](contract)}, any_device=True)
    varlen_kernels._parameters.cache_clear()
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=3)
    with torch.no_grad():
        expected = build("docmask")(batch)  # (B, L, d)
        module = build(kernel)
        assert module.attn_kernel == kernel
        out = module(batch)
    assert contract.calls == module.hf_config.num_hidden_layers  # one kernel call per layer
    diff = ((out - expected).abs().max() / expected.abs().max()).item()
    assert diff <= 2e-2, f"{standin}: relative difference {diff} from docmask"


class ReadCounter(torch.Tensor):
    """A tensor that counts every read of its values back to Python (a device-to-host sync on a GPU)."""

    reads = 0
    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__,
             torch.Tensor.__index__, torch.Tensor.__float__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_no_boundary_read_back_per_layer():
    module = build("docmask")
    layers = module.hf_config.num_hidden_layers
    assert layers >= 2
    batch = make_packed_batch(DOC_LENGTHS, VOCAB, seed=3)
    counted = batch.replace(cu_seq_lens=batch.cu_seq_lens.as_subclass(ReadCounter))
    host = counted.replace(doc_bounds=tuple(batch.cu_seq_lens.tolist()))
    with torch.no_grad():
        ReadCounter.reads = 0
        with_bounds = module(host)
        assert ReadCounter.reads == 0  # the collate's host-side bounds: nothing read back
        without = module(counted)
        assert ReadCounter.reads == 1  # a hand-built batch: read back once per batch, not once per layer
    assert torch.equal(with_bounds, without)
    assert counted.doc_bounds is None  # replace(cu_seq_lens=...) drops stale bounds
