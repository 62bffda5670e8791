"""Sequence parallelism without processes: how a micro-batch is cut into chunks, the GQA head arithmetic, the
pre-shifted loss, and the errors for settings P does not divide. The multi-process equality with P = 1 is in
tests/distributed/test_sequence_parallel.py."""

from __future__ import annotations

import pytest
import torch

from prolong_lit.data.format import PackedBatch
from prolong_lit.model.loss import chunked_cross_entropy_sum
from prolong_lit.model.module import LongContextLM
from prolong_lit.model.sequence_batch import shard_batch
from prolong_lit.model.settings import KernelSettings, LlamaSettings
from prolong_lit.parallel.plan import ParallelPlan, check_sequence_parallel_size
from prolong_lit.parallel.sequence import SequenceParallel, chunk_boundaries, shift_labels
from prolong_lit.parallel.strategy import FSDP2Strategy
from prolong_lit.parallel.ulysses import kv_head_repeats
from tests.helpers.model_batches import IGNORE_INDEX, make_packed_batch

VOCAB = 256
OVERRIDES = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
STRADDLING = [[10, 30, 24], [64], [5, 1, 50, 8]]  # documents across the chunk boundaries of P = 2 and 4
ALIGNED = [[16, 16, 16, 16], [8, 8, 16, 4, 12, 16]]  # every multiple of 16 is a document boundary


def shards(batch: PackedBatch, size: int) -> list[PackedBatch]:
    return [shard_batch(batch, SequenceParallel(group=None, rank=r, size=size), check_same=False) for r in range(size)]


@pytest.mark.parametrize("size", [2, 4])
def test_chunks_reassemble_the_row_with_labels_shifted_before_the_cut(size):
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=3)
    parts = shards(batch, size)
    for key in ("input_ids", "position_ids"):
        # contiguous chunks, global positions
        assert torch.equal(torch.cat([getattr(p, key) for p in parts], dim=1), getattr(batch, key))
    labels = torch.cat([p.labels for p in parts], dim=1)  # (B, L)
    assert torch.equal(labels[:, :-1], batch.labels[:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()
    # a chunk's last position keeps its target: the next chunk's first token (inside the 64-token document)
    chunk = 64 // size
    assert parts[0].labels[1, -1] == batch.input_ids[1, chunk]
    assert sum(int(p.loss_tokens) for p in parts) == int(batch.loss_tokens)
    for p in parts:  # documents cross chunk boundaries: attention exchanges, with the global boundaries
        assert p.labels_shifted and p.sequence_exchange
        assert torch.equal(p.cu_seq_lens, batch.cu_seq_lens) and p.max_seqlen == batch.max_seqlen
        assert p.step_loss_tokens is batch.step_loss_tokens


def test_documents_inside_chunks_skip_the_exchange_with_local_boundaries():
    batch = make_packed_batch(ALIGNED, vocab=VOCAB, seed=4)
    parts = shards(batch, 4)
    assert all(p.labels_shifted and not p.sequence_exchange for p in parts)
    # rank 1 holds tokens 16..31 of each row: row 0 one document of 16, row 1 documents of 16 | of 4 and of 12
    assert parts[1].cu_seq_lens.tolist() == [0, 16, 32]
    assert parts[2].cu_seq_lens.tolist() == [0, 16, 20, 32] and parts[2].max_seqlen == 16
    assert parts[0].cu_seq_lens.tolist() == [0, 16, 24, 32]
    assert parts[0].cu_seq_lens.dtype == torch.int32
    # P = 8 (chunks of 8): 16 + 4 = 20 and 24 are not boundaries of row 1, so its documents straddle
    assert chunk_boundaries(batch.cu_seq_lens.tolist(), rows=2, length=64, size=8, rank=0) is None


def test_pre_shifted_labels_give_the_same_loss():
    torch.manual_seed(0)
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=5)
    hidden = torch.randn(3, 64, 16)  # (B, L, d)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    plain = chunked_cross_entropy_sum(hidden, batch.labels, head, chunk_size=7)
    shifted = chunked_cross_entropy_sum(hidden, shift_labels(batch.labels), head, chunk_size=7,
                                        labels_shifted=True)
    assert int(plain[1]) == int(shifted[1]) == int(batch.loss_tokens)
    assert torch.allclose(plain[0], shifted[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size", "repeats"),
    [(32, 8, 8, 1), (32, 8, 16, 2), (32, 8, 32, 4), (4, 2, 2, 1), (4, 2, 4, 2), (4, 1, 4, 4), (8, 8, 2, 1)],
)
def test_kv_heads_repeat_the_fewest_times_p_divides(heads, kv_heads, size, repeats):
    assert kv_head_repeats(heads, kv_heads, size) == repeats
    assert (kv_heads * repeats) % size == 0 and heads % (kv_heads * repeats) == 0


def sequence_parallel_plan(size: int, world_size: int | None = None, global_rank: int = 0) -> ParallelPlan:
    """A plan with a sequence-parallel group of `size` built by hand (no process group: nothing here talks)."""
    group = SequenceParallel(group=None, rank=global_rank % size, size=size)
    return ParallelPlan(global_rank=global_rank, world_size=world_size or size, sequence_parallel=group)


def sequence_parallel_module(size: int, attn: str = "auto", **kwargs) -> LongContextLM:
    module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES),
                           kernels=KernelSettings(attn_implementation=attn), **kwargs)
    module.set_parallel_plan(sequence_parallel_plan(size))
    return module


