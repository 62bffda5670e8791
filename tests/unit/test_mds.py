"""The MDS reader (data/mds.py) and the row conversion of mode rows (data/rows.py), against datasets written by
mosaicml-streaming's own MDSWriter (tests/fixtures/mds/make_fixtures.py) and the values it was given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from prolong_lit.data.mds import check_columns, check_shard, iter_samples, read_index, read_shard
from prolong_lit.data.rows import convert_rows
from prolong_lit.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mds"
SEQ_LEN = 64
VOCAB = 128_256
COLUMNS = ("input_ids", "indices", "mask", "length", "domain")


def read_all(path: Path, columns=COLUMNS) -> list[dict]:
    return [row for shard in read_index(path, "s") for _, row in iter_samples(shard, columns, "s")]


@pytest.mark.parametrize("name", ["pretrain", "zstd", "compressed/gz", "compressed/bz2", "gaps", "sft"])
def test_reader_gives_the_rows_mdswriter_was_given(name):
    reference = np.load(FIXTURES / f"{name if '/' not in name else 'zstd'}.npz")  # gz, bz2: zstd's rows
    rows = read_all(FIXTURES / name)
    np.testing.assert_array_equal(np.stack([r["input_ids"] for r in rows]), reference["input_ids"])
    assert all(r["input_ids"].dtype == np.uint32 and r["indices"].dtype == np.uint32 for r in rows)
    np.testing.assert_array_equal(np.concatenate([r["indices"] for r in rows]), reference["spans"])
    assert [len(r["indices"]) for r in rows] == reference["span_counts"].tolist()
    assert all(r["length"] == SEQ_LEN and r["domain"].endswith(f"/{SEQ_LEN}") for r in rows)
    if "mask" in reference:
        np.testing.assert_array_equal(np.stack([r["mask"] for r in rows]), reference["mask"])


def test_merged_index_lists_the_sub_folders_shards_in_order():
    shards = read_index(FIXTURES / "pretrain", "s")
    assert len(shards) > 4 and all(s.compression is None for s in shards)
    folders = [s.basename.split("/")[0] for s in shards]
    assert folders == sorted(folders) and set(folders) == {"proc00-02", "proc01-02"}
    compressed = read_index(FIXTURES / "zstd", "s")
    assert all(s.path.name.endswith(".mds.zstd") and s.compression == "zstd" for s in compressed)
    for shard in shards + compressed:
        check_shard(shard, "s")


def test_every_encoding_decodes_to_the_value_written():
    expected = json.loads((FIXTURES / "encodings.json").read_text())
    rows = read_all(FIXTURES / "encodings", list(expected["encodings"]))
    assert len(rows) == len(expected["rows"])
    for row, want in zip(rows, expected["rows"]):
        assert set(row) == set(want)
        for column, value in want.items():
            got = row[column]
            if isinstance(value, dict) and "dtype" in value:
                assert got.dtype.name == value["dtype"] and list(got.shape) == value["shape"], column
                np.testing.assert_array_equal(got.ravel(), np.array(value["values"], value["dtype"]), err_msg=column)
            elif isinstance(got, bytes):
                assert got == value.encode("latin-1")
            else:
                assert got == value, column


def test_columns_not_asked_for_are_skipped_and_a_pickled_one_is_refused():
    shard = read_index(FIXTURES / "bad" / "pkl_indices", "src")[0]
    assert [sorted(row) for _, row in iter_samples(shard, ["input_ids"], "src")] == [["input_ids"]] * 2
    with pytest.raises(ValueError, match=r"src: .*shard.00000.mds: column 'indices' has encoding 'pkl'.*refused"):
        check_columns(shard, ["input_ids", "indices"], "src")


def copy_fixture(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_missing_index_and_missing_or_truncated_shards_are_named(tmp_path):
    with pytest.raises(DataError, match=r"src: .*holds no index.json"):
        read_index(tmp_path, "src")
    data = copy_fixture(tmp_path, "zstd")
    shards = read_index(data, "src")
    shards[1].path.unlink()
    with pytest.raises(DataError, match=r"src: .*shard.00001.mds.zstd: shard file listed in .* does not exist"):
        check_shard(shards[1], "src")
    shards[2].path.write_bytes(shards[2].path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard.00002.mds.zstd: the file has \d+ bytes, the index says \d+"):
        check_shard(shards[2], "src")


def test_a_truncated_shard_with_a_matching_index_fails_on_its_header(tmp_path):
    data = copy_fixture(tmp_path, "pretrain")
    shard = read_index(data, "src")[0]
    shard.path.write_bytes(shard.path.read_bytes()[:-100])
    index_path = data / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["raw_data"]["bytes"] -= 100  # the index edited to agree with the file
    index_path.write_text(json.dumps(index))
    shard = read_index(data, "src")[0]
    with pytest.raises(ValueError, match=r"proc00-02/shard.00000.mds: corrupt header .* end at \d+"):
        check_shard(shard, "src")
    with pytest.raises(ValueError, match="corrupt header"):
        read_shard(shard, "src")


def convert_row(sample: dict, seq_len: int, vocab_size: int, where: str):
    """One stored row through `convert_rows`: (input_ids, doc_lengths, loss mask or None, counts)."""
    rows = convert_rows([sample], seq_len, vocab_size, lambda k: where)
    return rows.input_ids[0], rows.doc_lengths[0], rows.masks[0], rows.counts


def row(ids=None, spans=((0, SEQ_LEN),), mask=None, length=SEQ_LEN) -> dict:
    sample = {"input_ids": np.arange(SEQ_LEN, dtype=np.uint32) if ids is None else ids, "length": length}
    if spans is not None:
        sample["indices"] = np.array(spans, np.uint32).reshape(-1, 2)
    if mask is not None:
        sample["mask"] = np.asarray(mask, np.uint8)
    return sample


def test_covered_row_keeps_its_documents_and_has_no_mask():
    ids, lengths, mask, counts = convert_row(row(spans=[(0, 10), (10, 64)]), SEQ_LEN, VOCAB, "f sample 0")
    assert ids.dtype == np.int32 and ids.tolist() == list(range(SEQ_LEN))
    assert lengths.dtype == np.int32 and lengths.tolist() == [10, 54]
    assert mask is None and counts["uncovered"] == 0 and counts["kept"] == 2
    # no indices column: the row is one document (ProLong's single_seq)
    assert convert_row(row(spans=None), SEQ_LEN, VOCAB, "w")[1].tolist() == [SEQ_LEN]


def test_uncovered_tokens_become_masked_documents_of_their_own():
    sft_mask = np.ones(SEQ_LEN, np.uint8)
    sft_mask[12:20] = 0
    spans = [(3, 10), (10, 10), (12, 50)]  # lead gap 3, an empty span, middle gap 2, tail gap 14
    _, lengths, mask, counts = convert_row(row(spans=spans, mask=sft_mask), SEQ_LEN, VOCAB, "w")
    assert lengths.tolist() == [3, 7, 2, 38, 14]
    expected = sft_mask.copy()
    expected[[*range(3), 10, 11, *range(50, 64)]] = 0
    np.testing.assert_array_equal(mask, expected)
    assert dict(counts) == {"read": 3, "kept": 2, "empty_spans": 1, "uncovered_gaps": 3, "uncovered": 19}


def reference_documents(spans, mask, seq_len):
    """The rule of mode rows in plain Python, one row: each non-empty span a document, each uncovered run a
    document never trained on; (lengths, loss mask or None, uncovered runs)."""
    lengths, train, pos, runs = [], None if mask is None else [int(m) for m in mask], 0, []
    for start, end in [*[(a, b) for a, b in spans if a < b], (seq_len, seq_len)]:
        if start > pos:  # uncovered: its own document, not trained on
            lengths.append(start - pos)
            runs.append(start - pos)
            train = train or [1] * seq_len
            train[pos:start] = [0] * (start - pos)
        if end > start:
            lengths.append(end - start)
        pos = max(pos, end)
    return lengths, train, runs


def test_a_shard_of_rows_converts_as_each_row_by_the_plain_rule():
    """convert_rows works on a whole shard's spans at once: random rows (gaps, empty spans, no spans, no indices
    column, masks) give each row's documents, mask and counts as the one-row-at-a-time rule does."""
    rng = np.random.default_rng(0)
    samples, expected = [], []
    for k in range(300):
        cuts = np.sort(rng.choice(SEQ_LEN + 1, size=2 * int(rng.integers(0, 6)), replace=True)).reshape(-1, 2)
        spans = [tuple(c) for c in cuts[rng.random(len(cuts)) < 0.8].tolist()]
        mask = rng.integers(0, 2, SEQ_LEN).astype(np.uint8) if k % 3 == 0 else None
        samples.append(row(spans=None if k % 17 == 0 else spans, mask=mask))
        expected.append(reference_documents([(0, SEQ_LEN)] if k % 17 == 0 else spans, mask, SEQ_LEN))
    rows = convert_rows(samples, SEQ_LEN, VOCAB, lambda k: f"sample {k}")
    for k, (lengths, train, _) in enumerate(expected):
        assert rows.doc_lengths[k].tolist() == lengths, k
        assert (rows.masks[k] is None and train is None) or rows.masks[k].tolist() == train, k
        assert rows.input_ids[k].dtype == np.int32 and rows.input_ids[k].tolist() == list(range(SEQ_LEN))
    runs = [run for _, _, row_runs in expected for run in row_runs]
    assert (rows.counts["uncovered_gaps"], rows.counts["uncovered"]) == (len(runs), sum(runs))
    assert any(mask is not None for mask in rows.masks) and sum(runs) > 0  # the sample covers the cases


