"""Packing plans (slice, slice_pack, concat and sft), the on-disk token store with optional loss masks, and the
written samples read back with litdata. References are built independently from the flat token streams."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from prolong_lit.data.format import DOC_LENGTHS, INPUT_IDS, LOSS_MASK
from prolong_lit.data.packing import (
    SampleBuilder,
    TokenStore,
    max_token_id,
    plan_concat,
    plan_samples,
    plan_sft,
    plan_slice_pack,
    plan_slices,
    shuffled_order,
)


def random_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=n).astype(np.int32) for n in lengths]


def store_of(tmp_path, docs, masks=None):
    store = TokenStore(tmp_path, "d")
    for i, ids in enumerate(docs):
        store.append(ids, None if masks is None else masks[i])
    store.close()
    return store


def build_all(store, plan, seq_len):
    builder = SampleBuilder(store.tokens_path, store.mask_path if store.has_mask else None, seq_len)
    return [builder(spans) for spans in plan]


def test_slices_are_consecutive_and_drop_the_remainder(tmp_path):
    seq_len = 16
    lengths = [50, 16, 15, 33, 64]  # 3 slices (2 dropped), 1, 0 (15 dropped), 2 (1 dropped), 4
    docs = random_docs(lengths)
    store = store_of(tmp_path, docs)
    plan, dropped = plan_slices(store.starts, store.lengths, seq_len)
    assert dropped == 2 + 15 + 1
    expected = [doc[i * seq_len : (i + 1) * seq_len] for doc in docs for i in range(len(doc) // seq_len)]
    samples = build_all(store, plan, seq_len)
    assert len(samples) == len(expected) == 10
    for sample, ref in zip(samples, expected):
        np.testing.assert_array_equal(sample[INPUT_IDS], ref)
        assert sample[DOC_LENGTHS].tolist() == [seq_len]  # one document per sample
        assert sample[INPUT_IDS].dtype == np.int32 and sample[DOC_LENGTHS].dtype == np.int32


def test_slice_pack_packs_whole_slices_each_its_own_document(tmp_path):
    slice_length, seq_len = 8, 32  # four slices per row
    lengths = [8, 20, 33, 64, 7, 17, 40, 9, 31]
    docs = random_docs(lengths, seed=9)
    store = store_of(tmp_path, docs)
    plan, remainder, partial = plan_slice_pack(store.starts, store.lengths, slice_length, seq_len, 3, "books")
    # reference: every whole slice of every document, as (document, slice index); remainders are what is left
    slices = [(d, i) for d, n in enumerate(lengths) for i in range(n // slice_length)]
    assert remainder == sum(n % slice_length for n in lengths) == 0 + 4 + 1 + 0 + 7 + 1 + 0 + 1 + 7
    assert len(plan) == len(slices) // 4 and partial == len(slices) % 4 * slice_length
    seen = []
    for sample, spans in zip(build_all(store, plan, seq_len), plan):
        assert sample[DOC_LENGTHS].tolist() == [slice_length] * 4  # a document boundary at every slice
        for k, (a, b) in enumerate(spans):
            d = int(np.searchsorted(store.starts, a, side="right")) - 1
            i, offset = divmod(int(a) - store.starts[d], slice_length)
            assert offset == 0 and b - a == slice_length  # a whole slice, starting at a slice boundary
            np.testing.assert_array_equal(sample[INPUT_IDS][k * slice_length : (k + 1) * slice_length],
                                          docs[d][i * slice_length : (i + 1) * slice_length])
            seen.append((d, i))
    # every slice at most once; nothing lost but the remainders and the final partial row
    assert len(set(seen)) == len(seen) == len(slices) - len(slices) % 4 and set(seen) <= set(slices)
    assert len(seen) * slice_length + remainder + partial == sum(lengths)
    assert seen != sorted(seen)  # slices shuffled across rows, with the seed
    again, _, _ = plan_slice_pack(store.starts, store.lengths, slice_length, seq_len, 3, "books")
    other, _, _ = plan_slice_pack(store.starts, store.lengths, slice_length, seq_len, 4, "books")
    assert [s.tolist() for s in again] == [s.tolist() for s in plan] != [s.tolist() for s in other]
    # through plan_samples: the manifest's causes; seq_len must be a multiple of slice_length
    assert plan_samples("slice_pack", store, seq_len, 3, "books", slice_length)[1] == {
        "slice_remainder": remainder, "final_partial_sample": partial}
    with pytest.raises(ValueError, match=r"seq_len \(32\) must be a positive multiple of slice_length \(12\)"):
        plan_slice_pack(store.starts, store.lengths, 12, seq_len, 3, "books")
    with pytest.raises(ValueError, match="slice_pack needs a slice_length"):
        plan_samples("slice_pack", store, seq_len, 3, "books")


def test_concat_carries_the_cut_tail_to_the_next_sample(tmp_path):
    seq_len = 10
    lengths = [4, 9, 3, 25, 2, 6]  # 49 tokens: 4 samples, 9 tokens in the final partial sample
    docs = random_docs(lengths, seed=1)
    store = store_of(tmp_path, docs)
    order = [5, 0, 3, 1, 4, 2]
    plan, dropped = plan_concat(store.starts, store.lengths, order, seq_len)
    stream = np.concatenate([docs[i] for i in order])  # reference: the documents in order, cut every seq_len
    assert dropped == len(stream) % seq_len == 9
    samples = build_all(store, plan, seq_len)
    assert len(samples) == len(stream) // seq_len == 4
    for k, sample in enumerate(samples):
        np.testing.assert_array_equal(sample[INPUT_IDS], stream[k * seq_len : (k + 1) * seq_len])
        assert int(sample[DOC_LENGTHS].sum()) == seq_len
    # doc 5 (6) + doc 0 (4) fill sample 0; doc 3 (25) fills samples 1 and 2 and its last 5 tokens open sample 3,
    # which doc 1 completes (its other 4 tokens, doc 4 and doc 2 are the dropped partial sample)
    assert [s[DOC_LENGTHS].tolist() for s in samples] == [[6, 4], [10], [10], [5, 5]]
    # the tail of doc 3 (cut at the end of sample 2) is the first piece of sample 3
    np.testing.assert_array_equal(samples[3][INPUT_IDS][:5], docs[3][20:25])


def test_concat_every_document_boundary_is_kept(tmp_path):
    seq_len = 32
    lengths = np.random.default_rng(5).integers(1, 40, size=60).tolist()
    docs = random_docs(lengths, seed=2)
    store = store_of(tmp_path, docs)
    order = shuffled_order(len(docs), seed=3, domain="web")
    plan, dropped = plan_concat(store.starts, store.lengths, order, seq_len)
    # reference boundaries: cumulative document ends in the shuffled stream, also cut at every seq_len
    ends = np.cumsum([lengths[i] for i in order])
    cuts = sorted(set(ends.tolist()) | set(range(seq_len, int(ends[-1]), seq_len)))
    got = np.cumsum(np.concatenate([s[DOC_LENGTHS] for s in build_all(store, plan, seq_len)]))
    assert got.tolist() == [c for c in cuts if c <= len(plan) * seq_len]
    assert dropped == int(ends[-1]) - len(plan) * seq_len


def test_sft_truncates_the_conversation_that_does_not_fit_and_discards_its_rest(tmp_path):
    seq_len = 10
    lengths = [4, 9, 3, 10, 2, 6, 5]
    docs = random_docs(lengths, seed=6)
    masks = [(np.arange(n) % 3 == 0).astype(np.uint8) for n in lengths]
    store = store_of(tmp_path, docs, masks)
    order = [5, 0, 1, 3, 2, 4, 6]
    plan, truncated, partial = plan_sft(store.starts, store.lengths, order, seq_len)
    # by hand: [doc5 (6) + doc0 (4)], [doc1 (9) + doc3's first token; its other 9 discarded],
    # [doc2 (3) + doc4 (2) + doc6 (5)]; nothing left for a partial sample
    assert [spans.tolist() for spans in plan] == [
        [[store.starts[5], store.starts[5] + 6], [store.starts[0], store.starts[0] + 4]],
        [[store.starts[1], store.starts[1] + 9], [store.starts[3], store.starts[3] + 1]],
        [
            [store.starts[2], store.starts[2] + 3],
            [store.starts[4], store.starts[4] + 2],
            [store.starts[6], store.starts[6] + 5],
        ],
    ]
    assert (truncated, partial) == (9, 0)
    samples = build_all(store, plan, seq_len)
    assert [s[DOC_LENGTHS].tolist() for s in samples] == [[6, 4], [9, 1], [3, 2, 5]]
    # every piece is the START of its conversation, with the conversation's own mask
    np.testing.assert_array_equal(samples[1][INPUT_IDS], np.concatenate([docs[1], docs[3][:1]]))
    np.testing.assert_array_equal(samples[1][LOSS_MASK], np.concatenate([masks[1], masks[3][:1]]))
    np.testing.assert_array_equal(samples[2][INPUT_IDS], np.concatenate([docs[2], docs[4], docs[6]]))
    # a final partial sample is dropped; an exact fit truncates nothing
    plan, truncated, partial = plan_sft(store.starts, store.lengths, [3, 0, 2], seq_len)
    assert [s.tolist() for s in plan] == [[[store.starts[3], store.starts[3] + 10]]] and (truncated, partial) == (0, 7)
    with pytest.raises(ValueError, match="a document of 9 tokens is longer than seq_len \\(8\\)"):
        plan_sft(store.starts, store.lengths, [1], 8)


def test_sft_plan_against_a_token_by_token_reference(tmp_path):
    seq_len = 32
    lengths = np.random.default_rng(7).integers(1, seq_len + 1, size=80).tolist()
    store = store_of(tmp_path, random_docs(lengths, seed=8))
    plan, dropped = plan_samples("sft", store, seq_len, seed=1, domain="chat")
    # reference: walk the shuffled conversations token by token; a row is closed when full, and the
    # conversation that overflows it is abandoned
    rows, row, lost = [], [], 0
    for doc in shuffled_order(len(lengths), seed=1, domain="chat"):
        for t in range(lengths[doc]):
            if len(row) == seq_len:
                lost += lengths[doc] - t
                break
            row.append((doc, t))
        if len(row) == seq_len:
            rows.append(row)
            row = []
    assert dropped == {"truncated_remainder": lost, "final_partial_sample": len(row)}
    got = [[(doc, t) for a, b in spans for doc in [store.starts.index(a)] for t in range(b - a)] for spans in plan]
    assert got == rows and len(rows) > 10 and lost > 0
    assert plan_samples("concat", store, seq_len, 1, "chat")[1].keys() == {"final_partial_sample"}
    with pytest.raises(ValueError, match="unknown packing mode 'pack'"):
        plan_samples("pack", store, seq_len, 1, "chat")


def test_shuffled_order_is_seeded_per_domain():
    a = shuffled_order(100, seed=42, domain="web")
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() == shuffled_order(100, seed=42, domain="web").tolist()
    assert a.tolist() != shuffled_order(100, seed=43, domain="web").tolist()
    assert a.tolist() != shuffled_order(100, seed=42, domain="web2").tolist()
    assert a.tolist() != list(range(100))


def test_loss_mask_rides_along(tmp_path):
    seq_len = 8
    docs = random_docs([5, 6, 7], seed=3)
    masks = [None, np.array([0, 0, 1, 1, 1, 0], np.uint8), np.array([1, 0, 1, 0, 1, 0, 1], np.uint8)]
    store = store_of(tmp_path, docs, masks)
    assert store.has_mask  # the first document had none: it is backfilled with ones
    plan, dropped = plan_concat(store.starts, store.lengths, [0, 1, 2], seq_len)
    samples = build_all(store, plan, seq_len)
    full_mask = np.concatenate([np.ones(5, np.uint8), masks[1], masks[2]])
    for k, sample in enumerate(samples):
        assert sample[LOSS_MASK].dtype == np.uint8
        np.testing.assert_array_equal(sample[LOSS_MASK], full_mask[k * seq_len : (k + 1) * seq_len])
    with pytest.raises(ValueError, match="loss mask of 2 tokens for a document of 3 tokens"):
        TokenStore(tmp_path, "bad").append(np.zeros(3, np.int32), np.ones(2, np.uint8))


def test_store_without_masks_writes_none(tmp_path):
    store = store_of(tmp_path, random_docs([4, 4]))
    assert not store.has_mask and not store.mask_path.exists()
    assert LOSS_MASK not in build_all(store, plan_slices(store.starts, store.lengths, 4)[0], 4)[0]


def test_sample_builder_pickles_without_its_memory_map(tmp_path):
    store = store_of(tmp_path, random_docs([12]))
    builder = SampleBuilder(store.tokens_path, None, 4)
    first = builder(np.array([[0, 4]]))
    clone = pickle.loads(pickle.dumps(builder))
    assert clone._tokens is None
    np.testing.assert_array_equal(clone(np.array([[0, 4]]))[INPUT_IDS], first[INPUT_IDS])
    with pytest.raises(AssertionError, match="document lengths"):
        builder(np.array([[0, 3]]))


def test_max_token_id_counts_only_written_tokens(tmp_path):
    docs = [np.array([1, 2, 3, 4, 999], np.int32), np.array([7, 8, 9, 5], np.int32)]
    store = store_of(tmp_path, docs)
    plan, _ = plan_slices(store.starts, store.lengths, 4)  # 999 is in the dropped remainder
    assert max_token_id(plan, store.tokens()) == 9


def test_written_samples_read_back_with_litdata(tmp_path):
    from litdata import StreamingDataset

    from prolong_lit.data.write import write_domain

    seq_len = 16
    docs = random_docs([10, 30, 7, 21], seed=4)
    masks = [np.random.default_rng(i).integers(0, 2, size=len(d)).astype(np.uint8) for i, d in enumerate(docs)]
    store = store_of(tmp_path, docs, masks)
    plan, _ = plan_concat(store.starts, store.lengths, [3, 1, 0, 2], seq_len)
    expected = build_all(store, plan, seq_len)
    write_domain(store, plan, seq_len, tmp_path / "out", chunk_bytes="300B")
    assert len(json.loads((tmp_path / "out" / "index.json").read_text())["chunks"]) > 1  # samples span chunks
    dataset = StreamingDataset(str(tmp_path / "out"))
    assert len(dataset) == len(expected) == 4
    for k in range(len(dataset)):
        sample = dataset[k]
        for key in (INPUT_IDS, DOC_LENGTHS, LOSS_MASK):
            assert sample[key].dtype == expected[k][key].dtype
            np.testing.assert_array_equal(sample[key], expected[k][key])
