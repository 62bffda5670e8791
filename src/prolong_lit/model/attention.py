"""Document-masked attention for packed rows, registered with transformers' AttentionInterface.

A packed micro-batch holds several documents per row; `cu_seq_lens` marks their boundaries over the flattened
B*L tokens and attention never crosses one. The names registered (import this module first), one per
`model.kernels.attn_implementation` value:

    prolong_fa4           FlashAttention-4 varlen (flash-attn-4 wheels; Hopper/Blackwell)
    prolong_varlen        FlashAttention-2 varlen (`flash`; flash-attn, a source build)
    prolong_torch_varlen  PyTorch's built-in varlen attention (`torch_varlen`; torch >= 2.9, nothing to install)
                          -- the three GPU kernels run on the flattened (B*L, H, D) tokens and handle GQA
                          (model/varlen_kernels.py: availability probes and calling adapters)
    prolong_docmask       exact and device-agnostic: per document, per block of queries, SDPA against that
                          document's keys up to the block's end. Memory is O(block * document length), never the
                          O(L^2) of transformers' own packed mask (a dense L x L tensor: 256 GiB at 512K).
    prolong_auto          for CUDA tensors the fastest GPU kernel present (fa4 on sm90+, flash, torch_varlen; the
                          choice is logged once), with a loud warning when none is and docmask runs instead; for
                          CPU tensors docmask (decided per call from the tensors' device, so a CPU run on a GPU
                          machine stays exact).

Each has a sequence-parallel twin (`prolong_sp_auto`, ...: the same kernel inside Ulysses' all-to-all exchanges,
`prolong_lit.parallel.ulysses`) that behaves exactly like its base unless the forward passes a group.

No host sync per layer: the model's forward passes `max_length_q/k` (a Python int) and `doc_bounds` (the
boundaries as Python ints, from the collate's host-side lengths); the GPU kernels take `cu_seq_lens` on the device
as they are, docmask loops over `doc_bounds`. Only a call without them (hand-built batches) reads them back from
the device, once per layer.

Calls without `cu_seq_lens` (ordinary batches, generation with a KV cache and a padding mask) go to
transformers' own SDPA attention with the mask transformers built, so the same model object can generate. The
one exception: packed `position_ids` (restarting inside a row) without `cu_seq_lens` and without a mask get
their document boundaries from the positions, so packing is never silently ignored.

transformers 5.24 skips mask creation entirely for an attention name unknown to its AttentionMaskInterface, which
would drop generation's padding mask; so the names are registered there too, with a mask function that builds
no mask when there is no padding mask (packed training) and transformers' SDPA mask otherwise.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prolong_lit.errors import ConfigError
from prolong_lit.model import varlen_kernels
from prolong_lit.model.varlen_kernels import DOCMASK_KERNEL, KERNEL_ORDER
from prolong_lit.parallel.ulysses import ulysses_attention

log = logging.getLogger(__name__)

SETTING = "model.kernels.attn_implementation"
FA4 = "prolong_fa4"
VARLEN = "prolong_varlen"  # FlashAttention-2
TORCH_VARLEN = "prolong_torch_varlen"
DOCMASK = "prolong_docmask"
AUTO = "prolong_auto"
# registered name -> the kernel it runs (auto: chosen per call)
KERNEL_OF = {FA4: "fa4", VARLEN: "flash", TORCH_VARLEN: "torch_varlen", DOCMASK: DOCMASK_KERNEL}
# `model.kernels.attn_implementation` values -> registered transformers names. `sdpa`/`eager` are transformers' own
# (packed rows then get transformers' dense L x L mask: for comparisons and benchmarks only).
ATTN_IMPLEMENTATIONS = {
    "auto": AUTO,
    "fa4": FA4,
    "flash": VARLEN,
    "torch_varlen": TORCH_VARLEN,
    "docmask": DOCMASK,
    "sdpa": "sdpa",
    "eager": "eager",
    AUTO: AUTO,
    FA4: FA4,
    VARLEN: VARLEN,
    TORCH_VARLEN: TORCH_VARLEN,
    DOCMASK: DOCMASK,
}
DEFAULT_DOCMASK_BLOCK_SIZE = 1024
SEQUENCE_PARALLEL_NAMES = {name: "prolong_sp_" + name.removeprefix("prolong_") for name in (AUTO, *KERNEL_OF)}


def default_device() -> torch.device:
    """The device a run's attention will see: the current CUDA device where there is one."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_attn_implementation(name: str, device: torch.device | None = None) -> str:
    """The transformers attention name for a `model.kernels.attn_implementation` value. An unknown value, or a
    GPU kernel that cannot run on `device` (default: the current CUDA device, else the CPU), is a ConfigError
    naming the setting and what this machine has."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"{SETTING}: {name!r} is unknown; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    resolved = ATTN_IMPLEMENTATIONS[name]
    kernel = KERNEL_OF.get(resolved)
    if kernel in KERNEL_ORDER:
        device = default_device() if device is None else device
        if varlen_kernels.find_kernel(kernel, device) is None:
            raise ConfigError(
                f"{SETTING}: {name!r} cannot run here ({varlen_kernels.unavailable_reason(kernel, device)}); "
                f"this machine has: {varlen_kernels.installed_summary(device)}. Use 'auto' for the fastest one "
                "present, or install it (README.md, GPU)"
            )
    return resolved


def chosen_kernel(attn_name: str, device: torch.device) -> str:
    """The kernel a resolved attention name runs on `device`: fa4, flash, torch_varlen, docmask (or sdpa/eager,
    transformers' own). What the run records and the benchmarks print."""
    attn_name = {twin: base for base, twin in SEQUENCE_PARALLEL_NAMES.items()}.get(attn_name, attn_name)
    if attn_name != AUTO:
        return KERNEL_OF.get(attn_name, attn_name)
    if device.type != "cuda":
        return DOCMASK_KERNEL
    available = varlen_kernels.available_kernels(device)
    return available[0] if available else DOCMASK_KERNEL


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries over the flattened (B, L) tokens: a document starts at every row start and wherever
    the position does not continue the previous one. Returns (cu_seq_lens int32, longest document)."""
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # (B, L)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_index = starts.reshape(-1).nonzero().squeeze(1)  # (num_docs,)
    end = torch.tensor([batch * length], device=position_ids.device)
    cu_seq_lens = torch.cat([start_index, end]).to(torch.int32)  # (num_docs + 1,)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


def _packed_boundaries(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(cu_q, cu_k, max_q, max_k) for a packed call, None for an ordinary one (then SDPA with the mask)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        if attention_mask is not None:
            raise ValueError("packed attention: pass either cu_seq_lens_q/k or an attention_mask, not both")
        if query.shape[2] != key.shape[2]:
            raise ValueError("packed attention (cu_seq_lens) cannot be used with a KV cache: pass use_cache=False")
        cu_k = cu_q if cu_k is None else cu_k
        max_q = kwargs.get("max_length_q")
        if max_q is None:
            bounds = kwargs.get("doc_bounds")
            max_q = max(b - a for a, b in zip(bounds, bounds[1:])) if bounds else int(cu_q.diff().max())
        max_k = kwargs.get("max_length_k")
        if max_k is None:
            max_k = max_q if cu_k is cu_q else int(cu_k.diff().max())
        return cu_q, cu_k, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    length = query.shape[2]
    if attention_mask is not None or position_ids is None or length != key.shape[2] or length < 2:
        return None
    position_ids = position_ids.expand(query.shape[0], -1)  # (B, L); generation passes (1, L)
    if bool((position_ids[:, 1:] == position_ids[:, :-1] + 1).all()):
        return None  # one document per row: plain causal attention
    cu, longest = cu_seq_lens_from_position_ids(position_ids)
    return cu, cu, longest, longest


def make_varlen_forward(kernel: str):
    """The transformers attention function that runs one GPU kernel (fa4, flash or torch_varlen) on packed rows."""

    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, L, D)
        key: torch.Tensor,  # (B, H_kv, L, D)
        value: torch.Tensor,  # (B, H_kv, L, D)
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        packed = _packed_boundaries(query, key, attention_mask, kwargs)
        if packed is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return varlen_forward(kernel, query, key, value, packed, dropout, scaling), None

    forward.__name__ = forward.__qualname__ = f"{kernel}_attention_forward"
    return forward


def varlen_forward(
    kernel: str,
    query: torch.Tensor,  # (B, H, L, D)
    key: torch.Tensor,  # (B, H_kv, L, D)
    value: torch.Tensor,  # (B, H_kv, L, D)
    packed: tuple[torch.Tensor, torch.Tensor, int, int],
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """One GPU kernel over the flattened tokens; returns (B, L, H, D) in the query's dtype."""
    func = varlen_kernels.find_kernel(kernel, query.device)
    if func is None:
        raise RuntimeError(f"attention kernel {kernel!r}: {varlen_kernels.unavailable_reason(kernel, query.device)}")
    cu_q, cu_k, max_q, _ = packed
    if cu_k is not cu_q and cu_k.shape != cu_q.shape:
        raise ValueError(f"{kernel}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
    batch, heads, length, head_dim = query.shape
    in_dtype = query.dtype
    if in_dtype not in (torch.float16, torch.bfloat16):
        # the kernels have no fp32 path. Under bf16-mixed, RoPE (fp32 cos/sin) promotes q and k to fp32: use the
        # autocast dtype, as autocast would. Without autocast (fp32 runs) precision is lost here: say so, once.
        if torch.is_autocast_enabled(query.device.type):
            target = torch.get_autocast_dtype(query.device.type)
        else:
            target = torch.bfloat16
            _warn_once(f"{kernel}: casting {in_dtype} attention inputs to bfloat16 (the kernel has no fp32 path)")
        query, key, value = (t.to(target) for t in (query, key, value))
    # int32 on the device already (the batch's own tensor): a no-op, no copy and no sync
    cu = cu_q.to(device=query.device, dtype=torch.int32, non_blocking=True)  # (num_docs + 1,)
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)  # (B*L, H, D)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)  # (B*L, H_kv, D)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)  # (B*L, H_kv, D)
    out = varlen_kernels.run_varlen_kernel(kernel, func, q, k, v, cu, int(max_q), scaling, dropout)  # (B*L, H, D)
    return out.view(batch, length, heads, head_dim).to(in_dtype)


varlen_attention_forward = make_varlen_forward("flash")  # FlashAttention-2 (the name `prolong_varlen`)


def docmask_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, L, D)
    key: torch.Tensor,  # (B, H_kv, L, D)
    value: torch.Tensor,  # (B, H_kv, L, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Exact document-masked causal attention in query blocks of `docmask_block_size`; returns (B, L, H, D)."""
    packed = _packed_boundaries(query, key, attention_mask, kwargs)
    if packed is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cu_q, cu_k, longest, _ = packed
    if cu_k is not cu_q and not torch.equal(cu_k, cu_q):
        raise ValueError(f"{DOCMASK}: cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
    block_size = int(kwargs.get("docmask_block_size") or DEFAULT_DOCMASK_BLOCK_SIZE)
    batch, heads, length, head_dim = query.shape
    repeats = heads // key.shape[1]
    bounds = kwargs.get("doc_bounds")  # host-side ints from the batch: no device sync per layer
    bounds = cu_q.tolist() if bounds is None else list(bounds)
    if bounds[0] != 0 or bounds[-1] != batch * length:
        raise ValueError(f"cu_seq_lens must run from 0 to B*L = {batch * length}, got {bounds[0]}..{bounds[-1]}")
    mask = later_blocks_mask(block_size, longest, query.dtype, query.device)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        row, offset = divmod(start, length)
        if end - row * length > length:
            raise ValueError(f"cu_seq_lens: the document [{start}, {end}) crosses the end of row {row}")
        span = slice(offset, offset + end - start)
        k = key[row, :, span].repeat_interleave(repeats, dim=0)  # (H, n, D): GQA by repeating kv heads
        v = value[row, :, span].repeat_interleave(repeats, dim=0)  # (H, n, D)
        outputs.append(_causal_in_blocks(query[row, :, span], k, v, block_size, mask, scaling, dropout))  # (n, H, D)
    out = torch.cat(outputs, dim=0)  # (B*L, H, D), documents in flattened order
    return out.view(batch, length, heads, head_dim), None


def later_blocks_mask(block: int, longest: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """One additive (block, longest) mask from which every query block after a document's first takes a view.

    masked[i, j] <=> j > i + (longest - block). The queries [first, last) of a document, r = last - first of them,
    use rows block-r.. and columns longest-last..: query first+i then sees exactly keys 0..first+i. Any
    longest >= last works, so the documents of one call (and their saved-for-backward views) share one tensor."""
    if longest <= block:
        return None  # every document fits in one block: SDPA's own causal mask only
    row = torch.arange(block, device=device)[:, None]
    col = torch.arange(longest, device=device)[None, :]
    mask = torch.zeros(block, longest, dtype=dtype, device=device)
    return mask.masked_fill_(col > row + (longest - block), float("-inf"))  # (block, longest)


def _causal_in_blocks(
    query: torch.Tensor,  # (H, n, D)
    key: torch.Tensor,  # (H, n, D)
    value: torch.Tensor,  # (H, n, D)
    block: int,
    mask: torch.Tensor | None,  # later_blocks_mask(block, >= n); None when n <= block
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal attention within one document, `block` queries at a time; returns (n, H, D).

    SDPA gets 4-D (1, H, q, D) inputs: with 3-D ones PyTorch's CPU dispatch falls back to the math kernel, which
    materialises every probability and its softmax copies (measured: memory grew 2.5-3x per doubling of the
    length instead of ~1.5-1.9x)."""
    length = query.shape[1]
    query, key, value = query[None], key[None], value[None]  # (1, H, n, D)
    blocks = []
    for first in range(0, length, block):
        last = min(first + block, length)
        rows = last - first
        if first == 0:
            block_mask, causal = None, True  # square block: SDPA's own (top-left aligned) causal mask is exact
        else:
            block_mask, causal = mask[block - rows :, mask.shape[1] - last :], False  # (rows, last)
        blocks.append(
            F.scaled_dot_product_attention(
                query[:, :, first:last], key[:, :, :last], value[:, :, :last],
                attn_mask=block_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
            )[0]  # (H, rows, D)
        )
    return torch.cat(blocks, dim=1).transpose(0, 1)  # (n, H, D)


def auto_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The fastest GPU kernel present for CUDA tensors (loudly docmask when there is none), docmask on CPU."""
    kernel = auto_kernel(query.device)
    if kernel in KERNEL_ORDER:
        packed = _packed_boundaries(query, key, attention_mask, kwargs)
        if packed is not None:
            return varlen_forward(kernel, query, key, value, packed, dropout, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return docmask_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def auto_kernel(device: torch.device) -> str:
    """What 'auto' runs on `device`: logged once per choice; on CUDA without a GPU kernel, a loud warning."""
    kernel = chosen_kernel(AUTO, device)
    if device.type == "cuda" and kernel == DOCMASK_KERNEL:
        _warn_once(
            f"attention: {SETTING} 'auto' found no GPU varlen kernel on {device} ("
            + varlen_kernels.installed_summary(device)
            + "): falling back to the exact per-document SDPA path, several times slower at long context. "
            "Install flash-attn-4 (README.md, GPU) or use torch >= 2.9"
        )
    elif device.type == "cuda":
        _info_once(f"attention: {SETTING} 'auto' runs the {kernel} kernel on {device}")
    return kernel


def padding_only_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask transformers builds for our names: none for packed/unpadded prefill (the attention function
    handles documents from cu_seq_lens or position_ids), transformers' SDPA mask when there is padding or a
    KV cache (generation)."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs
    )


def sequence_parallel_attn_name(attn_name: str) -> str:
    """The sequence-parallel twin of a resolved attention name; a clear error for transformers' own ones."""
    if attn_name not in SEQUENCE_PARALLEL_NAMES:
        raise ConfigError(
            f"{SETTING}: {attn_name!r} cannot run with sequence parallelism "
            "(trainer.strategy.init_args.sequence_parallel_size > 1); use auto, fa4, flash, torch_varlen or docmask"
        )
    return SEQUENCE_PARALLEL_NAMES[attn_name]


def register_attention() -> None:
    """Register the five names and their sequence-parallel twins with transformers (idempotent; on import)."""
    functions = {name: make_varlen_forward(kernel) for name, kernel in KERNEL_OF.items() if kernel in KERNEL_ORDER}
    functions.update({DOCMASK: docmask_attention_forward, AUTO: auto_attention_forward})
    for name, function in functions.items():
        for registered, forward in ((name, function), (SEQUENCE_PARALLEL_NAMES[name], ulysses_attention(function))):
            # left out of compiled decoder layers (model.kernels.compile_blocks): the documents of each batch (their
            # number and lengths, a Python loop over them) would otherwise recompile the graph per batch
            AttentionInterface.register(registered, torch.compiler.disable(forward))
            AttentionMaskInterface.register(registered, padding_only_mask)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _info_once(message: str) -> None:
    log.info(message)


register_attention()
