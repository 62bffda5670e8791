"""litdata chunk files and index.json written directly (no litdata writer), for samples that are dicts of 1-D
numpy arrays (mode rows: input_ids int32, doc_lengths int32, loss_mask uint8).

The bytes are those litdata 0.2.76's BinaryWriter writes for such samples (its PyTreeLoader, each leaf with its
`no_header_numpy:<dtype index>` serializer, no compression, no encryption), so litdata's StreamingDataset decodes
them into the same dicts:

- a chunk file: uint32 `n` (items), uint32 `offsets[n + 1]` (each item's start in the file, offsets[0] being the
  header's size, offsets[n] the file's size), then the items back to back;
- an item: uint32 byte size of each leaf, then each leaf's raw C-order bytes;
- index.json: {"chunks": [{chunk_bytes, chunk_size, dim: null, filename}, ...], "config": {...}, "updated_at"},
  keys sorted, the config as `litdata_config` gives it.

Chunks are written by whoever calls `write_chunk` (any process, in any order): their contents and names are given
by the caller. `write_chunk` returns each chunk's digest (xxHash's XXH3-128: ~8 GB/s on one core where sha256 does
~1.1, and a digest only has to change when the contents do: litdata uses `updated_at` to name its cache of a
remote copy) and `write_index` pins `updated_at` to the sha256 of those digests in order, so the index, too, is a
function of the contents alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash


def chunk_name(k: int) -> str:
    """The file name litdata gives chunk k of its only writer (rank 0)."""
    return f"chunk-0-{k}.bin"


# litdata's size suffixes (litdata.utilities.format._FORMAT_TO_RATIO), tried in this order: decimal units.
SIZE_SUFFIXES = {"tb": 10**12, "gb": 10**9, "mb": 10**6, "kb": 10**3, "t": 10**12, "g": 10**9, "m": 10**6,
                 "k": 10**3, "b": 1}
# litdata's numpy dtype codes (litdata.constants._NUMPY_DTYPES_MAPPING), the numeric ones.
DTYPE_CODES = {np.dtype(name): code for code, name in enumerate(
    ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"])}
# This module imports no litdata: importing it costs ~0.5 s with a cold page cache, a third of converting 1 GB.


def chunk_bytes_int(chunk_bytes: str | int) -> int:
    """A size like `64MB` in bytes, as litdata reads it (decimal units)."""
    if isinstance(chunk_bytes, int):
        return chunk_bytes
    raw = chunk_bytes.lower().strip()
    suffix = next((suffix for suffix in SIZE_SUFFIXES if raw.endswith(suffix)), None)
    if suffix is None:
        raise ValueError(f"{chunk_bytes!r}: a size needs a unit ({', '.join(SIZE_SUFFIXES)})")
    return int(float(raw[: -len(suffix)]) * SIZE_SUFFIXES[suffix])


def litdata_config(chunk_bytes: str | int, sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """index.json's config for samples shaped as `sample` (its keys in order, 1-D arrays), as litdata's
    BinaryWriter.get_config writes it for an uncompressed, unencrypted PyTreeLoader dataset (its `data_spec` is
    litdata's pytree `treespec_dumps` of a flat dict)."""
    for key, leaf in sample.items():
        if not isinstance(leaf, np.ndarray) or leaf.ndim != 1:
            raise TypeError(f"{key}: a leaf must be a 1-D numpy array (got {type(leaf).__name__})")
    leaf_spec = {"type": None, "context": None, "children_spec": []}
    spec = {"type": "builtins.dict", "context": json.dumps(list(sample)), "children_spec": [leaf_spec] * len(sample)}
    return {
        "chunk_bytes": chunk_bytes_int(chunk_bytes),
        "chunk_size": None,
        "compression": None,
        "compression_batch_size": None,
        "compression_level": None,
        "data_format": [f"no_header_numpy:{DTYPE_CODES[leaf.dtype]}" for leaf in sample.values()],
        "data_spec": json.dumps([1, spec]),
        "encryption": None,
        "ipc_compression": None,
        "item_loader": "PyTreeLoader",
        "types": {key: "json" for key in sample},
    }


def write_chunk(path: Path, items: Sequence[Sequence[np.ndarray]]) -> tuple[int, bytes]:
    """Write one chunk file of `items` (each its leaves in the config's order, 1-D C-contiguous arrays of the
    config's dtypes) without copying the leaves; returns (file size, XXH3-128 digest of the file)."""
    if not items:
        raise ValueError(f"{path}: a chunk holds at least one item")
    sizes = np.array([[leaf.nbytes for leaf in item] for item in items], np.uint32)
    item_bytes = 4 * sizes.shape[1] + sizes.sum(axis=1, dtype=np.int64)
    header_bytes = 4 * (len(items) + 2)
    ends = header_bytes + np.cumsum(item_bytes)
    if ends[-1] >= 1 << 32:
        raise ValueError(f"{path}: a chunk of {int(ends[-1])} bytes does not fit litdata's uint32 offsets")
    header = np.concatenate([[len(items), header_bytes], ends]).astype(np.uint32)
    digest = xxhash.xxh3_128()
    try:
        with open(path, "wb") as f:
            for buffer in _buffers(header, sizes, items):
                f.write(buffer)
                digest.update(buffer)
    except OSError as err:  # a failed write names no file: name it (a new error, so it survives a worker's pickling)
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    return int(ends[-1]), digest.digest()


def _buffers(header: np.ndarray, sizes: np.ndarray, items: Sequence[Sequence[np.ndarray]]):
    yield header.data
    for item_sizes, item in zip(sizes, items):
        yield item_sizes.data
        for leaf in item:
            if not leaf.flags.c_contiguous:
                raise ValueError("a leaf must be C-contiguous")
            yield leaf.data.cast("B")


def write_index(out: Path, chunks: Sequence[tuple[str, int, int, bytes]], config: dict[str, Any]) -> None:
    """index.json of the chunk files (filename, bytes, items, digest), in order; `updated_at` is the
    sha256 of the chunk digests concatenated in order (its first 32 hex digits)."""
    digest = hashlib.sha256(b"".join(chunk[3] for chunk in chunks))
    index = {
        "chunks": [{"chunk_bytes": size, "chunk_size": rows, "dim": None, "filename": name}
                   for name, size, rows, _ in chunks],
        "config": config,
        "updated_at": digest.hexdigest()[:32],
    }
    path = out / "index.json"
    try:
        path.write_text(json.dumps(index, sort_keys=True))
    except OSError as err:  # a failed write names no file
        raise OSError(err.errno, err.strerror, str(path)) from err
