"""A small reader of MosaicML's MDS format (mosaicml-streaming), the format ProLong released its data in.

mosaicml-streaming itself cannot be a dependency (it pins transformers<5 and numpy<2.2), and the data only needs
reading in order, shard by shard, so this module reads the format directly. What it relies on (checked against
mosaicml-streaming 0.13's writer and encodings; docs/data-formats.md has the same facts and the ProLong layout):

- A dataset directory holds `index.json`: `{"version": 2, "shards": [...]}`. Each shard entry has `format`
  "mds", `column_names` (sorted), `column_encodings`, `column_sizes` (bytes of a fixed-size column, null for a
  variable-size one), `compression` (null, or e.g. "zstd" / "zstd:<level>"), `raw_data` {basename, bytes,
  hashes} (the uncompressed shard), `zip_data` (null, or {basename, bytes, hashes} of the compressed file, the one
  on disk), `samples`, `size_limit`. A merged index (`merge_index`, ProLong's `<domain>/index.json`) prefixes
  every basename with its sub-folder (`proc00-64/shard.00000.mds`): basenames are paths relative to the index.
- An uncompressed shard: uint32 n (samples), n + 1 uint32 absolute byte offsets (sample i is bytes
  [off[i], off[i+1]); off[n] is the file size), the writer's config JSON, then the samples. All little-endian.
- A sample: one uint32 size per variable-size column (in column order; fixed-size columns have none), then
  each column's bytes in column order.
- Column encodings read here: `bytes`, `str` (UTF-8), `int` (int64), `uint8`..`uint64`, `int8`..`int64`,
  `float16`..`float64` (one scalar), `json`, and `ndarray[:dtype[:shape]]`. An ndarray value is its raw values,
  preceded by what the encoding does not fix: a dtype-code byte when the dtype is not given, then when the shape
  is not given one byte `ndim << 2 | shape-dtype code` and `ndim` shape entries of that dtype. Value dtype codes:
  8 uint8, 9 int8, 16 uint16, 17 int16, 18 float16, 32 uint32, 33 int32, 34 float32, 64 uint64, 65 int64,
  66 float64; shape dtype codes: 0 uint8, 1 uint16, 2 uint32, 3 uint64.
- `pkl` (pickle: would run arbitrary code), images and anything else are refused when a column must be decoded;
  columns the caller does not ask for are skipped by their size and never decoded.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prolong_lit.errors import DataError

INDEX_NAME = "index.json"
VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
SCALARS = {"int": "int64", **{name: name for name in VALUE_DTYPES.values()}}
COMPRESSIONS = ("zstd", "gz", "bz2")  # the ones read here; streaming also writes br and snappy


@dataclass(frozen=True)
class Shard:
    """One shard of an MDS dataset, as its index.json entry describes it."""

    root: Path  # the directory of the index.json that lists it
    basename: str  # the uncompressed shard, relative to root
    raw_bytes: int
    samples: int
    column_names: tuple[str, ...]
    column_encodings: tuple[str, ...]
    column_sizes: tuple[int | None, ...]
    compression: str | None = None
    zip_basename: str | None = None
    zip_bytes: int | None = None

    @property
    def path(self) -> Path:
        """The file on disk: the compressed one when the shard is compressed."""
        return self.root / (self.zip_basename or self.basename)

    def encoding(self, column: str) -> str | None:
        return dict(zip(self.column_names, self.column_encodings)).get(column)


def read_index(path: str | Path, setting: str) -> list[Shard]:
    """The shards listed by `<path>/index.json` (a single shard folder or a merged root), in index order.

    `setting` names the configuration entry in errors (e.g. `domains.books.sources[0].path`)."""
    index_path = Path(path) / INDEX_NAME
    if not index_path.is_file():
        raise DataError(
            f"{setting}: {str(path)!r} holds no {INDEX_NAME}; point it at an MDS dataset folder (one with "
            f"{INDEX_NAME}; for sub-folders procNN-MM without a root index, merge them with streaming's merge_index)"
        )
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{setting}: {index_path} is not valid JSON ({err})") from err
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise DataError(f"{setting}: {index_path} is not an MDS index (version 2 with a list of shards)")
    return [_shard(Path(path), entry, f"{setting}: {index_path} shard {i}") for i, entry in enumerate(index["shards"])]


def _shard(root: Path, entry: Any, where: str) -> Shard:
    try:
        if entry["format"] != "mds":
            raise DataError(f"{where}: format {entry['format']!r} is not mds")
        compression = entry.get("compression") or None
        if compression is not None and compression.split(":")[0] not in COMPRESSIONS:
            raise DataError(f"{where}: compression {compression!r} is not supported (read: {', '.join(COMPRESSIONS)})")
        zip_data = entry.get("zip_data") if compression else None
        if compression and not zip_data:
            raise DataError(f"{where}: compressed with {compression} but has no zip_data")
        names, encodings, sizes = entry["column_names"], entry["column_encodings"], entry["column_sizes"]
        if not len(names) == len(encodings) == len(sizes):
            raise DataError(f"{where}: column_names, column_encodings and column_sizes differ in length")
        return Shard(
            root=root, basename=entry["raw_data"]["basename"], raw_bytes=int(entry["raw_data"]["bytes"]),
            samples=int(entry["samples"]), column_names=tuple(names), column_encodings=tuple(encodings),
            column_sizes=tuple(None if s is None else int(s) for s in sizes), compression=compression,
            zip_basename=zip_data["basename"] if zip_data else None,
            zip_bytes=int(zip_data["bytes"]) if zip_data else None,
        )
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: not an MDS shard entry (missing or malformed {err})") from err


def _open_decompressed(shard: Shard, data: bytes | None = None) -> BinaryIO:
    """The shard's uncompressed bytes as a stream (from the file, or from `data`, the file's bytes)."""
    raw = io.BytesIO(data) if data is not None else open(shard.path, "rb")
    kind = (shard.compression or "").split(":")[0]
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True, read_across_frames=True)
    if kind == "gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == "bz2":
        return bz2.BZ2File(raw)
    return raw


def check_shard(shard: Shard, setting: str) -> None:
    """Cheap checks of one shard before any row is read: the file exists with the size the index gives, and its
    header (sample count, offsets) agrees with the index. Decompresses only the header of a compressed shard."""
    where = f"{setting}: {shard.path}"
    if not shard.path.is_file():
        raise DataError(f"{where}: shard file listed in {shard.root / INDEX_NAME} does not exist")
    expected = shard.zip_bytes if shard.compression else shard.raw_bytes
    if shard.path.stat().st_size != expected:
        raise DataError(
            f"{where}: the file has {shard.path.stat().st_size} bytes, the index says {expected} "
            "(truncated or replaced; download it again)"
        )
    header = b""
    with _open_decompressed(shard) as f:  # a decompressing stream may return fewer bytes than asked for
        while len(header) < 4 * (shard.samples + 2) and (block := f.read(4 * (shard.samples + 2) - len(header))):
            header += block
    _offsets(header, shard, where)


def _offsets(data: bytes, shard: Shard, where: str) -> np.ndarray:
    """The n + 1 sample offsets of a shard's header, checked against the index."""
    if len(data) < 4:
        raise DataError(f"{where}: shorter than its header (truncated)")
    n = int(np.frombuffer(data, np.uint32, count=1)[0])
    if n != shard.samples:
        raise DataError(f"{where}: the header counts {n} samples, the index {shard.samples}")
    if len(data) < 4 * (n + 2):
        raise DataError(f"{where}: shorter than its header of {n} samples (truncated)")
    offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4).astype(np.int64)
    if offsets[0] < 4 * (n + 2) or (np.diff(offsets) < 0).any() or offsets[-1] != shard.raw_bytes:
        raise DataError(
            f"{where}: corrupt header (sample offsets {offsets[:3].tolist()}... end at {offsets[-1]}, the index "
            f"says {shard.raw_bytes} bytes)"
        )
    return offsets


