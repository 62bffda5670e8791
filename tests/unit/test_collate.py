"""collate_samples against a hand-built micro-batch, and the per-sample loss-token count it relies on."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from prolong_lit.data.collate import collate_samples, sample_loss_tokens
from prolong_lit.data.format import PackedBatch
from tests.helpers.data_factory import make_sample


def _hand_samples():
    plain = {"input_ids": np.arange(10, 16, dtype=np.int32), "doc_lengths": np.array([2, 4], dtype=np.int32)}
    chat = {
        "input_ids": np.arange(20, 26, dtype=np.int32),
        "doc_lengths": np.array([3, 3], dtype=np.int32),
        "loss_mask": np.array([1, 1, 0, 1, 1, 1], dtype=np.uint8),
    }
    return [plain, chat]


def test_collate_matches_hand_built_batch():
    batch = collate_samples(_hand_samples(), domain_ids=[1, 0], sample_index=[5, 9], step_loss_tokens=100)
    expected = {
        "input_ids": torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]]),
        # -100 at document starts (0 and 2; 0 and 3) and where loss_mask == 0 (row 1, position 2)
        "labels": torch.tensor([[-100, 11, -100, 13, 14, 15], [-100, 21, -100, -100, 24, 25]]),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]),
        "cu_seq_lens": torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32),
        "domain_ids": torch.tensor([1, 0]),
        "sample_index": torch.tensor([5, 9]),
        "loss_tokens": torch.tensor(7),
        "step_loss_tokens": torch.tensor(100),
    }
    assert isinstance(batch, PackedBatch)
    # the collated fields; the sequence-parallel flags keep their defaults (a whole, unshifted batch)
    assert {f.name for f in fields(batch)} == set(expected) | {"max_seqlen", "labels_shifted", "sequence_exchange",
                                                               "doc_bounds"}
    assert (batch.labels_shifted, batch.sequence_exchange) == (False, False)
    assert batch.doc_bounds == (0, 2, 6, 9, 12) and all(type(b) is int for b in batch.doc_bounds)  # host side
    for key, value in expected.items():
        assert getattr(batch, key).dtype == value.dtype, key
        assert torch.equal(getattr(batch, key), value), key
    assert batch.max_seqlen == 4 and isinstance(batch.max_seqlen, int)


def test_validation_batch_carries_its_own_loss_tokens():
    batch = collate_samples(_hand_samples(), domain_ids=[1, 0], sample_index=[0, 1])
    assert int(batch.step_loss_tokens) == int(batch.loss_tokens) == 7


def test_sample_loss_tokens_matches_a_position_by_position_count():
    rows = [make_sample(i, "books", 97, with_loss_mask=i % 2 == 1) for i in range(20)]
    for row in rows:
        starts = set(np.cumsum(row["doc_lengths"])[:-1].tolist()) | {0}
        mask = row.get("loss_mask", np.ones(97, dtype=np.uint8))
        expected = sum(1 for t in range(1, 97) if t not in starts and mask[t] == 1)
        assert sample_loss_tokens(row) == expected
    batch = collate_samples(rows, domain_ids=[0] * 20, sample_index=list(range(20)))
    assert int(batch.loss_tokens) == sum(sample_loss_tokens(r) for r in rows)
    assert batch.cu_seq_lens[-1] == 20 * 97
    assert batch.max_seqlen == max(int(r["doc_lengths"].max()) for r in rows)


def test_collate_rejects_corrupt_samples():
    bad = {"input_ids": np.arange(6, dtype=np.int32), "doc_lengths": np.array([2, 3], dtype=np.int32)}
    with pytest.raises(ValueError, match="data.data_dir: .* sum to its 6 tokens"):
        collate_samples([bad], domain_ids=[0], sample_index=[0])
    short = {"input_ids": np.arange(5, dtype=np.int32), "doc_lengths": np.array([5], dtype=np.int32)}
    with pytest.raises(ValueError, match="different lengths"):
        collate_samples([_hand_samples()[0], short], domain_ids=[0, 0], sample_index=[0, 1])
