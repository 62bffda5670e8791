"""Balanced micro-batches: which rows of an optimizer step each (micro-batch slot, rank) trains on.

Under FSDP every layer's all-gather and reduce-scatter synchronise the data-parallel ranks, so micro-batch slot
m of a step (the m-th micro-batch of every rank) lasts as long as its slowest rank. A rank's time on a
micro-batch is about

    a * sum over its rows of sum(doc_len ** 2)   +   b * tokens

(attention, quadratic in each document's length under document masking, plus everything linear in the tokens:
the matmuls, norms, the loss). Every row holds exactly seq_len tokens and every rank holds micro_batch_size rows
per slot, so the linear term is the same on every rank and only the attention term, Σ doc_len², can make one
rank wait for another. A row of one 64K document costs 64K² = 4.3e9; a row of 500 short documents ~1e7.

`assign_step` deals the rows of one step so that, slot by slot, the ranks' costs are as even as possible: rows
sorted by descending cost, the W·mb most expensive ones form the first slot, the next W·mb the second, and so on
(for mb = 1 this minimises Σ over slots of the slot's maximum exactly: consecutive groups of a sorted list); inside
a slot the rows go to the ranks greedily, the next most expensive row to the least loaded rank that still has
room (LPT). ProLong's loader sorts each rank's own rows of a step by the same cost; dealing across ranks also
evens out a step whose expensive rows all fall on one rank.

The result is a pure function of the step's row costs (ties broken by stream position), so every rank, every
dataloader worker and a resumed run compute the same assignment, and the set of rows of each step does not
change: the step's loss and gradients are the same, up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def row_cost(doc_lengths: Sequence[int] | np.ndarray) -> int:
    """Attention cost of one packed row: Σ doc_len² over its documents (document-masked causal attention)."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)  # (k,)
    return int((lengths * lengths).sum())  # <= seq_len ** 2: 512K rows give 2.7e11, far inside int64


def identity_assignment(slots: int, world_size: int, micro_batch_size: int) -> np.ndarray:
    """The layout without balancing: position slot*W*mb + rank*mb + j (docs/batch-contract.md, The global
    stream)."""
    return np.arange(slots * world_size * micro_batch_size, dtype=np.int64).reshape(
        slots, world_size, micro_batch_size
    )  # (slots, W, mb)


def assign_step(costs: Sequence[int] | np.ndarray, slots: int, world_size: int, micro_batch_size: int) -> np.ndarray:
    """Deal the rows of one optimizer step to (slot, rank, row) so each slot's slowest rank is as fast as possible.

    Args:
        costs: each row's cost (`row_cost`), in stream order: slots * world_size * micro_batch_size values.
        slots: micro-batches of the step on each rank.
        world_size: data-parallel ranks.
        micro_batch_size: rows per micro-batch.

    Returns:
        int64 array (slots, world_size, micro_batch_size) of positions into `costs`: rank r's m-th micro-batch of
        the step holds rows out[m, r]. Slots come in descending cost (the most expensive first, as ProLong's
        loader orders them, so a step's peak memory shows on its first micro-batch).
    """
    costs = np.asarray(costs, dtype=np.int64)  # (n,)
    per_slot = world_size * micro_batch_size
    if costs.shape != (slots * per_slot,):
        raise ValueError(f"assign_step: {costs.shape} costs for {slots} slots x {world_size} ranks x "
                         f"{micro_batch_size} rows")
    order = np.lexsort((np.arange(costs.size), -costs))  # descending cost; equal costs: stream order
    out = np.empty((slots, world_size, micro_batch_size), dtype=np.int64)
    for slot in range(slots):
        out[slot] = _deal(order[slot * per_slot : (slot + 1) * per_slot], costs, world_size, micro_batch_size)
    return out


def _deal(rows: np.ndarray, costs: np.ndarray, world_size: int, micro_batch_size: int) -> np.ndarray:
    """LPT inside one slot: rows (already in descending cost) to the least loaded rank with room; ties: lower rank."""
    if micro_batch_size == 1:
        return rows.reshape(world_size, 1)  # one row per rank: the slot's cost is its largest row whatever the deal
    loads = np.zeros(world_size, dtype=np.int64)
    filled = np.zeros(world_size, dtype=np.int64)
    dealt = np.empty((world_size, micro_batch_size), dtype=np.int64)
    for row in rows:
        open_loads = np.where(filled < micro_batch_size, loads, np.iinfo(np.int64).max)
        rank = int(np.argmin(open_loads))  # first minimum: the lowest rank
        dealt[rank, filled[rank]] = row
        filled[rank] += 1
        loads[rank] += costs[row]
    return dealt


def slowest_rank_cost(costs: Sequence[int] | np.ndarray, assignment: np.ndarray) -> int:
    """Σ over slots of the slowest rank's attention cost: what the ranks wait for under this assignment."""
    costs = np.asarray(costs, dtype=np.int64)
    per_rank = costs[assignment].sum(axis=2)  # (slots, W)
    return int(per_rank.max(axis=1).sum())
