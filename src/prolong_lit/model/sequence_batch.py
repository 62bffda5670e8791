"""A packed micro-batch cut for sequence parallelism: this rank's contiguous 1/P of every row.

The tensor-level rules (global label shift, contiguous chunks, when attention must exchange) are in
`prolong_lit.parallel.sequence`; this applies them to the model's batch type, after the batch reached the device.
`loss_tokens` becomes the chunk's count (the group's counts add up to the row's); `step_loss_tokens` stays the
DataModule's count for the whole step, counted once per group.
"""

from __future__ import annotations

import torch

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.data.format import PackedBatch
from prolong_lit.parallel.sequence import SequenceParallel, check_same_in_group, chunk_boundaries, shift_labels


def shard_batch(batch: PackedBatch, sp: SequenceParallel, check_same: bool = True) -> PackedBatch:
    """This rank's share of a collated micro-batch; the ranks of the group must hold the same one.

    With `check_same` the group compares a small fingerprint of the batch (one tiny all-gather) and raises if
    a DataModule gave the ranks of a group different samples.
    """
    rows, length = batch.input_ids.shape
    part = sp.local_slice(length)
    if check_same and sp.group is not None:
        check_same_in_group(_fingerprint(batch), sp)
    labels = shift_labels(batch.labels)[:, part].contiguous()  # (B, L/P)
    local = batch.replace(
        input_ids=batch.input_ids[:, part].contiguous(),  # (B, L/P)
        labels=labels,
        position_ids=batch.position_ids[:, part].contiguous(),  # (B, L/P): global positions
        loss_tokens=(labels != IGNORE_INDEX).sum(),
        labels_shifted=True,
    )
    inside = chunk_boundaries(batch.cu_seq_lens.tolist(), rows, length, sp.size, sp.rank)
    if inside is None:
        return local.replace(sequence_exchange=True)  # global cu_seq_lens: attention exchanges over whole rows
    cu_seq_lens = torch.tensor(inside, dtype=batch.cu_seq_lens.dtype, device=batch.cu_seq_lens.device)
    return local.replace(cu_seq_lens=cu_seq_lens, max_seqlen=max(b - a for a, b in zip(inside, inside[1:])))


def _fingerprint(batch: PackedBatch) -> torch.Tensor:
    input_ids = batch.input_ids
    return torch.stack([
        input_ids.sum(),
        input_ids[:, 1::3].sum(),
        batch.sample_index.to(input_ids.device).sum(),
        torch.tensor(input_ids.numel(), device=input_ids.device),
    ]).to(torch.int64)  # (4,)