SP = r"trainer\.strategy\.init_args\.sequence_parallel_size"


def test_settings_p_does_not_divide_get_a_clear_error():
    with pytest.raises(ValueError, match=SP + r" \(3\) must divide the number of attention"):
        sequence_parallel_module(3, seq_len=96).configure_model()
    with pytest.raises(ValueError, match=r"the training length \(66, data\.seq_len\) must be a multiple of " + SP):
        sequence_parallel_module(4, seq_len=66).configure_model()
    with pytest.raises(ValueError, match=r"model\.kernels\.attn_implementation: 'sdpa' cannot run with sequence par"):
        sequence_parallel_module(2, attn="sdpa").configure_model()
    with pytest.raises(ValueError, match=SP + " must be an integer >= 1"):
        FSDP2Strategy(sequence_parallel_size=0)
    with pytest.raises(ValueError, match=SP + " must be an integer >= 1"):
        check_sequence_parallel_size(0)
    batch = make_packed_batch([[30], [30]], vocab=VOCAB)
    with pytest.raises(ValueError, match=r"rows of 30 tokens do not split into " + SP + r" \(4\)"):
        shard_batch(batch, SequenceParallel(group=None, rank=0, size=4))
    with pytest.raises(ValueError, match=SP + r" \(3\) must divide the number of ranks \(8"):
        check_sequence_parallel_size(3, 8)
    two, one = sequence_parallel_plan(2, world_size=8, global_rank=5), ParallelPlan(global_rank=5, world_size=8)
    assert (two.data_parallel_rank, two.data_parallel_size) == (2, 4)
    assert (one.data_parallel_rank, one.data_parallel_size) == (5, 8)


def test_the_sequence_parallel_model_runs_an_unsharded_batch_alone_exactly():
    """Without an exchange asked by the batch the attention twin is its base: the same model still
    validates/generates."""
    batch = make_packed_batch(STRADDLING, vocab=VOCAB, seed=6)
    outputs = []
    for size in (1, 2):
        torch.manual_seed(0)
        module = LongContextLM(llama=LlamaSettings(name_or_path="tiny", overrides=OVERRIDES), seq_len=64)
        if size > 1:
            module.set_parallel_plan(sequence_parallel_plan(size))
        module.configure_model()
        assert module.model.config._attn_implementation == ("prolong_auto" if size == 1 else "prolong_sp_auto")
        with torch.no_grad():
            outputs.append(module(batch))
    assert torch.equal(outputs[0], outputs[1])
