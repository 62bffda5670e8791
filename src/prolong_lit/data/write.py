"""Writing a planned domain as a litdata directory: `write_domain` (every packing mode but rows, which writes its
chunks directly: rows.py, litdata_chunks.py) and the content digest that pins index.json; the
scratch folder beside the output and the errors of a full or read-only disk.

litdata's own `BinaryWriter` writes the chunks, in this process and fed the samples in order, so chunk contents
and names are a function of the plan alone and the same input gives the same bytes in every output file (the
bytes `litdata.optimize` with one ordered worker writes). Not `optimize` itself: it writes from a worker process,
and a failure there (a full disk) left the parent waiting on its queues, a hang with nothing printed; here an
OSError reaches the caller (prepare.py turns it into an error naming the file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from prolong_lit.data.packing import SampleBuilder, TokenStore
from prolong_lit.errors import DataError

log = logging.getLogger(__name__)


def write_domain(store: TokenStore, plan: list[np.ndarray], seq_len: int, out: Path, chunk_bytes: str = "64MB") -> None:
    """Write the planned samples of one domain into the litdata directory `out`."""
    from litdata.streaming.writer import BinaryWriter

    builder = SampleBuilder(store.tokens_path, store.mask_path if store.has_mask else None, seq_len)
    hasher = _ChunkHasher(Path(out))
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    writer._rank = 0  # the only writer: chunk-0-<k>.bin, 0.index.json (as litdata's optimize sets it in its worker)
    hasher.start()
    try:
        for i, spans in enumerate(plan):
            writer[i] = builder(spans)
        writer.done()
        writer.merge(num_workers=1)  # 0.index.json -> index.json
    except OSError as err:
        if err.filename is None:  # a failed write or close: the chunk being written (its number not yet advanced)
            err.filename = str(Path(out) / writer.get_chunk_filename())
        raise
    finally:
        hasher.finish()
    _pin_index_timestamp(Path(out), hasher)


class _ChunkHasher(threading.Thread):
    """Hashes the chunk files of `out` in order while the writer is still writing the later ones (hashlib
    releases the GIL on large buffers: on two cores the sha256 then costs little wall time).

    litdata's writer writes chunk `chunk-0-<k>.bin` whole (opened, written, closed) before it creates
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


# ---- the output folder: scratch beside it, and disk errors ----

SCRATCH_SUFFIX = ".prepare-scratch"
_OWNER = "owner"


def scratch_path(out: Path) -> Path:
    """The scratch folder of output_dir `out`: beside it (same filesystem: a rows domain is moved, not copied),
    under a fixed name, so the next `prepare` finds and removes what a killed one left."""
    return out.parent / f".{out.name}{SCRATCH_SUFFIX}"


@contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """The scratch folder of `out` for the block, removed after it (also on an error, a Ctrl-C or a SIGTERM that
    `prepare` turns into an exit). A folder left by a prepare that was killed is removed first; one that a
    running prepare (same host, live pid) owns is refused: both would write the same output_dir."""
    scratch = scratch_path(out)
    if scratch.exists():
        owner = _live_owner(scratch)
        if owner is not None:
            raise DataError(f"output_dir: another prepare (pid {owner}) is writing {str(out)!r} (its scratch folder "
                            f"{scratch}); wait for it to end, or if no such prepare runs, delete that folder")
        log.info("removing the scratch folder %s that an interrupted prepare left", scratch)
        shutil.rmtree(scratch)
    try:
        with disk_errors(scratch):
            scratch.mkdir(parents=True)
            (scratch / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _live_owner(scratch: Path) -> int | None:
    """The pid of the running process on this host that owns `scratch`, or None (gone, another host's, or an
    unreadable owner file: a kill can leave it empty)."""
    try:
        host, pid = (scratch / _OWNER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    return pid


@contextmanager
def disk_errors(where: Path, setting: str = "output_dir") -> Iterator[None]:
    """An OSError of the block about a file under `where` or about none (a full disk, a read-only or unwritable
    folder, a file size limit) -> a DataError naming the file (or `where`) and what to do."""
    try:
        yield
    except OSError as err:
        if err.filename and not _inside(Path(err.filename), where):
            raise  # about another file (a source being read): not this folder's disk
        raise DataError(os_error_message(err, where, setting)) from err


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def os_error_message(err: OSError, where: Path, setting: str = "output_dir") -> str:
    """One line for an OSError met while writing under `where`: the file, the system's reason, what to do."""
    path = Path(err.filename) if err.filename else where
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        room = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        advice = f"free some space{room} or choose another {setting}"
    elif err.errno == errno.EFBIG:
        advice = f"a file size limit stops it (`ulimit -f`, or the filesystem's): raise it or choose another {setting}"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        advice = f"choose a writable {setting}"
    else:
        advice = f"check {setting}"
    return f"{setting}: writing {path} failed: {reason}; {advice}, then run the command again"


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None