@pytest.mark.parametrize(
    "sample, error",
    [
        (row(spans=[(0, 40), (30, 64)]), r"indices\[1\] = \[30, 64\) overlaps the span before it \(after \[0, 40\)\)"),
        (row(spans=[(32, 64), (0, 32)]), r"indices\[1\] = \[0, 32\) is out of order"),
        (row(spans=[(0, 32), (32, 72)]), r"indices\[1\] = \[32, 72\) runs past the row of 64 tokens"),
        (row(spans=[(10, 5)]), r"indices\[0\] = \[10, 5\) is not a span"),
        (row(ids=np.arange(32, dtype=np.uint32), spans=[(0, 32)], length=32), "a row of 32 tokens; seq_len is 64"),
        (row(length=65), "column 'length' says 65 tokens, the row holds 64"),
        (row(ids=np.full(SEQ_LEN, VOCAB, np.uint32)), "token id 128256 at position 0 is outside .* of 128256"),
        (row(mask=np.full(SEQ_LEN, 2)), "mask must be 64 values of 0 or 1"),
    ],
)
def test_bad_rows_are_refused_naming_where(sample, error):
    with pytest.raises(ValueError, match=f"^f.mds sample 3: {error}"):
        convert_row(sample, SEQ_LEN, VOCAB, "f.mds sample 3")


