"""Packed micro-batches built by hand, exactly as the DataModule's collate must produce them.

The contract (docs/batch-contract.md, Fields), a `PackedBatch`:

    input_ids int64 (B, L), labels int64 (B, L) unshifted with -100 on every document's first token and where
    loss_mask == 0, position_ids int64 (B, L) restarting at 0 per document, cu_seq_lens int32 over the
    flattened B*L tokens, max_seqlen int, domain_ids int64 (B,), sample_index int64 (B,),
    loss_tokens / step_loss_tokens int64 scalars (positions with labels[:, 1:] != -100).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.data.format import PackedBatch

__all__ = ["IGNORE_INDEX", "concat_rows", "make_packed_batch", "random_doc_lengths", "share_step"]


def make_packed_batch(
    doc_lengths_per_row: Sequence[Sequence[int]],
    vocab: int,
    seed: int = 0,
    loss_mask: Sequence[Sequence[int]] | None = None,
    domain_ids: Sequence[int] | None = None,
    sample_index: Sequence[int] | None = None,
    step_loss_tokens: int | None = None,
) -> PackedBatch:
    """A micro-batch of B rows; row b holds documents of lengths doc_lengths_per_row[b] (all rows the same sum).

    Token ids are uniform in [0, vocab) from `seed`. `loss_mask` (per row, 0/1 per token) marks the tokens that
    keep their label; `step_loss_tokens` defaults to this batch's own loss_tokens (one micro-batch per step).
    """
    lengths = [[int(n) for n in row] for row in doc_lengths_per_row]
    row_len = sum(lengths[0])
    if any(sum(row) != row_len for row in lengths) or any(n < 1 for row in lengths for n in row):
        raise ValueError(f"every row's documents must be >= 1 token and sum to the same length: {lengths}")
    batch = len(lengths)
    rng = np.random.default_rng(seed)
    input_ids = torch.from_numpy(rng.integers(0, vocab, size=(batch, row_len))).long()  # (B, L)
    position_ids = torch.cat(
        [torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths]
    ).long()  # (B, L)
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX  # the last token of a document never predicts the next one's first
    if loss_mask is not None:
        mask = torch.as_tensor(np.asarray(loss_mask), dtype=torch.bool)  # (B, L)
        labels[~mask] = IGNORE_INDEX
    flat = [n for row in lengths for n in row]
    cu_seq_lens = torch.tensor([0, *np.cumsum(flat)], dtype=torch.int32)  # (num_docs + 1,)
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        cu_seq_lens=cu_seq_lens,
        max_seqlen=max(flat),
        domain_ids=torch.as_tensor(domain_ids if domain_ids is not None else [0] * batch, dtype=torch.int64),
        sample_index=torch.as_tensor(sample_index if sample_index is not None else range(batch), dtype=torch.int64),
        loss_tokens=torch.tensor(loss_tokens, dtype=torch.int64),
        step_loss_tokens=torch.tensor(loss_tokens if step_loss_tokens is None else step_loss_tokens,
                                      dtype=torch.int64),
    )


def random_doc_lengths(rows: int, row_len: int, max_docs: int, seed: int) -> list[list[int]]:
    """Random document lengths: each row split at up to max_docs - 1 distinct random cuts."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        k = int(rng.integers(1, max_docs + 1))
        cuts = np.sort(rng.choice(np.arange(1, row_len), size=k - 1, replace=False))
        out.append(np.diff(np.concatenate([[0], cuts, [row_len]])).tolist())
    return out


def share_step(batches: list[PackedBatch]) -> list[PackedBatch]:
    """Micro-batches of one optimizer step: each carries the step's total loss tokens as step_loss_tokens."""
    total = sum(int(b.loss_tokens) for b in batches)
    return [b.replace(step_loss_tokens=torch.tensor(total, dtype=torch.int64)) for b in batches]


def concat_rows(batches: list[PackedBatch]) -> PackedBatch:
    """One micro-batch holding all rows of `batches` (same row length), cu_seq_lens re-offset."""
    row_len = batches[0].input_ids.shape[1]
    cus, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for b in batches:
        cus.append(b.cu_seq_lens[1:] + offset)
        offset += b.input_ids.shape[0] * row_len
    labels = torch.cat([b.labels for b in batches])
    loss_tokens = torch.tensor(int((labels[:, 1:] != IGNORE_INDEX).sum()), dtype=torch.int64)
    return PackedBatch(
        input_ids=torch.cat([b.input_ids for b in batches]),
        labels=labels,
        position_ids=torch.cat([b.position_ids for b in batches]),
        cu_seq_lens=torch.cat(cus),
        max_seqlen=max(int(b.max_seqlen) for b in batches),
        domain_ids=torch.cat([b.domain_ids for b in batches]),
        sample_index=torch.cat([b.sample_index for b in batches]),
        loss_tokens=loss_tokens,
        step_loss_tokens=loss_tokens.clone(),
    )
