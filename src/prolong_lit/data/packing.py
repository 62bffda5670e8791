"""Packing tokenized documents into fixed-length samples.

The kept documents of a domain are appended to a flat on-disk token file (`TokenStore`), so memory stays flat
however large the domain is. Packing then only plans: each sample is a list of spans `[start, end)` into that
file, one span per document piece, whose lengths sum to `seq_len`. Four modes, as in ProLong:

- `slice` (long data): every document is cut into consecutive `seq_len` slices; each sample is one slice of
  one document; the remainder shorter than `seq_len` is dropped.
- `slice_pack` (long data, packed shorter): every document is cut into consecutive `slice_length` slices (the
  remainder dropped), each slice is its own document, and the slices, shuffled with the seed, are packed
  `seq_len / slice_length` per sample. ProLong's stage-2 `-65536` subsets: 64K slices, eight per 512K row.
- `concat` (short data): documents, in a given (seeded, shuffled) order, are concatenated and cut every
  `seq_len` tokens; the cut tail of the last document starts the next sample; the final partial sample is
  dropped.
- `sft` (chat data): conversations, in a given (seeded, shuffled) order, are concatenated; a conversation
  that does not fit in what is left of a sample fills it with its prefix and the rest of it is discarded (not
  carried over, as ProLong did for SFT), so every sample starts with a whole conversation's start. Documents
  must be at most `seq_len` tokens (longer ones are dropped before planning). The final partial sample is
  dropped.

`SampleBuilder` turns a planned sample into the stored dict (see `format.py`); `write.write_domain` calls it.
A per-token loss mask (for chat data) rides along in a parallel uint8 file when any document has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK
from prolong_lit.errors import ConfigError

if TYPE_CHECKING:
    from prolong_lit.data.prepare import DomainConfig

TOKEN_DTYPE = np.int32
MASK_DTYPE = np.uint8
MODES = ("slice", "slice_pack", "concat", "sft")


class TokenStore:
    """Append-only files of one domain's kept documents: tokens (int32) and, if any document has one, its
    loss mask (uint8; documents without a mask get all ones).

    Args:
        directory: where the files go (a scratch directory; they are not part of the prepared data).
        name: file name stem.
    """

    def __init__(self, directory: str | Path, name: str) -> None:
        self.tokens_path = Path(directory) / f"{name}.tokens"
        self.mask_path = Path(directory) / f"{name}.mask"
        self.starts: list[int] = []
        self.lengths: list[int] = []
        self.num_tokens = 0
        self.has_mask = False
        self._tokens = open(self.tokens_path, "wb")
        self._mask = None

    def append(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one document (its token ids and optional per-token loss mask)."""
        if mask is not None and len(mask) != len(ids):
            raise ValueError(f"loss mask of {len(mask)} tokens for a document of {len(ids)} tokens")
        if mask is not None and self._mask is None:
            self._mask = open(self.mask_path, "wb")
            self._mask.write(np.ones(self.num_tokens, MASK_DTYPE).tobytes())  # the documents before had none
            self.has_mask = True
        self._tokens.write(np.asarray(ids, TOKEN_DTYPE).tobytes())
        if self._mask is not None:
            self._mask.write(
                (np.ones(len(ids), MASK_DTYPE) if mask is None else np.asarray(mask, MASK_DTYPE)).tobytes()
            )
        self.starts.append(self.num_tokens)
        self.lengths.append(len(ids))
        self.num_tokens += len(ids)

    def close(self) -> None:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()

    def tokens(self) -> np.ndarray:
        return np.memmap(self.tokens_path, dtype=TOKEN_DTYPE, mode="r") if self.num_tokens else np.zeros(0, TOKEN_DTYPE)


def plan_slices(starts: Sequence[int], lengths: Sequence[int], seq_len: int) -> tuple[list[np.ndarray], int]:
    """Cut every document into consecutive `seq_len` slices (a sample = one slice of one document).

    Returns the samples (each an int64 array of one span `[[start, end)]`) and the number of tokens dropped
    as remainders shorter than `seq_len`.
    """
    plan, dropped = [], 0
    for start, length in zip(starts, lengths):
        n = length // seq_len
        plan.extend(np.array([[start + i * seq_len, start + (i + 1) * seq_len]], np.int64) for i in range(n))
        dropped += length - n * seq_len
    return plan, dropped


