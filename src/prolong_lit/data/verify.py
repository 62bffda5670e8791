"""Checking prepared data before anything reads it: the directory is a finished `prepare` output
(`check_prepared_dir`), and each domain's litdata files are whole (`verify_domain`).

litdata's reader takes a chunk file smaller than its index says for a download still in progress: it waits for
the rest (forever in a DataLoader worker, or until a timeout that blames "a crashed download"). A truncated
chunk (a copy cut short, a full disk) then hangs `fit` instead of failing. So the DataModule checks every
domain when it sets up (`verify_domain`): in seconds, before litdata opens a file, and with an error naming the
file and what is wrong with it.

What is checked needs nothing beyond what litdata's own writer records, so it applies to every prepared
dataset, old or new (and to litdata directories written by other tools): index.json parses and lists its
chunks; every chunk file exists and has exactly the size index.json records for it (`chunk_bytes`, the file's
size for both of litdata's writers and ours, litdata_chunks.py); and, for uncompressed chunks, the chunk's
header agrees: its first uint32 is the item count index.json records (`chunk_size`) and its offset table
starts after the header, never decreases and ends at the file's size. Reading the headers costs one small read
per chunk, not the data (benchmarks: ~1,000 chunks in well under a second).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prolong_lit.data.format import MANIFEST_NAME
from prolong_lit.errors import DataError, MissingPathError

INDEX_NAME = "index.json"
# Written into a prepare output_dir while it is being written, removed once its manifest is: a directory holding
# it is no usable data (a prepare was killed or failed there).
INCOMPLETE_MARKER = ".prepare-incomplete"
_AGAIN = "the prepared data is damaged or incomplete: run `prepare` again (with --overwrite)"


def read_chunk_index(domain_dir: Path, setting: str = "data.data_dir") -> dict:
    """A domain's index.json, parsed and its chunk list checked (entries with filename, chunk_bytes and
    chunk_size); a DataError naming the file otherwise."""
    path = Path(domain_dir) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{setting}: {str(domain_dir)!r} holds no {INDEX_NAME}; {_AGAIN}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{setting}: {path} is not valid JSON ({err}); {_AGAIN}") from err
    chunks = index.get("chunks") if isinstance(index, dict) else None
    keys = ("filename", "chunk_bytes", "chunk_size")
    if not isinstance(chunks, list) or not all(isinstance(c, dict) and all(k in c for k in keys) for c in chunks):
        raise DataError(f"{setting}: {path} does not list its chunks ({', '.join(keys)} of each); {_AGAIN}")
    return index


def verify_domain(domain_dir: str | Path, setting: str = "data.data_dir") -> int:
    """Check a litdata directory's index.json and every chunk file it lists (see the module docstring);
    returns the number of items. Raises DataError naming the file, what index.json records and what is there."""
    domain_dir = Path(domain_dir)
    index = read_chunk_index(domain_dir, setting)
    config = index.get("config") or {}
    plain = not any(config.get(key) for key in ("compression", "encryption"))  # the header is readable as is
    for chunk in index["chunks"]:
        path = domain_dir / chunk["filename"]
        expected = int(chunk["chunk_bytes"])
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{setting}: chunk file {path} is missing ({INDEX_NAME} lists it, "
                            f"{expected} bytes); {_AGAIN}") from None
        if size != expected:
            what = "truncated" if size < expected else "longer than recorded"
            raise DataError(f"{setting}: chunk file {path} is {what}: {INDEX_NAME} records {expected} bytes, the "
                            f"file has {size}; {_AGAIN}")
        if plain:
            _check_header(path, size, int(chunk["chunk_size"]), setting)
    return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])


def _check_header(path: Path, size: int, items: int, setting: str) -> None:
    """A litdata chunk starts with uint32 n (items), then uint32 offsets[n + 1]: offsets[0] is the header's
    size, offsets[n] the file's; each item lies between consecutive offsets."""
    header = 4 * (items + 2)
    with open(path, "rb") as f:
        raw = f.read(header)
    if len(raw) < header:
        raise DataError(f"{setting}: chunk file {path} is too short ({size} bytes) for the header of its {items} "
                        f"items; {_AGAIN}")
    values = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    count, offsets = int(values[0]), values[1:]
    if count != items:
        raise DataError(f"{setting}: chunk file {path} holds {count} items, {INDEX_NAME} records {items}; {_AGAIN}")
    if offsets[0] != header or offsets[-1] != size or (np.diff(offsets) < 0).any():
        raise DataError(f"{setting}: chunk file {path} has a damaged header (its item offsets do not run from "
                        f"{header} to the file's {size} bytes); {_AGAIN}")


def check_prepared_dir(data_dir: str | Path, setting: str = "data.data_dir") -> None:
    """`data_dir` is a finished `prepare` output: a directory, not marked incomplete, with a manifest.json.
    (The first and last are FileNotFoundErrors, as the DataModule always raised them.)"""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MissingPathError(f"{setting}: {str(data_dir)!r} is not a directory")
    if (data_dir / INCOMPLETE_MARKER).exists():
        raise DataError(f"{setting}: {str(data_dir)!r} is an incomplete preparation (a prepare that was interrupted "
                        f"or failed left it: {INCOMPLETE_MARKER}); run `prepare` again with --overwrite")
    if not (data_dir / MANIFEST_NAME).is_file():
        raise MissingPathError(f"{setting}: {str(data_dir)!r} holds no {MANIFEST_NAME}; build it with "
                                "`python -m prolong_lit prepare`")
