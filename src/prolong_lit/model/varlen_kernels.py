"""The GPU attention kernels for packed rows: which ones this machine has, and one calling adapter per kernel.

    fa4           FlashAttention-4 (`flash-attn-4` wheels: pure Python, CuTe DSL): `flash_attn.cute.
                  flash_attn_varlen_func`. Hopper and Blackwell (compute capability >= 9.0).
    flash         FlashAttention-2 (`flash-attn`, a source build only): `flash_attn.flash_attn_varlen_func`. Ampere+.
    torch_varlen  PyTorch's own varlen attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9; FA2
                  kernels built into torch, nothing to install). Ampere+.

`KERNEL_ORDER` is `auto`'s preference (fastest exact kernel first); the exact per-document SDPA path
(`docmask`, model/attention.py) comes after all of them. Every kernel takes the flattened tokens of the
micro-batch, (B*L, H, D) queries and (B*L, H_kv, D) keys/values, int32 `cu_seqlens` on the tensors' device and the
longest document as a Python int (computed once per batch on the host: no device-to-host sync here).

`find_kernel` is the one availability probe (tests replace it with stand-ins that check the calling contract);
the adapters read each function's signature instead of guessing from version strings: torch's `varlen_attn`
takes `is_causal` (2.9), `scale` and `window_size` (2.10+), and `enable_gqa` (2.12+).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

KERNEL_ORDER = ("fa4", "flash", "torch_varlen")  # auto's preference, fastest first; docmask after them
DOCMASK_KERNEL = "docmask"
MIN_CAPABILITY = {"fa4": (9, 0), "flash": (8, 0), "torch_varlen": (8, 0)}
PACKAGES = {
    "fa4": "flash-attn-4 (import flash_attn.cute)",
    "flash": "flash-attn 2 (import flash_attn)",
    "torch_varlen": "torch.nn.attention.varlen (torch >= 2.9)",
}


@functools.cache
def import_kernel(kernel: str) -> Callable | None:
    """The kernel's varlen function if its package imports here, else None (the reason is logged at debug)."""
    if kernel not in PACKAGES:
        raise KeyError(f"unknown attention kernel {kernel!r}; one of {', '.join(KERNEL_ORDER)}")
    try:
        if kernel == "fa4":
            from flash_attn.cute import flash_attn_varlen_func as func
        elif kernel == "flash":
            from flash_attn import flash_attn_varlen_func as func
        else:
            from torch.nn.attention.varlen import varlen_attn as func
    except Exception as err:  # ImportError, or a package that imports but finds no CUDA library
        log.debug("attention kernel %s does not import: %s: %s", kernel, type(err).__name__, err)
        return None
    return func


def unavailable_reason(kernel: str, device: torch.device) -> str | None:
    """Why `kernel` cannot run on `device` (None: it can)."""
    if import_kernel(kernel) is None:
        return f"{PACKAGES[kernel]} is not importable"
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "needs a CUDA device, and torch sees none"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY[kernel]:
        need = ".".join(map(str, MIN_CAPABILITY[kernel]))
        return f"needs compute capability >= {need}, this GPU has {capability[0]}.{capability[1]}"
    return None


def find_kernel(kernel: str, device: torch.device) -> Callable | None:
    """The availability probe: `kernel`'s raw function when it can run on `device`, else None."""
    return import_kernel(kernel) if unavailable_reason(kernel, device) is None else None


def available_kernels(device: torch.device) -> list[str]:
    """The GPU kernels usable on `device`, in auto's order (docmask, always usable, is not listed)."""
    return [kernel for kernel in KERNEL_ORDER if find_kernel(kernel, device) is not None]


def installed_summary(device: torch.device) -> str:
    """One line on every kernel: usable, or why not (for error messages and benchmark tables)."""
    parts = []
    for kernel in KERNEL_ORDER:
        reason = None if find_kernel(kernel, device) is not None else unavailable_reason(kernel, device)
        parts.append(f"{kernel}: {'available' if reason is None else reason}")
    return "; ".join(parts + [f"{DOCMASK_KERNEL}: available"])


def run_varlen_kernel(
    kernel: str,
    func: Callable,
    query: torch.Tensor,  # (T, H, D) flattened tokens
    key: torch.Tensor,  # (T, H_kv, D)
    value: torch.Tensor,  # (T, H_kv, D)
    cu_seqlens: torch.Tensor,  # (num_docs + 1,) int32 on the tensors' device
    max_seqlen: int,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal document-masked attention of the flattened tokens with one kernel; returns (T, H, D)."""
    if kernel == "flash":
        return func(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                    dropout_p=dropout, softmax_scale=scale, causal=True)
    if dropout:
        raise ValueError(f"attention kernel {kernel!r} has no attention dropout (got {dropout})")
    if kernel == "fa4":
        return _call_fa4(func, query, key, value, cu_seqlens, max_seqlen, scale)
    if kernel == "torch_varlen":
        return _call_torch_varlen(func, query, key, value, cu_seqlens, max_seqlen, scale)
    raise KeyError(kernel)


@functools.cache
def _parameters(func: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(func).parameters)


def _call_fa4(func, query, key, value, cu_seqlens, max_seqlen, scale) -> torch.Tensor:
    """flash_attn.cute.flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=..., ...): everything after the
    tensors by keyword (its 4th positional is `qv`); GQA is native; older releases lack max_seqlen_*."""
    kwargs = {"cu_seqlens_q": cu_seqlens, "cu_seqlens_k": cu_seqlens, "softmax_scale": scale, "causal": True}
    if "max_seqlen_q" in _parameters(func):
        kwargs.update(max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    out = func(query, key, value, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in releases that always return the lse


def _call_torch_varlen(func, query, key, value, cu_seqlens, max_seqlen, scale) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, whichever of its signatures this torch has:
    2.9   (q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None)
    2.10+ (..., *, return_aux=None, scale=None, window_size=(-1, -1)); causal is window_size=(-1, 0)
    2.12+ also enable_gqa=False (GQA without repeating the kv heads)."""
    params = _parameters(func)
    kwargs = {}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    elif "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn takes neither is_causal nor window_size")
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[2]
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = heads != kv_heads
    elif heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)  # (T, H, D), transformers' repeat_kv order
        value = value.repeat_interleave(heads // kv_heads, dim=1)  # (T, H, D)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and scale != head_dim**-0.5:
        query = query * (scale * head_dim**0.5)  # the kernel's own scale is 1/sqrt(D)
    return func(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
