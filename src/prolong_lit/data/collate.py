"""Turn packed samples into the micro-batch the LightningModule consumes (docs/batch-contract.md).

Every row holds `seq_len` tokens made of whole or cut documents (`doc_lengths`). Attention and loss never cross
a document boundary: `position_ids` restart at 0 in every document, `cu_seq_lens` lists the document boundaries
over the flattened rows (what flash-attn varlen wants), and the first token of every document gets no label
(nothing before it in its document predicts it). Labels are not shifted: position t's output is compared with
labels[t + 1] by the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from prolong_lit.constants import IGNORE_INDEX
from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK, PackedBatch
from prolong_lit.errors import DataError


def _check_sample(sample: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.asarray(sample[INPUT_IDS])
    doc_lengths = np.asarray(sample[DOC_LENGTHS], dtype=np.int64)
    if doc_lengths.size == 0 or doc_lengths.min() < 1 or int(doc_lengths.sum()) != input_ids.shape[0]:
        raise DataError(
            f"data.data_dir: a sample's doc_lengths {doc_lengths.tolist()} must be positive and sum to its "
            f"{input_ids.shape[0]} tokens; the prepared data is corrupt, run `prepare` again"
        )
    return input_ids, doc_lengths


def doc_starts(doc_lengths: np.ndarray) -> np.ndarray:
    """Positions where a document starts in a row (the first is always 0)."""
    return np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)  # (k,)


def sample_labels(sample: Mapping[str, np.ndarray]) -> np.ndarray:
    """Labels of one row: the tokens, with -100 at every document start and wherever loss_mask == 0."""
    input_ids, doc_lengths = _check_sample(sample)
    labels = input_ids.astype(np.int64)  # (L,)
    labels[doc_starts(doc_lengths)] = IGNORE_INDEX
    if LOSS_MASK in sample:
        labels[np.asarray(sample[LOSS_MASK]) == 0] = IGNORE_INDEX
    return labels


def sample_loss_tokens(sample: Mapping[str, np.ndarray]) -> int:
    """Positions of one row whose label is predicted (labels[1:] != -100)."""
    if LOSS_MASK not in sample:
        # every position but the document starts; position 0 is one of them
        _, doc_lengths = _check_sample(sample)
        return int(doc_lengths.sum() - doc_lengths.size)
    return int((sample_labels(sample)[1:] != IGNORE_INDEX).sum())


def position_ids(doc_lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at every document start."""
    length = int(doc_lengths.sum())
    return np.arange(length, dtype=np.int64) - np.repeat(doc_starts(doc_lengths), doc_lengths)  # (L,)


def collate_samples(
    samples: Sequence[Mapping[str, np.ndarray]],
    domain_ids: Sequence[int],
    sample_index: Sequence[int],
    step_loss_tokens: int | None = None,
) -> PackedBatch:
    """Build a micro-batch of B = len(samples) rows.

    Args:
        samples: dicts with input_ids (L,), doc_lengths (k,) and optionally loss_mask (L,); all of the same L.
        domain_ids: each row's index in the DataModule's sorted domain list.
        sample_index: each row's global stream index.
        step_loss_tokens: loss tokens of the whole optimizer step over all ranks; None means this batch alone
            (validation).
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    lengths = {len(s[INPUT_IDS]) for s in samples}
    if len(lengths) != 1:
        raise DataError(f"data.data_dir: rows of one micro-batch have different lengths {sorted(lengths)}")
    rows = [_check_sample(s) for s in samples]
    input_ids = torch.from_numpy(np.stack([ids.astype(np.int64) for ids, _ in rows]))  # (B, L)
    labels = torch.from_numpy(np.stack([sample_labels(s) for s in samples]))  # (B, L)
    positions = torch.from_numpy(np.stack([position_ids(doc_lengths) for _, doc_lengths in rows]))  # (B, L)
    all_lengths = np.concatenate([doc_lengths for _, doc_lengths in rows])  # (num_docs,)
    # every row sums to L, so row b's boundaries land after row b-1's in the flattened B*L tokens
    bounds = np.concatenate([[0], np.cumsum(all_lengths)])  # (num_docs + 1,)
    cu_seq_lens = torch.from_numpy(bounds.astype(np.int32))
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=positions,
        cu_seq_lens=cu_seq_lens,  # (num_docs + 1,)
        max_seqlen=int(all_lengths.max()),
        domain_ids=torch.as_tensor(np.asarray(domain_ids, dtype=np.int64)),  # (B,)
        sample_index=torch.as_tensor(np.asarray(sample_index, dtype=np.int64)),  # (B,)
        loss_tokens=torch.tensor(loss_tokens, dtype=torch.int64),
        step_loss_tokens=torch.tensor(loss_tokens if step_loss_tokens is None else step_loss_tokens, dtype=torch.int64),
        doc_bounds=tuple(int(b) for b in bounds),  # host side: attention reads no boundary back from the GPU
    )
