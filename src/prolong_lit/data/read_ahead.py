"""Files read into the page cache ahead of the processes that will read them.

`prepare` in mode rows hands shards to worker processes that each read a shard (waiting on the disk) and then
convert it (using a core). With two workers on two cores both tend to read at the same time and then convert at
the same time, so the disk idles during every conversion: on a 1 GB dataset they read at ~1 GB/s where `cat`
reads at ~1.5. `ReadAhead` keeps the disk busy: a thread of the preparing process reads the next shards into the
page cache while the workers convert, without copying them anywhere (mmap + MADV_POPULATE_READ: the kernel reads
the pages and maps them; ~4 ms of CPU for a 64 MiB shard, where a read() into a buffer costs a copy), so a
worker's read then copies from memory. posix_fadvise(WILLNEED) would be the usual hint, but Linux caps it at one
readahead window (128 KiB here), and readahead(2) is not in Python's os module.

Where the kernel lacks MADV_POPULATE_READ (Linux < 5.14) or the platform lacks mmap.madvise, nothing is read
ahead: the workers read the disk themselves, as without this module. Errors are ignored here: the worker that
reads the file reports them.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Sequence
from pathlib import Path

# Linux's MADV_POPULATE_READ (include/uapi/asm-generic/mman-common.h); Python's mmap module names it from 3.13.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
# Python's madvise keeps the GIL while the kernel reads: one call per 4 MiB (~3 ms from the disk here) lets the
# preparing process's main thread hand out tasks meanwhile (one call per 64 MiB shard delayed them by ~0.25 s).
POPULATE_STEP = 4 << 20


def populate(path: Path) -> bool:
    """Read the file into the page cache (no copy into this process); False where the kernel cannot (any other
    failure, e.g. a vanished or empty file, is left to the file's reader)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            for start in range(0, len(mapped), POPULATE_STEP):  # madvise holds the GIL: in steps, not at once
                mapped.madvise(MADV_POPULATE_READ, start, min(POPULATE_STEP, len(mapped) - start))
    except AttributeError:  # no mmap.madvise on this platform
        return False
    except OSError as err:
        return err.errno != errno.EINVAL  # EINVAL: an advice this kernel does not know
    except ValueError:  # an empty file cannot be mapped
        pass
    return True


class ReadAhead:
    """Reads `paths` into the page cache in order, in a daemon thread, never more than `ahead` files beyond the
    last one the consumer reported done (`done(i)`), so the page cache it fills stays bounded. The thread starts
    at the first `done`: until then the main thread is handing out the first tasks and starting the worker
    processes, and a thread reading meanwhile (madvise keeps the GIL) delayed them by ~0.1 s. Use as a context
    manager: leaving it stops the thread."""

    def __init__(self, paths: Sequence[Path], ahead: int):
        self._paths, self._ahead = list(paths), max(1, ahead)
        self._done = 0  # files 0 .. _done - 1 are consumed
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="prepare-read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join()

    def done(self, index: int) -> None:
        """File `index` has been consumed: the thread may read one file further."""
        with self._changed:
            self._done = max(self._done, index + 1)
            self._changed.notify()
        if self._thread.ident is None:
            self._thread.start()

    def _run(self) -> None:
        for i in range(self._done, len(self._paths)):  # the files before were consumed already
            with self._changed:
                self._changed.wait_for(lambda i=i: self._stop or i < self._done + self._ahead)
                if self._stop:
                    return
            if not populate(self._paths[i]):
                return  # unsupported here: the workers read the disk themselves
