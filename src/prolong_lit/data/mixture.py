"""The global sample stream of a mixture run, as pure functions of (seed, global sample index).

Which domain and which item the k-th sample of the run holds depends on nothing else: not on the number of
ranks, dataloader workers, micro-batch size or where the run was resumed. That is what makes resume exact
with any number of workers and lets a run continue the same stream on a different number of ranks.

Layout: the stream is cut into blocks of `block_size` samples. Every block holds the same number of samples
of each domain (largest remainder of weight * block_size), so at every block boundary each domain's share is
within 1/block_size of its weight. A seeded permutation per block orders the domain slots. The j-th use of
domain d reads item perm(seed, d, epoch=j // n_d)[j % n_d] of that domain's n_d training items: a fresh
permutation per pass over the domain. Lookups cost O(block_size) (cached), nothing is stateful.

Random numbers come from numpy's legacy `RandomState`, whose streams NumPy guarantees to stay the same across
versions (the `Generator` API does not), so a checkpoint resumes the same stream after an upgrade.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 1000
_BLOCK_TAG = 0  # seed-sequence tags keep the block and item permutations independent
_ITEM_TAG = 1


def block_counts(weights: Sequence[float], block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Samples of each domain per block: largest remainder of weights * block_size (ties: lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    exact = w * block_size
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    missing = block_size - int(counts.sum())
    order = np.argsort(-remainder, kind="stable")
    counts[order[:missing]] += 1
    return counts  # (D,)


class MixturePlan:
    """Maps a global sample index to (domain index, item index); pure in (seed, index).

    Args:
        domains: domain names, in the order of the domain indices returned (the DataModule sorts them).
        weights: one weight per domain (token shares; all samples have the same length); normalised here.
        train_items: number of training items per domain (items 0..n-1 are used; the rest is held out).
        seed: the stream's seed, 0 <= seed < 2**32.
        block_size: samples per block; shares are exact at every block boundary.
    """

    def __init__(
        self,
        domains: Sequence[str],
        weights: Sequence[float],
        train_items: Sequence[int],
        seed: int,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if not (len(domains) == len(weights) == len(train_items) > 0):
            raise ValueError("MixturePlan needs one weight and one item count per domain")
        if min(train_items) < 1:
            raise ValueError(f"every domain needs at least one training item, got {list(train_items)}")
        self.domains = list(domains)
        self.train_items = np.asarray(train_items, dtype=np.int64)  # (D,)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.counts = block_counts(weights, block_size)  # (D,)
        # the block's slots before shuffling: counts[0] zeros, counts[1] ones, ...
        self._slots = np.repeat(np.arange(len(domains)), self.counts)  # (block_size,)
        self._domain_keys = [zlib.crc32(name.encode()) for name in self.domains]
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain of each slot, how many slots of that domain come before it in the block) for block b."""
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        rng = np.random.RandomState([self.seed, _BLOCK_TAG, b])
        domain = self._slots[rng.permutation(self.block_size)]  # (block_size,)
        ordinal = np.empty(self.block_size, dtype=np.int64)
        for d, count in enumerate(self.counts):
            ordinal[domain == d] = np.arange(count)
        self._blocks[b] = (domain, ordinal)
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return domain, ordinal

    def _item_perm(self, d: int, epoch: int) -> np.ndarray:
        """The order of domain d's training items in its epoch-th pass. Keyed by the domain's name, not its
        index, so a domain's item order does not depend on which other domains are in the mix."""
        key = (d, epoch)
        if key in self._perms:
            self._perms.move_to_end(key)
            return self._perms[key]
        rng = np.random.RandomState([self.seed, _ITEM_TAG, self._domain_keys[d], epoch])
        perm = rng.permutation(int(self.train_items[d]))  # (n_d,)
        self._perms[key] = perm
        if len(self._perms) > 2 * len(self.domains):
            self._perms.popitem(last=False)
        return perm

    def lookup(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and item index of each global sample index (int64 arrays of the same shape)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise ValueError(f"global sample indices must be >= 0, got {indices.min()}")
        domains = np.empty_like(indices)
        items = np.empty_like(indices)
        for i, k in enumerate(indices.flat):
            b, p = divmod(int(k), self.block_size)
            block_domain, block_ordinal = self._block(b)
            d = int(block_domain[p])
            use = b * int(self.counts[d]) + int(block_ordinal[p])  # this is the use-th sample of domain d
            epoch, r = divmod(use, int(self.train_items[d]))
            domains.flat[i] = d
            items.flat[i] = self._item_perm(d, epoch)[r]
        return domains, items

    def __getitem__(self, k: int) -> tuple[int, int]:
        domains, items = self.lookup([k])
        return int(domains[0]), int(items[0])


@dataclass(frozen=True)
class StreamLayout:
    """Which global indices each rank's micro-batches and each optimizer step cover (docs/batch-contract.md,
    The global stream).

    Rank r's micro-batch m covers start + m*mb*W + r*mb + [0, mb). Optimizer steps group A consecutive
    micro-batches per rank; `phase` micro-batches of the first step were already accumulated by the trainer
    before a resume (Lightning keeps counting batches, so after a resume with a different
    accumulate_grad_batches its first step is short). With phase 0, step s covers [start + s*S, start + (s+1)*S).
    With balanced micro-batches (data/balance.py) each step covers the same indices, dealt anew to its
    (micro-batch, rank) slots.

    Args:
        start: global index of this run's first sample (the consumed samples restored from a checkpoint).
        micro_batch_size: rows per micro-batch (mb).
        accumulate: micro-batches per optimizer step on each rank (A).
        world_size: data-parallel ranks (W).
        phase: 0 <= phase < A, micro-batches the trainer counts as already accumulated in its current step.
    """

    start: int
    micro_batch_size: int
    accumulate: int
    world_size: int
    phase: int = 0

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.accumulate * self.world_size

    @property
    def samples_per_micro_step(self) -> int:
        """Samples of one micro-batch index over all ranks."""
        return self.micro_batch_size * self.world_size

    def micro_batch_indices(self, m: int, rank: int) -> np.ndarray:
        """Rank `rank`'s m-th micro-batch without balancing. Balanced runs deal the same step's indices anew
        (data/balance.py): step_indices(step)[assign_step(...)[slot_of(m), rank]]."""
        first = self.start + m * self.samples_per_micro_step + rank * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)  # (mb,)

    def step_of(self, m: int) -> int:
        """Index (since this run started) of the optimizer step that micro-batch m belongs to."""
        return (m + self.phase) // self.accumulate

    def step_slots(self, step: int) -> int:
        """Micro-batches of optimizer step `step` on each rank (A, or A - phase for the first step)."""
        return (step + 1) * self.accumulate - self.phase - max(0, step * self.accumulate - self.phase)

    def slot_of(self, m: int) -> int:
        """Position of micro-batch m within its optimizer step: 0 .. step_slots(step_of(m)) - 1."""
        return m - max(0, self.step_of(m) * self.accumulate - self.phase)

    def step_indices(self, step: int) -> np.ndarray:
        """The global indices of every sample of an optimizer step, over all ranks and micro-batches."""
        first_m = max(0, step * self.accumulate - self.phase)
        end_m = (step + 1) * self.accumulate - self.phase
        lo = self.start + first_m * self.samples_per_micro_step
        hi = self.start + end_m * self.samples_per_micro_step
        return np.arange(lo, hi, dtype=np.int64)

    def consumed(self, steps_done: int) -> int:
        """Global samples consumed once `steps_done` optimizer steps of this run have finished."""
        if steps_done <= 0:
            return self.start
        return self.start + (steps_done * self.accumulate - self.phase) * self.samples_per_micro_step
