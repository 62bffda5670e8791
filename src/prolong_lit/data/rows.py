"""Mode `rows`: already tokenized and packed MDS datasets (ProLong's released data) as prepared domains.

Every stored row becomes exactly one sample: nothing is re-tokenized, re-shuffled or repacked. A domain in mode
rows reads `{type: mds, path: DIR}` sources only (DIR holds an MDS `index.json`, a single shard folder or a
merged root; see mds.py), and an mds source feeds mode rows only. Rows follow the sources in order, each in its
index's shard order. A row's columns become the sample's fields (format.py):

- `input_ids` (a 1-D integer ndarray of exactly seq_len ids, each below the tokenizer's vocabulary size) ->
  int32 `input_ids`;
- `indices` ((n, 2) [start, end) document spans, sorted, not overlapping, inside the row) -> `doc_lengths`.
  Tokens no span covers: each maximal uncovered run becomes a document of its own with loss_mask 0, so it is
  neither trained on nor attended to by the spans' documents; their count goes to the manifest's
  `dropped_tokens.uncovered` (the tokens stay in the row: it keeps its seq_len) and the runs to
  `documents.uncovered_gaps`. An empty span (start == end) holds no token and is skipped
  (`documents.empty_spans`). Without an `indices` column a row is one document (ProLong's `single_seq`);
- `mask` (0/1 per token, 1 = train) -> `loss_mask`, unless the source says `loss_on: all` (its stored mask is
  not read: every token of its spans trains, as ProLong's stage scripts train on Tulu-v2). A domain with a mask
  or an uncovered gap anywhere gets a loss mask everywhere (1 where a row has neither);
- `length`, when present, must equal the row's token count. `domain` and other columns are not read.

Any bad row stops `prepare` with an error naming the source setting, the shard file and the sample index,
before the output directory is touched: `prepare` validates every index and shard header first
(`check_rows_domain`), then converts every row straight into litdata chunk files in the scratch folder beside the
output (`build_rows_domain`, litdata_chunks.py), and only then moves that directory into the output. Shards are
converted by `num_workers` processes, each writing its shard's chunks (`shard_chunk_rows`: a shard's rows split
evenly by chunk_bytes, never across shards) at their precomputed names, so the output is the same bytes whatever
the number of workers; a process holds one shard at a time.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prolong_lit.data.format import DOC_LENGTHS, LOSS_MASK, DomainStats
from prolong_lit.data.mds import SCALARS, Shard, check_columns, check_shard, iter_samples, read_index
from prolong_lit.data.pool import ordered_map
from prolong_lit.data.read_ahead import ReadAhead
from prolong_lit.data.sources import LOSS_ON
from prolong_lit.errors import ConfigError, DataError

ROWS_MODE = "rows"
MDS_SOURCE = "mds"
INPUT_IDS, INDICES, MASK, LENGTH = "input_ids", "indices", "mask", "length"
READ_COLUMNS = (INPUT_IDS, INDICES, MASK, LENGTH)

log = logging.getLogger(__name__)


@dataclass
class RowStore:
    """A domain converted by `build_rows_domain`: a complete litdata directory in the scratch folder, moved into
    the output as it is."""

    directory: Path


def check_rows_domain(setting: str, domain: Any, seq_len: int) -> None:
    """Before any work: mode rows and mds sources go together, and every shard of every source is readable
    (index entries, files, sizes, headers, the columns rows mode decodes). `domain` is a prepare.DomainConfig."""
    for i, source in enumerate(domain.sources):
        if domain.mode != ROWS_MODE and source.type == MDS_SOURCE:
            raise ConfigError(
                f"{setting}.sources[{i}].type: an mds source holds rows already tokenized and packed; it needs "
                f"mode rows (got mode {domain.mode})"
            )
        if domain.mode == ROWS_MODE and source.type != MDS_SOURCE:
            raise ConfigError(f"{setting}.sources[{i}].type: mode rows reads mds sources only (got {source.type})")
        if source.loss_on not in LOSS_ON:
            raise ConfigError(f"{setting}.sources[{i}].loss_on: {source.loss_on!r} is not one of {', '.join(LOSS_ON)} "
                             "(assistant: the stored mask column, if any; all: every token of the spans trains)")
    for key in ("min_length", "max_length", "slice_length"):
        if getattr(domain, key, None) is not None:
            raise ConfigError(f"{setting}.{key}: mode rows keeps every stored row as it is; leave {key} unset")
    if not domain.sources:
        raise ConfigError(f"{setting}.sources: no source configured")
    for i, source in enumerate(domain.sources):
        shards = _source_shards(source, f"{setting}.sources[{i}].path", seq_len)
        for shard in shards:
            check_shard(shard, f"{setting}.sources[{i}].path")
        if not sum(shard.samples for shard in shards):
            raise ConfigError(f"{setting}.sources[{i}]: the mds source at {source.path!r} holds no rows")


def _source_shards(source: Any, setting: str, seq_len: int) -> list[Shard]:
    """The shards of one mds source, their columns checked (not yet their files)."""
    if not source.path:
        raise ConfigError(f"{setting}: an mds source needs a path (a folder with an MDS index.json)")
    if not Path(source.path).is_dir():
        raise ConfigError(f"{setting}: {source.path!r} is not a directory")
    shards = read_index(source.path, setting)
    for shard in shards:
        encodings = dict(zip(shard.column_names, shard.column_encodings))
        if INPUT_IDS not in encodings:
            raise ConfigError(f"{setting}: {shard.path} has no {INPUT_IDS!r} column (columns: {shard.column_names})")
        check_columns(shard, READ_COLUMNS, setting)  # decodable (pkl refused), sizes as the encodings say
        for column in (INPUT_IDS, INDICES, MASK):
            if column in encodings and not encodings[column].startswith("ndarray"):
                raise ConfigError(f"{setting}: {shard.path}: column {column!r} must be an ndarray, "
                                 f"its encoding is {encodings[column]!r}")
        if LENGTH in encodings and np.dtype(SCALARS.get(encodings[LENGTH], "f4")).kind not in "ui":
            raise ConfigError(f"{setting}: {shard.path}: column {LENGTH!r} must be an integer, "
                             f"its encoding is {encodings[LENGTH]!r}")
        shape = encodings[INPUT_IDS].split(":")[2:]
        if shape and shape[0] != str(seq_len):
            raise ConfigError(f"{setting}: {shard.path}: rows of shape ({shape[0]},) (column {INPUT_IDS} "
                             f"{encodings[INPUT_IDS]}); seq_len is {seq_len}, prepare with seq_len: {shape[0]}")
    return shards


@dataclass
class ConvertedRows:
    """Rows converted by `convert_rows`, in order: what a chunk stores of each, and the counts of the manifest."""

    input_ids: list[np.ndarray]  # int32 (a view of the stored ids when they are 4-byte integers)
    doc_lengths: list[np.ndarray]  # int32
    masks: list[np.ndarray | None]  # uint8 loss mask, None where the row has neither a mask nor a gap
    counts: Counter
    max_token_id: int


def convert_rows(samples: Sequence[dict], seq_len: int, vocab_size: int, where: Callable[[int], str]) -> ConvertedRows:
    """Convert and check stored rows (see the module docstring for the rules). The per-row part is a few array
    reductions; the document spans of all the rows are checked and turned into lengths together, in arrays
    (rows of ProLong's data hold up to hundreds of documents). Raises a DataError naming `where(k)` (file and
    sample) for a bad row k."""
    ids_out, masks, spans, max_token_id = [], [], [], -1
    for k, sample in enumerate(samples):
        ids = sample[INPUT_IDS]
        if ids.ndim != 1 or ids.dtype.kind not in "ui":
            raise DataError(f"{where(k)}: {INPUT_IDS} must be a 1-D integer array (got {ids.dtype} of shape "
                            f"{ids.shape})")
        if len(ids) != seq_len:
            raise DataError(f"{where(k)}: a row of {len(ids)} tokens; seq_len is {seq_len} and mode rows keeps rows "
                            "as stored (prepare with the seq_len the data was packed at)")
        if LENGTH in sample and int(sample[LENGTH]) != len(ids):
            raise DataError(f"{where(k)}: column {LENGTH!r} says {sample[LENGTH]} tokens, the row holds {len(ids)}")
        top = int(ids.max()) if len(ids) else -1
        if top >= vocab_size or (ids.dtype.kind == "i" and len(ids) and int(ids.min()) < 0):
            at = int(np.argmax((ids >= vocab_size) | (ids < 0)))
            raise DataError(f"{where(k)}: token id {int(ids[at])} at position {at} is outside the tokenizer's "
                            f"vocabulary of {vocab_size}")
        max_token_id = max(max_token_id, top)
        # Every id is now in [0, vocab_size) and vocab_size < 2**31: 4-byte ids have the same bytes as int32.
        ids_out.append(ids.view(np.int32) if ids.dtype.itemsize == 4 else ids.astype(np.int32))
        mask = sample.get(MASK)
        if mask is not None:
            if mask.shape != (seq_len,) or mask.dtype.kind not in "ui" or (
                    seq_len and (int(mask.max()) > 1 or (mask.dtype.kind == "i" and int(mask.min()) < 0))):
                raise DataError(f"{where(k)}: {MASK} must be {seq_len} values of 0 or 1 (got shape {mask.shape})")
            mask = mask if mask.dtype == np.uint8 else mask.astype(np.uint8)
        masks.append(mask)
        indices = sample.get(INDICES)
        if indices is not None and (indices.ndim != 2 or indices.shape[1] != 2 or indices.dtype.kind not in "ui"):
            raise DataError(f"{where(k)}: {INDICES} must be integer [start, end) pairs of shape (n, 2), got "
                            f"{indices.dtype} {indices.shape}")
        spans.append(indices if indices is not None else np.array([[0, seq_len]], np.int64))
    doc_lengths, gaps, counts = _documents(spans, seq_len, where)
    for k, a, b in gaps:  # never trained on
        masks[k] = np.ones(seq_len, np.uint8) if masks[k] is None else np.array(masks[k])
        masks[k][a:b] = 0
    return ConvertedRows(ids_out, doc_lengths, masks, counts, max_token_id)


def _documents(spans: list[np.ndarray], seq_len: int, where: Callable[[int], str]
               ) -> tuple[list[np.ndarray], list[tuple[int, int, int]], Counter]:
    """Each row's document lengths from its [start, end) spans (checked by _check_spans), the uncovered runs
    (row, start, end) in order, and the counts. A row's documents, in order: before each non-empty span the
    uncovered run since the previous non-empty span's end (or the row's start), the span itself; after the last
    one the uncovered tail. Zero-length ones are dropped."""
    n = len(spans)
    per_row = np.array([len(s) for s in spans], np.int64)
    row = np.repeat(np.arange(n), per_row)  # the row of each span
    all_spans = np.concatenate(spans).astype(np.int64) if n else np.zeros((0, 2), np.int64)
    _check_spans(all_spans, row, np.cumsum(per_row) - per_row, seq_len, where)
    covered = all_spans[:, 1] > all_spans[:, 0]  # an empty span holds no token
    c_row, c_start, c_stop = row[covered], all_spans[covered, 0], all_spans[covered, 1]
    run_start = np.concatenate([[0], c_stop])[: len(c_stop)]  # the previous covered span's end ...
    run_start[np.concatenate([[True], c_row[1:] != c_row[:-1]])[: len(c_row)]] = 0  # ... or the row's start
    kept = np.bincount(c_row, minlength=n)  # covered spans per row
    tail_start = np.zeros(n, np.int64)
    tail_start[kept > 0] = c_stop[np.cumsum(kept)[kept > 0] - 1]
    pieces = np.stack([c_start - run_start, c_stop - c_start], axis=1).ravel()  # (run, span) per covered span
    lengths = np.insert(pieces, np.cumsum(2 * kept), seq_len - tail_start)  # each row's tail after its pieces
    row_of_length = np.repeat(np.arange(n), 2 * kept + 1)
    nonzero = lengths > 0
    per_row_docs = np.bincount(row_of_length[nonzero], minlength=n)
    doc_lengths = np.split(lengths[nonzero].astype(np.int32), np.cumsum(per_row_docs)[:-1])
    runs = np.concatenate([np.stack([c_row, run_start, c_start], 1),
                           np.stack([np.arange(n), tail_start, np.full(n, seq_len)], 1)])
    runs = runs[runs[:, 2] > runs[:, 1]]
    gaps = [tuple(run) for run in runs[np.lexsort((runs[:, 1], runs[:, 0]))].tolist()]
    counts = Counter(read=len(all_spans), kept=int(covered.sum()), empty_spans=int((~covered).sum()),
                     uncovered_gaps=len(gaps), uncovered=sum(b - a for _, a, b in gaps))
    return doc_lengths, gaps, counts


def _check_spans(spans: np.ndarray, row: np.ndarray, row_first: np.ndarray, seq_len: int,
                 where: Callable[[int], str]) -> None:
    """Every span (int64 (n, 2), of row `row[i]`; row k's first is `row_first[k]`) has start <= end, lies inside
    the row, and starts at or after the start and the end of the span before it in its row. The first bad span
    (in row order) is a DataError naming where(row) and the span's index in its row."""
    before = np.concatenate([[[0, 0]], spans[:-1]])  # the span before each one ...
    before[row_first[row_first < len(spans)]] = 0  # ... [0, 0] for a row's first
    starts, stops = spans[:, 0], spans[:, 1]
    problems = [  # in the order they are reported for one span
        ((starts < 0) | (stops < starts), "is not a span (start > end)"),
        (stops > seq_len, f"runs past the row of {seq_len} tokens"),
        (starts < before[:, 0], f"is out of order: {INDICES} are not sorted by start"),
        (starts < before[:, 1], "overlaps the span before it"),
    ]
    flagged = np.logical_or.reduce([flags for flags, _ in problems])
    if not flagged.any():
        return
    at = int(np.argmax(flagged))
    k = int(row[at])
    j = at - int(row_first[k])
    what = next(message for flags, message in problems if flags[at])
    previous = f" (after [{before[at, 0]}, {before[at, 1]}))" if j else ""
    raise DataError(f"{where(k)}: {INDICES}[{j}] = [{starts[at]}, {stops[at]}) {what}{previous}")


@dataclass
class _ShardTask:
    shard: Shard
    setting: str
    seq_len: int
    vocab_size: int
    columns: tuple[str, ...]  # READ_COLUMNS, less the mask when the source says loss_on: all
    first_chunk: int  # the number of the shard's first chunk in the domain
    chunk_rows: list[int]  # rows of each of the shard's chunks, in order
    has_mask: bool  # whether the samples carry a loss_mask (the domain's, decided before the shard is read)
    out: Path  # the domain's chunk directory


@dataclass
class _ShardResult:
    chunks: list[tuple[str, int, int, bytes]]  # (file name, bytes, rows, sha256) of each chunk written
    needs_mask: bool  # a row had a mask or an uncovered gap
    counts: Counter
    max_token_id: int


def shard_chunk_rows(rows: int, row_bytes: int, chunk_bytes: int) -> list[int]:
    """How a shard's `rows` rows are split into chunks: never across shards, in ceil(rows / per_chunk) chunks
    as even as possible (the first ones one row longer), per_chunk = max(1, chunk_bytes // row_bytes). A
    function of the shard's row count alone: the same chunks whatever the number of workers."""
    per_chunk = max(1, chunk_bytes // max(1, row_bytes))
    n = -(-rows // per_chunk)
    return [rows // n + (k < rows % n) for k in range(n)] if rows else []


# Each worker process reads its shards into one buffer, reused from shard to shard (mds.read_shard).
_READ_BUFFER = bytearray()


def _convert_shard(task: _ShardTask) -> _ShardResult:
    """Convert and check every row of one shard, then write its chunks (unless a row needs a loss mask that the
    domain was not planned with: build_rows_domain then converts every shard again, with one). The chunks hold
    views of the shard as read: no row is copied on the way."""
    from prolong_lit.data.litdata_chunks import chunk_name, write_chunk

    samples = [sample for _, sample in iter_samples(task.shard, task.columns, task.setting, _READ_BUFFER)]
    rows = convert_rows(samples, task.seq_len, task.vocab_size,
                        lambda k: f"{task.setting}: {task.shard.path} sample {k}")
    needs_mask = any(mask is not None for mask in rows.masks)
    chunks = []
    if task.has_mask or not needs_mask:
        ones = np.ones(task.seq_len, np.uint8)  # the mask of every row that has none
        leaves = [(ids, lengths, ones if mask is None else mask) if task.has_mask else (ids, lengths)
                  for ids, lengths, mask in zip(rows.input_ids, rows.doc_lengths, rows.masks)]
        first = 0
        for j, count in enumerate(task.chunk_rows):
            name = chunk_name(task.first_chunk + j)
            size, digest = write_chunk(task.out / name, leaves[first: first + count])
            chunks.append((name, size, count, digest))
            first += count
    return _ShardResult(chunks, needs_mask, rows.counts, rows.max_token_id)


def _columns(source: Any) -> tuple[str, ...]:
    return READ_COLUMNS if source.loss_on != "all" else tuple(c for c in READ_COLUMNS if c != MASK)


def build_rows_domain(
    name: str, domain: Any, seq_len: int, vocab_size: int, num_workers: int, scratch: Path,
    chunk_bytes: str = "64MB",
) -> tuple[RowStore, list[np.ndarray], DomainStats]:
    """Convert every row of the domain's mds sources (checked as in `convert_rows`) into litdata chunk files of
    a complete litdata directory under `scratch` (litdata_chunks.py: each shard's chunks written by the process
    that read it, index.json last); returns the store (that directory), an empty plan (each row is a sample)
    and the domain's stats. `check_rows_domain` must have passed."""
    from tqdm import tqdm

    from prolong_lit.data.litdata_chunks import chunk_bytes_int, litdata_config, write_index

    shards = [(f"domains.{name}.sources[{i}].path", shard, _columns(source)) for i, source in enumerate(domain.sources)
              for shard in _source_shards(source, f"domains.{name}.sources[{i}].path", seq_len)]
    rows = sum(shard.samples for _, shard, _ in shards)
    # The loss mask is planned from the columns read; a row with an uncovered gap in a domain planned without
    # one makes the whole domain convert again, with one (its chunks are then rewritten, same names).
    has_mask = any(MASK in columns and MASK in shard.column_names for _, shard, columns in shards)
    row_bytes = 4 * 3 + seq_len * 4 + 4 + (seq_len if has_mask else 0)  # sizes, ids, one document, mask
    plan = [shard_chunk_rows(shard.samples, row_bytes, chunk_bytes_int(chunk_bytes)) for _, shard, _ in shards]
    first_chunks = np.concatenate([[0], np.cumsum([len(chunk_rows) for chunk_rows in plan])]).astype(int)
    out = scratch / name
    for _attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        tasks = (_ShardTask(shard, setting, seq_len, vocab_size, columns, int(first), chunk_rows, has_mask, out)
                 for (setting, shard, columns), first, chunk_rows in zip(shards, first_chunks, plan))
        chunks, counts, max_token_id, needs_mask = [], Counter(), -1, False
        # ordered_map keeps up to 2 x num_workers shards in flight; the read-ahead runs up to two shards further.
        with ReadAhead([shard.path for _, shard, _ in shards], ahead=2 * max(1, num_workers) + 2) as read_ahead, \
                tqdm(total=rows, desc=f"converting {name}", unit="row", disable=None) as progress:
            for i, ((_, shard, _), result) in enumerate(zip(shards, ordered_map(_convert_shard, tasks, num_workers))):
                read_ahead.done(i)
                chunks += result.chunks
                counts.update(result.counts)
                max_token_id = max(max_token_id, result.max_token_id)
                needs_mask |= result.needs_mask
                progress.update(shard.samples)
        _READ_BUFFER.clear()  # when this process converted (num_workers <= 1), it holds a shard's bytes no longer
        if has_mask or not needs_mask:
            break
        log.info("domain %s: a row has uncovered tokens; converting again with a loss mask", name)
        has_mask = True
    sample = {INPUT_IDS: np.zeros(1, np.int32), DOC_LENGTHS: np.zeros(1, np.int32)}  # the samples' layout
    if has_mask:
        sample[LOSS_MASK] = np.zeros(1, np.uint8)
    write_index(out, chunks, litdata_config(chunk_bytes, sample))
    documents = {"rows": rows, **{key: counts[key] for key in ("read", "kept", "empty_spans", "uncovered_gaps")}}
    stats = DomainStats(samples=rows, tokens=rows * seq_len, max_token_id=max_token_id, has_loss_mask=has_mask,
                        documents=documents, dropped_tokens={"uncovered": counts["uncovered"]})
    log.info("domain %s: %s", name, stats)
    return RowStore(out), [], stats
