"""Sequence parallelism (Ulysses): the P ranks of a group share every row of a micro-batch.

The group is the "sp" dimension of the run's mesh (`prolong_lit.parallel.plan`): P consecutive ranks, which read
the same micro-batch. Each keeps a contiguous 1/P of every row, cut after the batch reached the device; what a
model needs to cut its batch lives here, tensor by tensor (the batch type is the model's business:
`prolong_lit.model.sequence_batch`):
  - labels are shifted over the whole row first (labels[t] := labels[t + 1], the last without target), so a
    chunk's last position keeps its target, the next chunk's first token;
  - each rank keeps the r-th 1/P of every row of input_ids, labels and position_ids. The positions restart at 0
    per document over the whole row, so a chunk's slice gives RoPE the global positions;
  - the document boundaries stay global and the attention (parallel/ulysses.py) runs over whole rows. Documents
    that straddle a chunk boundary keep their full context: ProLong's released code switches the exchange off
    whenever the longest document fits in a chunk and so cuts them. Here the exchange is skipped only when every
    chunk boundary is a document boundary (`chunk_boundaries`): then every document lies inside one chunk and
    attention within the chunk, with the chunk's own boundaries, is exact.

Gradients: each rank's loss covers different tokens of the same rows, and the all-to-all's backward returns
every gradient to the rank whose parameters produced it, so the gradients of a group's ranks add up to the
rows' gradient. DDP/FSDP average over all world = W * P ranks, so the loss is scaled by the world size (not
W = world / P).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.errors import ConfigError
from prolong_lit.parallel.ulysses import SP_SETTING, kv_head_repeats


class SequenceParallel:
    """This rank's sequence-parallel group: `size` ranks sharing rows, this rank's position `rank` in it.

    A plain class, not a dataclass: Lightning's collection utilities treat it as a leaf wherever it travels.
    """

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, size={self.size})"

    def local_slice(self, length: int) -> slice:
        """This rank's contiguous share of a row of `length` tokens."""
        if length % self.size:
            raise ConfigError(
                f"sequence parallelism: rows of {length} tokens do not split into {SP_SETTING} ({self.size}) equal "
                f"chunks; set data.seq_len (model.seq_len follows it) to a multiple of {self.size}"
            )
        chunk = length // self.size
        return slice(self.rank * chunk, (self.rank + 1) * chunk)


def check_sequence_parallel_shape(size: int, seq_len: int | None, num_attention_heads: int,
                                  num_key_value_heads: int) -> None:
    """Clear errors, before the model is built, for a row length (when known) or a head count that P does not
    divide."""
    if seq_len is not None and seq_len % size:
        raise ConfigError(
            f"the training length ({seq_len}, data.seq_len) must be a multiple of {SP_SETTING} ({size}): every "
            "rank holds an equal contiguous chunk of each row"
        )
    kv_head_repeats(num_attention_heads, num_key_value_heads, size)


def chunk_boundaries(bounds: Sequence[int], rows: int, length: int, size: int, rank: int) -> list[int] | None:
    """cu_seq_lens of rank `rank`'s chunks over its flattened (B, L/P) tokens when every chunk boundary is a
    document boundary (each document inside one chunk: local attention is exact); None otherwise."""
    chunk = length // size
    present = set(bounds)
    if any(b * length + r * chunk not in present for b in range(rows) for r in range(1, size)):
        return None
    local = []
    for b in range(rows):
        low = b * length + rank * chunk  # a boundary: a row start or a chunk boundary
        local.extend(x - low + b * chunk for x in bounds if low <= x < low + chunk)
    local.append(rows * chunk)
    return local


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[t] := labels[t + 1] within each row; the last position has no target."""
    shifted = torch.full_like(labels, IGNORE_INDEX)  # (B, L)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def check_same_in_group(fingerprint: torch.Tensor, sp: SequenceParallel) -> None:
    """Raise unless every rank of the group passed the same fingerprint (one tiny all-gather): the ranks of a
    group must hold the same micro-batch."""
    gathered = [torch.empty_like(fingerprint) for _ in range(sp.size)]
    dist.all_gather(gathered, fingerprint, group=sp.group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            "sequence parallelism: the ranks of one sequence-parallel group got different micro-batches; the "
            "DataModule must give global ranks g and g' the same samples when g // P == g' // P "
            f"(P = {SP_SETTING}), as MixtureDataModule does"
        )
