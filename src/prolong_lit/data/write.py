"""Writing a planned domain as a litdata directory: `write_domain` (every packing mode but rows, which writes its
chunks directly: rows.py, litdata_chunks.py) and the content digest that pins index.json.

One litdata worker, fed the samples in order, writes the chunks, so chunk contents and names are a function of
the plan alone and the same input gives the same bytes in every output file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np

from prolong_lit.data.packing import SampleBuilder, TokenStore
from prolong_lit.data.pool import START_METHOD


def write_domain(store: TokenStore, plan: list[np.ndarray], seq_len: int, out: Path, chunk_bytes: str = "64MB") -> None:
    """Write the planned samples of one domain into the litdata directory `out`."""
    from litdata import optimize

    builder = _WriterFn(SampleBuilder(store.tokens_path, store.mask_path if store.has_mask else None, seq_len))
    previous = mp.get_start_method(allow_none=True)
    hasher = _ChunkHasher(Path(out))
    hasher.start()
    try:
        # One worker fed the samples in order (no reordering, no shared queue): chunk contents and names are
        # then a function of the plan alone.
        optimize(
            fn=builder,
            inputs=plan,
            output_dir=str(out),
            chunk_bytes=chunk_bytes,
            num_workers=1,
            reorder_files=False,
            keep_data_ordered=True,
            start_method=START_METHOD,
            verbose=False,
        )
    finally:
        mp.set_start_method(previous, force=True)  # litdata sets the start method process-wide
        hasher.finish()
    _pin_index_timestamp(Path(out), hasher)


class _WriterFn:
    """optimize's fn, run in litdata's writer process: the SampleBuilder, and before its first sample glibc is told
    to keep freed memory in the heap (`_reuse_freed_memory`)."""

    def __init__(self, builder: SampleBuilder) -> None:
        self.builder = builder
        self.tuned = False

    def __call__(self, spans: np.ndarray) -> dict[str, np.ndarray]:
        if not self.tuned:
            _reuse_freed_memory()
            self.tuned = True
        return self.builder(spans)


def _reuse_freed_memory() -> None:
    """In litdata's writer process (only there: it exits when the domain is written): serve every allocation
    from the heap and keep what is freed. litdata copies each chunk twice through fresh chunk-sized buffers
    (~64 MB), which glibc would otherwise mmap and unmap each time, paying a page fault per 4 KiB on every
    copy: a third of the writer's time. The heap then stays at the writer's peak (a chunk and its copies),
    which does not grow with the data. No effect where the C library is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)


class _ChunkHasher(threading.Thread):
    """Hashes the chunk files of `out` in order while litdata's writer process is still writing the later ones
    (this process only waits for it meanwhile; on two cores the sha256 then costs no wall time).

    litdata's one worker writes chunk `chunk-0-<k>.bin` whole (opened, written, closed) before it creates
    `chunk-0-<k+1>.bin`, so a chunk is complete once the next one exists; the last one is left to
    `_pin_index_timestamp`, which also checks the hashed files against the final index (names in order, sizes)
    and hashes everything again if they disagree: the digest never depends on this thread's timing.
    """

    POLL_S = 0.02

    def __init__(self, out: Path) -> None:
        super().__init__(name="chunk-hasher", daemon=True)
        self.out = out
        self.digest = hashlib.sha256()
        self.hashed: list[tuple[str, int]] = []  # (file name, bytes hashed), in order
        self.failed = False
        self._finished = threading.Event()

    def run(self) -> None:
        try:
            while True:
                stopping = self._finished.is_set()
                while (self.out / f"chunk-0-{len(self.hashed) + 1}.bin").exists():
                    name = f"chunk-0-{len(self.hashed)}.bin"
                    self.hashed.append((name, _hash_file(self.out / name, self.digest)))
                if stopping:
                    return
                self._finished.wait(self.POLL_S)
        except OSError:
            self.failed = True  # _pin_index_timestamp hashes every chunk itself

    def finish(self) -> None:
        self._finished.set()
        self.join()


def _hash_file(path: Path, digest) -> int:
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
            size += len(block)
    return size


def _pin_index_timestamp(out: Path, hasher: _ChunkHasher | None = None) -> None:
    """Replace index.json's `updated_at` (a wall-clock time) by a digest of the chunk files.

    litdata only uses it to name and invalidate its cache of a remote copy; a content digest serves that
    purpose and makes the output byte-identical across runs. The digest is the sha256 of the chunk files'
    bytes, concatenated in index order; `hasher` may have hashed a prefix of them already.
    """
    index_path = out / "index.json"
    index = json.loads(index_path.read_text())
    names = [chunk["filename"] for chunk in index["chunks"]]
    done = hasher.hashed if hasher is not None and not hasher.failed else []
    if done and done == [(name, (out / name).stat().st_size) for name in names[: len(done)]]:
        digest = hasher.digest
    else:
        digest, done = hashlib.sha256(), []
    for name in names[len(done):]:
        _hash_file(out / name, digest)
    index["updated_at"] = digest.hexdigest()[:32]
    index_path.write_text(json.dumps(index, sort_keys=True))
