"""Sequence parallelism without processes: how a micro-batch is cut into chunks, the GQA head arithmetic, the
pre-shifted loss, and the errors for settings P does not divide. The multi-process equality with P = 1 is in
tests/distributed/test_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch

from prolong_lit.model.loss import chunked_cross_entropy_sum
from prolong_lit.model.module import LongContextLM
from prolong_lit.parallel.sequence import (
    LABELS_SHIFTED,
    SequenceParallel,
    chunk_boundaries,
    data_parallel_rank_and_size,
    shard_batch,
    shift_labels,
)
from prolong_lit.parallel.ulysses import SP_KWARG, kv_head_repeats
from tests.helpers.model_batches import IGNORE_INDEX, make_packed_batch

VOCAB = 256
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
STRADDLING = [[10, 30, 24], [64], [5, 1, 50, 8]]  # documents across the chunk boundaries of P = 2 and 4
ALIGNED = [[16, 16, 16, 16], [8, 8, 16, 4, 12, 16]]  # every multiple of 16 is a document boundary


def shards(batch: dict, size: int) -> list[dict]:
    return [shard_batch(batch, SequenceParallel(group=None, rank=r, size=size), check_same=False) for r in range(size)]


@pytest.mark.parametrize("size", [2, 4])
def test_chunks_reassemble_the_row_with_labels_shifted_before_the_cut(size):
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=3)
    parts = shards(batch, size)
    for key in ("input_ids", "position_ids"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])  # contiguous chunks, global positions
    labels = torch.cat([p["labels"] for p in parts], dim=1)  # (B, L)
    assert torch.equal(labels[:, :-1], batch["labels"][:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()
    # a chunk's last position keeps its target: the next chunk's first token (inside the 64-token document)
    chunk = 64 // size
    assert parts[0]["labels"][1, -1] == batch["input_ids"][1, chunk]
    assert sum(int(p["loss_tokens"]) for p in parts) == int(batch["loss_tokens"])
    for p in parts:  # documents cross chunk boundaries: attention exchanges, with the global boundaries
        assert p[LABELS_SHIFTED] and p[SP_KWARG] is not None
        assert torch.equal(p["cu_seq_lens"], batch["cu_seq_lens"]) and p["max_seqlen"] == batch["max_seqlen"]
        assert p["step_loss_tokens"] is batch["step_loss_tokens"]


def test_documents_inside_chunks_skip_the_exchange_with_local_boundaries():
    batch = make_packed_batch(ALIGNED, vocab=VOCAB, seed=4)
    parts = shards(batch, 4)
    assert all(p[SP_KWARG] is None for p in parts)
    # rank 1 holds tokens 16..31 of each row: row 0 one document of 16, row 1 documents of 16 | of 4 and of 12
    assert parts[1]["cu_seq_lens"].tolist() == [0, 16, 32]
    assert parts[2]["cu_seq_lens"].tolist() == [0, 16, 20, 32] and parts[2]["max_seqlen"] == 16
    assert parts[0]["cu_seq_lens"].tolist() == [0, 16, 24, 32]
    assert parts[0]["cu_seq_lens"].dtype == torch.int32
    # P = 8 (chunks of 8): 16 + 4 = 20 and 24 are not boundaries of row 1, so its documents straddle
    assert chunk_boundaries(batch["cu_seq_lens"].tolist(), rows=2, length=64, size=8, rank=0) is None


def test_pre_shifted_labels_give_the_same_loss():
    torch.manual_seed(0)
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=5)
    hidden = torch.randn(3, 64, 16)  # (B, L, d)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    plain = chunked_cross_entropy_sum(hidden, batch["labels"], head, chunk_size=7)
    shifted = chunked_cross_entropy_sum(hidden, shift_labels(batch["labels"]), head, chunk_size=7,
                                        labels_shifted=True)
    assert int(plain[1]) == int(shifted[1]) == int(batch["loss_tokens"])
    assert torch.allclose(plain[0], shifted[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size", "repeats"),
    [(32, 8, 8, 1), (32, 8, 16, 2), (32, 8, 32, 4), (4, 2, 2, 1), (4, 2, 4, 2), (4, 1, 4, 4), (8, 8, 2, 1)],
)
def test_kv_heads_repeat_the_fewest_times_p_divides(heads, kv_heads, size, repeats):
    assert kv_head_repeats(heads, kv_heads, size) == repeats
    assert (kv_heads * repeats) % size == 0 and heads % (kv_heads * repeats) == 0


def test_settings_p_does_not_divide_get_a_clear_error():
    with pytest.raises(ValueError, match=r"model.sequence_parallel_size \(3\) must divide the number of attention"):
        LongContextLM(model="tiny", model_overrides=OVERRIDES, seq_len=96, sequence_parallel_size=3)
    with pytest.raises(ValueError, match=r"model.seq_len \(66\) must be a multiple of model.sequence_parallel_size"):
        LongContextLM(model="tiny", model_overrides=OVERRIDES, seq_len=66, sequence_parallel_size=4)
    with pytest.raises(ValueError, match=r"model.attn_implementation: 'sdpa' cannot run with model.sequence_par"):
        LongContextLM(model="tiny", model_overrides=OVERRIDES, attn_implementation="sdpa", sequence_parallel_size=2)
    with pytest.raises(ValueError, match=r"model.sequence_parallel_size must be an integer >= 1"):
        LongContextLM(model="tiny", model_overrides=OVERRIDES, sequence_parallel_size=0)
    batch = make_packed_batch([[30], [30]], vocab=VOCAB)
    with pytest.raises(ValueError, match=r"rows of 30 tokens do not split into model.sequence_parallel_size \(4\)"):
        shard_batch(batch, SequenceParallel(group=None, rank=0, size=4))
    with pytest.raises(ValueError, match=r"model.sequence_parallel_size \(3\) must divide the number of ranks \(8"):
        data_parallel_rank_and_size(0, 8, 3)
    assert data_parallel_rank_and_size(5, 8, 2) == (2, 4) and data_parallel_rank_and_size(5, 8, 1) == (5, 8)


def test_the_sequence_parallel_model_runs_an_unsharded_batch_alone_exactly():
    """Without a group in the batch the attention twin is its base: the same model still validates/generates."""
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=6)
    outputs = []
    for size in (1, 2):
        torch.manual_seed(0)
        module = LongContextLM(model="tiny", model_overrides=OVERRIDES, seq_len=64, sequence_parallel_size=size)
        module.configure_model()
        assert module.model.config._attn_implementation == ("prolong_auto" if size == 1 else "prolong_sp_auto")
        with torch.no_grad():
            outputs.append(module(batch))
    assert torch.equal(outputs[0], outputs[1])