def test_litdata_chunks_round_trip_through_streaming_dataset(tmp_path):
    """Chunks written by litdata_chunks decode as litdata's own writer's (same config, same items)."""
    from litdata import StreamingDataset
    from litdata.streaming.writer import BinaryWriter

    from prolong_lit.data.litdata_chunks import chunk_name, litdata_config, write_chunk, write_index

    rng = np.random.default_rng(0)
    items = [{"input_ids": rng.integers(0, 1000, 16).astype(np.int32),
              "doc_lengths": np.array([5, 11][: 1 + i % 2], np.int32) if i % 2 else np.array([16], np.int32),
              "loss_mask": rng.integers(0, 2, 16).astype(np.uint8)} for i in range(7)]
    ours = tmp_path / "ours"
    ours.mkdir()
    chunks = []
    for k, group in enumerate([items[:3], items[3:4], items[4:]]):
        size, digest = write_chunk(ours / chunk_name(k), [tuple(item.values()) for item in group])
        assert size == (ours / chunk_name(k)).stat().st_size
        chunks.append((chunk_name(k), size, len(group), digest))
    write_index(ours, chunks, litdata_config("1kb", items[0]))
    theirs = tmp_path / "theirs"
    writer = BinaryWriter(str(theirs), chunk_bytes="1kb")
    for i, item in enumerate(items):
        writer[i] = item
    writer.done()
    writer.merge()
    assert json.loads((ours / "index.json").read_text())["config"] == json.loads(
        (theirs / "index.json").read_text())["config"]
    for directory in (ours, theirs):
        dataset = StreamingDataset(input_dir=str(directory))
        assert len(dataset) == len(items)
        for i, item in enumerate(items):
            got = dataset[i]
            assert list(got) == list(item)
            for key in item:
                assert got[key].dtype == item[key].dtype and np.array_equal(got[key], item[key]), (i, key)


def test_litdata_facts_restated_without_importing_litdata_match_litdata():
    """litdata_chunks restates litdata's size units, dtype codes and dict treespec (importing litdata costs ~0.5 s
    of a cold prepare): each is litdata's own."""
    from litdata.constants import _NUMPY_DTYPES_MAPPING
    from litdata.utilities._pytree import tree_flatten, treespec_dumps
    from litdata.utilities.format import _convert_bytes_to_int

    from prolong_lit.data.litdata_chunks import DTYPE_CODES, chunk_bytes_int, litdata_config

    for size in ["64MB", "64mb", " 1.5GB", "100k", "7b", "2t", "3 kb", "0.25m"]:
        assert chunk_bytes_int(size) == _convert_bytes_to_int(size), size
    assert all(_NUMPY_DTYPES_MAPPING[code] == dtype for dtype, code in DTYPE_CODES.items())
    for sample in [{"input_ids": np.zeros(1, np.int32), "doc_lengths": np.zeros(1, np.int32)},
                   {"a": np.zeros(1, np.uint8)}, {"x": np.zeros(1, np.float32), "y": np.zeros(1, np.int64)}]:
        config = litdata_config("64MB", sample)
        assert config["data_spec"] == treespec_dumps(tree_flatten(sample)[1])
        assert config["data_format"] == [f"no_header_numpy:{k}" for v in sample.values()
                                         for k, d in _NUMPY_DTYPES_MAPPING.items() if d == v.dtype]


def test_shard_chunk_rows_split_each_shard_evenly_by_chunk_bytes():
    from prolong_lit.data.rows import shard_chunk_rows

    assert shard_chunk_rows(250, 262_160, 64_000_000) == [125, 125]  # 244 rows fit: two chunks
    assert shard_chunk_rows(244, 262_160, 64_000_000) == [244]
    assert shard_chunk_rows(7, 100, 250) == [2, 2, 2, 1]
    assert shard_chunk_rows(3, 10_000, 1) == [1, 1, 1]
    assert shard_chunk_rows(0, 100, 1000) == []
