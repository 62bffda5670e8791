"""Chunked LM head + cross-entropy: the full (L, vocab) logits never exist.

At 64K tokens and Llama-3's 128,256-token vocabulary the logits alone are 33.6 GB in fp32. Like ProLong
(`LOGIT_BLOCK_SIZE=2048`), the loss-bearing positions are split into chunks; each chunk's LM head and
cross-entropy run under non-reentrant activation checkpointing, so the forward keeps only the chunk's scalar
and the backward recomputes one chunk's logits at a time. Peak extra memory: one chunk's logits (2048 x 128256,
1 GB in fp32) instead of all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prolong_lit.constants import IGNORE_INDEX


def _chunk_cross_entropy(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)  # (n, V)
    # CE in at least fp32 even under bf16 autocast, as transformers does
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,  # (B, L, d): the final norm's output
    labels: torch.Tensor,  # (B, L): NOT shifted (position t's output predicts labels[t + 1]) unless labels_shifted
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = 2048,
    labels_shifted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of loss tokens) over labels != -100, shifted per row.

    `lm_head` is called as a module (not its weight) so FSDP's hooks gather its parameters as usual. Only
    positions with a label are projected, so masked tokens (SFT prompts, document starts) cost nothing.
    With `labels_shifted`, labels[t] is already position t's target (sequence parallelism shifts the whole row
    before cutting it into chunks, so a chunk's last position keeps the next chunk's first token as target).
    """
    if chunk_size < 1:
        raise ValueError(f"model.kernels.loss_chunk_size must be >= 1, got {chunk_size}")
    width = hidden.shape[-1]
    if labels_shifted:
        states = hidden.reshape(-1, width)  # (B*L, d)
        targets = labels.reshape(-1)  # (B*L,)
    else:
        states = hidden[:, :-1].reshape(-1, width)  # (B*(L-1), d)
        targets = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    keep = targets != IGNORE_INDEX
    count = keep.sum()
    states, targets = states[keep], targets[keep]  # (n, d), (n,)
    if states.shape[0] == 0:
        # No loss token: a zero-weighted one-token chunk keeps the graph (and, under DDP/FSDP, every rank's
        # collectives) the same as on a micro-batch with loss tokens.
        dummy = _chunk_cross_entropy(lm_head, hidden[:, :1].reshape(-1, width)[:1], labels.new_zeros(1))
        return dummy * 0.0, count
    total = None
    for start in range(0, states.shape[0], chunk_size):
        part = checkpoint(
            _chunk_cross_entropy, lm_head, states[start : start + chunk_size], targets[start : start + chunk_size],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    return total, count