def plan_slice_pack(
    starts: Sequence[int], lengths: Sequence[int], slice_length: int, seq_len: int, seed: int, domain: str
) -> tuple[list[np.ndarray], int, int]:
    """Cut every document into consecutive `slice_length` slices and pack them `seq_len // slice_length` per
    sample, in an order shuffled with (`seed`, `domain`), each slice its own document.

    Each slice keeps its own span, so a sample's document lengths are all `slice_length` and attention never
    crosses a slice boundary, even between two slices of one document that land side by side. Shuffling the
    slices (not the documents) mixes documents within a row, as ProLong's shuffled release does. Returns the
    samples (each an int64 array `(seq_len // slice_length, 2)` of spans `[start, end)`), the tokens dropped as
    remainders shorter than `slice_length`, and the tokens of the slices left over for a final partial sample
    (dropped).
    """
    if slice_length <= 0 or seq_len % slice_length:
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of slice_length ({slice_length})")
    slices, remainder = plan_slices(starts, lengths, slice_length)
    per_sample = seq_len // slice_length
    order = shuffled_order(len(slices), seed, domain)
    full = len(order) - len(order) % per_sample
    plan = [
        np.concatenate([slices[i] for i in order[k : k + per_sample]]) for k in range(0, full, per_sample)
    ]
    return plan, remainder, (len(order) - full) * slice_length


def plan_concat(
    starts: Sequence[int], lengths: Sequence[int], order: Sequence[int], seq_len: int
) -> tuple[list[np.ndarray], int]:
    """Concatenate the documents in `order` and cut every `seq_len` tokens.

    A document cut at a sample's end continues at the start of the next sample. Returns the samples (each an
    int64 array `(k, 2)` of spans `[start, end)`, one per document piece) and the number of tokens in the
    final partial sample, which is dropped.
    """
    plan: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    filled = 0
    for doc in order:
        start, length = int(starts[doc]), int(lengths[doc])
        pos = 0
        while pos < length:
            take = min(length - pos, seq_len - filled)
            spans.append((start + pos, start + pos + take))
            filled += take
            pos += take
            if filled == seq_len:
                plan.append(np.array(spans, np.int64))
                spans, filled = [], 0
    return plan, filled


def plan_sft(
    starts: Sequence[int], lengths: Sequence[int], order: Sequence[int], seq_len: int
) -> tuple[list[np.ndarray], int, int]:
    """Concatenate the documents (conversations) in `order`; the one that does not fit is truncated.

    Returns the samples (each an int64 array `(k, 2)` of spans `[start, end)`, one per conversation), the tokens
    discarded from truncated conversations, and the tokens of the final partial sample (dropped).
    """
    plan: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    filled = truncated = 0
    for doc in order:
        start, length = int(starts[doc]), int(lengths[doc])
        if length > seq_len:
            raise ValueError(f"a document of {length} tokens is longer than seq_len ({seq_len}); drop it first")
        take = min(length, seq_len - filled)
        spans.append((start, start + take))
        filled += take
        truncated += length - take
        if filled == seq_len:
            plan.append(np.array(spans, np.int64))
            spans, filled = [], 0
    return plan, truncated, filled


def plan_samples(
    mode: str, store: TokenStore, seq_len: int, seed: int, domain: str, slice_length: int | None = None
) -> tuple[list[np.ndarray], dict[str, int]]:
    """The planned samples of a domain in `mode` (slice, slice_pack, concat or sft; slice_pack shuffles the
    slices, concat and sft the documents, with `seed`), and the tokens dropped per cause (the manifest's
    `dropped_tokens`). `slice_length` is slice_pack's slice length."""
    if mode == "slice":
        plan, dropped = plan_slices(store.starts, store.lengths, seq_len)
        return plan, {"slice_remainder": dropped}
    if mode == "slice_pack":
        if slice_length is None:
            raise ValueError("mode slice_pack needs a slice_length")
        plan, remainder, partial = plan_slice_pack(store.starts, store.lengths, slice_length, seq_len, seed, domain)
        return plan, {"slice_remainder": remainder, "final_partial_sample": partial}
    order = shuffled_order(len(store.lengths), seed, domain)
    if mode == "concat":
        plan, dropped = plan_concat(store.starts, store.lengths, order, seq_len)
        return plan, {"final_partial_sample": dropped}
    if mode == "sft":
        plan, truncated, partial = plan_sft(store.starts, store.lengths, order, seq_len)
        return plan, {"truncated_remainder": truncated, "final_partial_sample": partial}
    raise ValueError(f"unknown packing mode {mode!r} (choose from {', '.join(MODES)})")


# ---- which documents a domain keeps ----


def length_limits(domain: DomainConfig, seq_len: int) -> tuple[int, int | None]:
    """The (min, max) document length a domain keeps, defaults applied (see `DomainConfig`); max None = no
    limit. Slices need documents at least as long as a slice; a conversation longer than seq_len fits no sample."""
    shortest = {"slice": seq_len, "slice_pack": domain.slice_length}.get(domain.mode) or 1
    longest = domain.max_length
    if domain.mode == "sft":
        longest = seq_len if longest is None else min(longest, seq_len)
    return domain.min_length or shortest, longest


