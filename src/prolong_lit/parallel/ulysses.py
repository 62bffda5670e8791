"""Ulysses attention: all-to-all exchanges that trade heads for sequence around the document-masked attention.

Each rank of a sequence-parallel group of P ranks holds a contiguous 1/P of every row. Before attention one
all-to-all gives every rank the whole rows for 1/P of the heads (query, key and value in a single exchange);
the ordinary attention (FlashAttention-2 varlen on GPU, the exact document-masked path on CPU) then runs over the
whole rows with the global `cu_seq_lens`, so no document loses context, wherever the chunk boundaries fall. A
second all-to-all trades the output back: whole heads, own chunk. The exchange is its own inverse, so its
backward is the same exchange of the gradient (DeepSpeed-Ulysses, ProLong's `SeqAllToAll`).

Grouped-query attention: the kv heads are repeated the fewest times that lets P divide them (none when it already
does), in the order transformers' `repeat_kv` uses, so every query head finds its kv head on its own rank.

`ulysses_attention(inner)` wraps any attention function of transformers' interface (the model registers the
wrapped twins of its own kernels). A twin behaves exactly like its base unless the forward passes
`sequence_parallel=<SequenceParallel>` (the model does for a sharded micro-batch whose documents cross chunk
boundaries), so the same model object still generates and validates alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from prolong_lit.errors import ConfigError

SP_KWARG = "sequence_parallel"  # the forward keyword that carries the group to the attention
SP_SETTING = "trainer.strategy.init_args.sequence_parallel_size"  # the setting named in errors about P


@dataclass
class AllToAllStats:
    """What this process's all-to-all exchanges moved since the last `reset` (for benchmarks and tests)."""

    calls: int = 0
    bytes_sent: int = 0  # bytes sent to the other ranks of the group (a rank's own slot never leaves it)

    def reset(self) -> None:
        self.calls, self.bytes_sent = 0, 0


ALL_TO_ALL_STATS = AllToAllStats()


def kv_head_repeats(num_attention_heads: int, num_key_value_heads: int, size: int) -> int:
    """How many times each kv head is repeated so that `size` ranks split the kv heads evenly.

    r = size / gcd(size, H_kv) is the fewest; it divides H / H_kv whenever size divides H (size | H_kv * H/H_kv
    and gcd(size/g, H_kv/g) = 1 give size/g | H/H_kv), so the repeated heads never outnumber the query heads.
    """
    if num_attention_heads % size or num_attention_heads % num_key_value_heads:
        raise ConfigError(
            f"{SP_SETTING} ({size}) must divide the number of attention heads "
            f"({num_attention_heads}, with {num_key_value_heads} kv heads): the all-to-all gives each rank "
            f"num_attention_heads / sequence_parallel_size whole heads"
        )
    return size // math.gcd(size, num_key_value_heads)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 of a (P, ...) tensor: slot j goes to rank j, and rank j's slot for this rank
    lands in slot j. Applying it twice is the identity, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(grad.contiguous(), ctx.group), None


def _exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    ALL_TO_ALL_STATS.calls += 1
    ALL_TO_ALL_STATS.bytes_sent += x.numel() * x.element_size() * (x.shape[0] - 1) // x.shape[0]
    return out


def heads_to_sequence(group: dist.ProcessGroup, size: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, H_i, L/P, D) chunks, all heads -> (B, H_i/P, L, D) whole rows, this rank's heads; one exchange."""
    batch, _, chunk, head_dim = tensors[0].shape
    heads = [t.shape[1] // size for t in tensors]
    slots = [t.reshape(batch, size, h, chunk, head_dim) for t, h in zip(tensors, heads)]  # (B, P, H_i/P, L/P, D)
    send = torch.cat(slots, dim=2).transpose(0, 1).contiguous()  # (P, B, sum H_i/P, L/P, D): slot j to rank j
    recv = _AllToAll.apply(send, group)  # (P, B, sum H_i/P, L/P, D): slot j = rank j's chunk of our heads
    rows = recv.permute(1, 2, 0, 3, 4).reshape(batch, sum(heads), size * chunk, head_dim)  # (B, sum H_i/P, L, D)
    return rows.split(heads, dim=1)


def sequence_to_heads(group: dist.ProcessGroup, size: int, x: torch.Tensor) -> torch.Tensor:
    """(B, L, H/P, D) whole rows, this rank's heads -> (B, L/P, H, D) this rank's chunk, all heads."""
    batch, length, heads, head_dim = x.shape
    send = x.reshape(batch, size, length // size, heads, head_dim).transpose(0, 1).contiguous()  # (P, B, L/P, H/P, D)
    recv = _AllToAll.apply(send, group)  # (P, B, L/P, H/P, D): slot j = our chunk, rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, length // size, size * heads, head_dim)  # (B, L/P, H, D)


def _exchange_dtype(*tensors: torch.Tensor) -> torch.dtype:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        # Under bf16 autocast RoPE leaves q and k in fp32 and v in bf16; SDPA and flash compute in the autocast
        # dtype anyway, so exchanging in it is exact and halves the bytes.
        return torch.get_autocast_dtype(device)
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors])


def ulysses_attention(inner: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, None]]:
    """The sequence-parallel twin of a transformers attention function (B, H, L, D) -> (B, L, H, D)."""

    @functools.wraps(inner)
    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,  # (B, H, L/P, D)
        key: torch.Tensor,  # (B, H_kv, L/P, D)
        value: torch.Tensor,  # (B, H_kv, L/P, D)
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        sp = kwargs.pop(SP_KWARG, None)
        if sp is None:
            return inner(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if attention_mask is not None or kwargs.get("cu_seq_lens_q") is None:
            raise ValueError("sequence-parallel attention needs packed rows (cu_seq_lens_q) and no attention mask")
        repeats = kv_head_repeats(query.shape[1], key.shape[1], sp.size)
        if repeats > 1:
            key = key.repeat_interleave(repeats, dim=1)  # (B, H_kv * r, L/P, D), as transformers' repeat_kv
            value = value.repeat_interleave(repeats, dim=1)  # (B, H_kv * r, L/P, D)
        dtype = _exchange_dtype(query, key, value)
        query, key, value = heads_to_sequence(sp.group, sp.size, query.to(dtype), key.to(dtype), value.to(dtype))
        out, _ = inner(module, query, key, value, None, dropout, scaling, **kwargs)  # (B, L, H/P, D)
        return sequence_to_heads(sp.group, sp.size, out), None  # (B, L/P, H, D)

    return forward
