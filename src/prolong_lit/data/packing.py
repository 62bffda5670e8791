"""Packing tokenized documents into fixed-length samples.

The kept documents of a domain are appended to a flat on-disk token file (`TokenStore`), so memory stays flat
however large the domain is. Packing then only plans: each sample is a list of spans `[start, end)` into that
file, one span per document piece, whose lengths sum to `seq_len`. Three modes, as in ProLong:

- `slice` (long data): every document is cut into consecutive `seq_len` slices; each sample is one slice of
  one document; the remainder shorter than `seq_len` is dropped.
- `concat` (short data): documents, in a given (seeded, shuffled) order, are concatenated and cut every
  `seq_len` tokens; the cut tail of the last document starts the next sample; the final partial sample is
  dropped.
- `sft` (chat data): conversations, in a given (seeded, shuffled) order, are concatenated; a conversation
  that does not fit in what is left of a sample fills it with its prefix and the rest of it is discarded (not
  carried over, as ProLong did for SFT), so every sample starts with a whole conversation's start. Documents
  must be at most `seq_len` tokens (longer ones are dropped before planning). The final partial sample is
  dropped.

`SampleBuilder` turns a planned sample into the stored dict (see `format.py`); `litdata.optimize` calls it.
A per-token loss mask (for chat data) rides along in a parallel uint8 file when any document has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK

TOKEN_DTYPE = np.int32
MASK_DTYPE = np.uint8
MODES = ("slice", "concat", "sft")


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
    mode: str, store: TokenStore, seq_len: int, seed: int, domain: str
) -> tuple[list[np.ndarray], dict[str, int]]:
    """The planned samples of a domain in `mode` (slice, concat or sft; concat and sft shuffle the documents
    with `seed`), and the tokens dropped per cause (the manifest's `dropped_tokens`)."""
    if mode == "slice":
        plan, dropped = plan_slices(store.starts, store.lengths, seq_len)
        return plan, {"slice_remainder": dropped}
    order = shuffled_order(len(store.lengths), seed, domain)
    if mode == "concat":
        plan, dropped = plan_concat(store.starts, store.lengths, order, seq_len)
        return plan, {"final_partial_sample": dropped}
    if mode == "sft":
        plan, truncated, partial = plan_sft(store.starts, store.lengths, order, seq_len)
        return plan, {"truncated_remainder": truncated, "final_partial_sample": partial}
    raise ValueError(f"unknown packing mode {mode!r} (choose from {', '.join(MODES)})")


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
    """Builds a stored sample from its planned spans; picklable, so `litdata.optimize` workers can call it.

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
        sample = {
            INPUT_IDS: np.concatenate([self._tokens[a:b] for a, b in spans]).astype(np.int32),
            DOC_LENGTHS: doc_lengths,
        }
        if self._mask is not None:
            sample[LOSS_MASK] = np.concatenate([self._mask[a:b] for a, b in spans]).astype(np.uint8)
        return sample