def check_lengths(setting: str, domain: DomainConfig, seq_len: int) -> None:
    """Raise an error naming `setting` (`domains.<name>`) unless a domain's slice_length (mode slice_pack only),
    min_length and max_length fit its mode and seq_len."""
    if domain.mode == "slice_pack":
        if domain.slice_length is None:
            raise ConfigError(f"{setting}.slice_length: mode slice_pack needs a slice length (e.g. 65536)")
        if domain.slice_length < 1 or seq_len % domain.slice_length:
            raise ConfigError(
                f"{setting}.slice_length ({domain.slice_length}): seq_len ({seq_len}) must be a multiple of it, "
                "so that every sample holds seq_len / slice_length whole slices"
            )
    elif domain.slice_length is not None:
        raise ConfigError(f"{setting}.slice_length: only mode slice_pack reads it (mode is {domain.mode})")
    for key in ("min_length", "max_length"):
        if getattr(domain, key) is not None and getattr(domain, key) < 1:
            raise ConfigError(f"{setting}.{key}: must be >= 1 (got {getattr(domain, key)})")
    needed = {"slice": ("seq_len", seq_len), "slice_pack": ("slice_length", domain.slice_length)}.get(domain.mode)
    if needed and domain.min_length is not None and domain.min_length < needed[1]:
        raise ConfigError(
            f"{setting}.min_length ({domain.min_length}) must be >= {needed[0]} ({needed[1]}) in {domain.mode} "
            "mode: a shorter document gives no slice (use mode: concat to pack short documents)"
        )
    if domain.mode == "sft" and domain.max_length is not None and domain.max_length > seq_len:
        raise ConfigError(
            f"{setting}.max_length ({domain.max_length}) must be <= seq_len ({seq_len}) in sft mode: a longer "
            "conversation fits no sample"
        )
    shortest, longest = length_limits(domain, seq_len)
    if longest is not None and longest < shortest:
        raise ConfigError(
            f"{setting}.max_length ({longest}) is below the minimum length ({shortest}): no document would be kept"
        )


def shuffled_order(num_docs: int, seed: int, domain: str) -> np.ndarray:
    """A seeded permutation of the documents; each domain gets its own stream from the same seed."""
    return np.random.default_rng([seed, *domain.encode()]).permutation(num_docs)


def max_token_id(plan: Sequence[np.ndarray], tokens: np.ndarray) -> int:
    """The largest token id written in the planned samples (-1 if none)."""
    best = -1
    for spans in plan:
        for start, end in spans:
            best = max(best, int(tokens[start:end].max()))
    return best


class SampleBuilder:
    """Builds a stored sample from its planned spans (picklable, so a worker process could call it).

    Args:
        tokens_path: the `TokenStore` token file.
        mask_path: the `TokenStore` loss-mask file, or None when the domain has no mask.
        seq_len: the packing length every sample must have.
    """

    def __init__(self, tokens_path: str | Path, mask_path: str | Path | None, seq_len: int) -> None:
        self.tokens_path = str(tokens_path)
        self.mask_path = str(mask_path) if mask_path is not None else None
        self.seq_len = seq_len
        self._tokens: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # memory maps are reopened in the worker, not pickled
        return {**self.__dict__, "_tokens": None, "_mask": None}

    def __call__(self, spans: np.ndarray) -> dict[str, np.ndarray]:
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=TOKEN_DTYPE, mode="r")
            if self.mask_path is not None:
                self._mask = np.memmap(self.mask_path, dtype=MASK_DTYPE, mode="r")
        doc_lengths = (spans[:, 1] - spans[:, 0]).astype(np.int32)
        if int(doc_lengths.sum()) != self.seq_len or (doc_lengths <= 0).any():
            raise AssertionError(f"a planned sample has document lengths {doc_lengths.tolist()}, not {self.seq_len}")
        sample = {INPUT_IDS: _gather(self._tokens, spans), DOC_LENGTHS: doc_lengths}
        if self._mask is not None:
            sample[LOSS_MASK] = _gather(self._mask, spans)
        return sample


def _gather(values: np.memmap, spans: np.ndarray) -> np.ndarray:
    """values[a:b] of every span, concatenated, as a plain ndarray. Contiguous spans (a whole row of mode rows,
    one slice) give a read-only view of the memory map, not a copy: litdata serializes it with `tobytes` either
    way, so the stored bytes are the same."""
    if len(spans) == 1 or bool((spans[1:, 0] == spans[:-1, 1]).all()):
        return values[spans[0, 0]:spans[-1, 1]].view(np.ndarray)
    return np.concatenate([values[a:b] for a, b in spans]).view(np.ndarray)