def read_shard(shard: Shard, setting: str, buffer: bytearray | None = None) -> tuple[memoryview, np.ndarray]:
    """The whole uncompressed shard and its n + 1 sample offsets, sizes and header checked.

    With `buffer`, an uncompressed shard is read into it (grown as needed) and the view returned is valid until
    the buffer's next use: a process converting shard after shard reuses one buffer, instead of a fresh 64 MiB
    one per shard whose pages the kernel must zero and map again (a fifth of the time converting a shard took)."""
    where = f"{setting}: {shard.path}"
    if not shard.path.is_file():
        raise DataError(f"{where}: shard file listed in {shard.root / INDEX_NAME} does not exist")
    if shard.compression:
        data = shard.path.read_bytes()
        if len(data) != shard.zip_bytes:
            raise DataError(f"{where}: the file has {len(data)} bytes, the index says {shard.zip_bytes} (truncated?)")
        try:
            with _open_decompressed(shard, data) as f:
                data = f.read()
        except Exception as err:  # each library raises its own error type for a corrupt stream
            raise DataError(f"{where}: does not decompress as {shard.compression} ({err})") from err
        view = memoryview(data)
    else:
        view = _read_file(shard.path, buffer if buffer is not None else bytearray(), shard.raw_bytes)
    if len(view) != shard.raw_bytes:
        raise DataError(f"{where}: {len(view)} bytes (uncompressed), the index says {shard.raw_bytes} (truncated?)")
    return view, _offsets(view, shard, where)


def _read_file(path: Path, buffer: bytearray, expected: int) -> memoryview:
    """The file's bytes in `buffer` (grown to `expected` + 1 bytes, so a longer file shows as one)."""
    if len(buffer) < expected + 1:
        try:
            buffer.extend(bytes(expected + 1 - len(buffer)))
        except BufferError:  # views of the previous shard are still alive: read into a buffer of its own
            buffer = bytearray(expected + 1)
    view, got = memoryview(buffer), 0
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):  # Linux: a larger readahead window
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while got <= expected and (n := f.readinto(view[got: expected + 1])):
            got += n
    return view[:got]


def decoder(encoding: str) -> Callable[[bytes, int, int], Any] | None:
    """A function (buffer, start, end) -> value for one column encoding, None for an encoding not read here."""
    name, _, rest = encoding.partition(":")
    if name == "ndarray":
        dtype, _, shape = rest.partition(":")
        if dtype and dtype not in VALUE_DTYPES.values():
            return None
        fixed_dtype = np.dtype(dtype) if dtype else None
        fixed_shape = tuple(int(d) for d in shape.split(",")) if shape else None
        return lambda buf, a, b: _ndarray(buf, a, b, fixed_dtype, fixed_shape)
    if rest:
        return None
    if name in SCALARS:
        scalar = np.dtype(SCALARS[name])
        return lambda buf, a, b: np.frombuffer(buf, scalar, count=1, offset=a)[0].item()
    simple = {"bytes": lambda raw: raw, "str": lambda raw: raw.decode("utf-8"), "json": json.loads}
    if name in simple:
        return lambda buf, a, b: simple[name](bytes(buf[a:b]))
    return None


def fixed_size(encoding: str) -> int | None:
    """Bytes of a fixed-size encoding (a scalar, or an ndarray with dtype and shape given), None if variable."""
    name, _, rest = encoding.partition(":")
    if name in SCALARS and not rest:
        return np.dtype(SCALARS[name]).itemsize
    dtype, _, shape = rest.partition(":")
    if name == "ndarray" and dtype and shape:
        return int(np.prod([int(d) for d in shape.split(",")])) * np.dtype(dtype).itemsize
    return None


def _ndarray(buf: bytes, a: int, b: int, dtype: np.dtype | None, shape: tuple[int, ...] | None) -> np.ndarray:
    if dtype is None:
        code = buf[a]
        if code not in VALUE_DTYPES:
            raise DataError(f"unknown ndarray dtype code {code}")
        dtype, a = np.dtype(VALUE_DTYPES[code]), a + 1
    if shape is None:
        ndim, shape_code = buf[a] >> 2, buf[a] & 3
        shape_dtype = np.dtype(SHAPE_DTYPES[shape_code])
        shape = tuple(np.frombuffer(buf, shape_dtype, count=ndim, offset=a + 1).tolist())
        a += 1 + ndim * shape_dtype.itemsize
    count = math.prod(shape)
    if a + count * dtype.itemsize != b:
        raise DataError(f"an ndarray of shape {shape} ({dtype}) needs {count * dtype.itemsize} bytes, "
                         f"its value holds {b - a}")
    return np.frombuffer(buf, dtype, count=count, offset=a).reshape(shape)


def check_columns(shard: Shard, columns: Sequence[str], setting: str) -> None:
    """Every column of `columns` that the shard has must be one this module decodes, with the size it expects."""
    for name, encoding, size in zip(shard.column_names, shard.column_encodings, shard.column_sizes):
        if name not in columns:
            continue
        if decoder(encoding) is None:
            raise DataError(
                f"{setting}: {shard.path}: column {name!r} has encoding {encoding!r}, which is not read here "
                "(read: bytes, str, int, uint8-64, int8-64, float16-64, json, ndarray[:dtype[:shape]]; pkl is "
                "refused because unpickling runs arbitrary code)"
            )
        if size != fixed_size(encoding):
            raise DataError(f"{setting}: {shard.path}: column {name!r} ({encoding}) has size {size} in the index, "
                             f"the encoding's is {fixed_size(encoding)}")


def iter_samples(shard: Shard, columns: Sequence[str], setting: str,
                 buffer: bytearray | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sample index in the shard, {column: value}) of every sample of one shard, decoding only `columns` (those
    the shard has). Reads the whole shard at once (into `buffer`, see read_shard: the values are views of it):
    one shard at a time keeps memory flat. Sample positions are Python ints: this loop runs once per row."""
    check_columns(shard, columns, setting)
    data, offsets = read_shard(shard, setting, buffer)
    names = shard.column_names
    wanted = [(i, names[i], decoder(enc)) for i, enc in enumerate(shard.column_encodings) if names[i] in columns]
    variable = [i for i, size in enumerate(shard.column_sizes) if size is None]
    variable_sizes = struct.Struct(f"<{len(variable)}I")
    sizes = list(shard.column_sizes)
    for k, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        head = start + variable_sizes.size
        if head > end:
            raise DataError(f"{setting}: {shard.path} sample {k}: shorter than its column sizes (corrupt shard)")
        for i, size in zip(variable, variable_sizes.unpack_from(data, start)):
            sizes[i] = size
        bounds = [head]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        if bounds[-1] != end:
            raise DataError(f"{setting}: {shard.path} sample {k}: its columns take {bounds[-1] - head} bytes, "
                             f"the sample {end - head}")
        sample = {}
        for i, name, decode in wanted:
            try:
                sample[name] = decode(data, bounds[i], bounds[i + 1])
            except (ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error) as err:
                raise DataError(f"{setting}: {shard.path} sample {k}: column {name!r} does not decode "
                                 f"as {shard.column_encodings[i]} ({err})") from err
        yield k, sample
