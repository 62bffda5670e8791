"""Files read into the page cache ahead of the processes that will read them.

`prepare` in mode rows hands shards to worker processes that each read a shard (waiting on the disk) and then
convert it (using a core). With two workers on two cores both tend to read at the same time and then convert at
the same time, so the disk idles during every conversion: on a 1 GB dataset they read at ~1 GB/s where `cat`
reads at ~1.4. `ReadAhead` keeps the disk busy: a thread of the preparing process reads the next shards into the
page cache while the workers convert, and a worker's read then copies from memory.

The thread reads a file by sendfile(2) into /dev/null: the kernel reads the pages into the page cache and copies
them nowhere (~2 ms of CPU for a 64 MiB shard, where a read() into a buffer costs a 64 MiB copy), and Python
releases the GIL meanwhile, so the main thread hands out tasks undisturbed. Tried and dropped here:
posix_fadvise(WILLNEED), which Linux caps at one readahead window (128 KiB on this disk: a shard read 0.3 s after
the hint was as slow as a cold one), and mmap + madvise(MADV_POPULATE_READ), which works but keeps the GIL while
the disk reads. Where sendfile cannot write to /dev/null (not Linux), nothing is read ahead: the workers read the
disk themselves, as without this module. Other errors are ignored here: the worker that reads the file reports
them.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path


def read_into_page_cache(path: Path, null_fd: int) -> bool:
    """Read the file into the page cache, copying it nowhere; False where sendfile to /dev/null is unsupported
    (any other failure, e.g. a vanished file, is left to the file's reader)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size and (sent := os.sendfile(null_fd, fd, offset, size - offset)):
            offset += sent
    except (AttributeError, NotImplementedError):  # no os.sendfile on this platform
        return False
    except OSError as err:  # EINVAL / ENOTSOCK / ENOSYS: this kernel sends files to sockets (or nowhere) only
        return err.errno not in {errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK}
    finally:
        os.close(fd)
    return True


class ReadAhead:
    """Reads `paths` into the page cache in order, in a daemon thread, never more than `ahead` files beyond the
    last one the consumer reported done (`done(i)`), so the page cache it fills stays bounded. Use as a context
    manager: entering starts the thread, leaving stops it."""

    def __init__(self, paths: Sequence[Path], ahead: int):
        self._paths, self._ahead = list(paths), max(1, ahead)
        self._done = 0  # files 0 .. _done - 1 are consumed
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="prepare-read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        self._thread.join()

    def done(self, index: int) -> None:
        """File `index` has been consumed: the thread may read one file further."""
        with self._changed:
            self._done = max(self._done, index + 1)
            self._changed.notify()

    def _run(self) -> None:
        null_fd = os.open(os.devnull, os.O_WRONLY)
        try:
            for i, path in enumerate(self._paths):
                with self._changed:
                    self._changed.wait_for(lambda i=i: self._stop or i < self._done + self._ahead)
                    if self._stop:
                        return
                    if i < self._done:  # consumed already
                        continue
                if not read_into_page_cache(path, null_fd):
                    return  # unsupported here: the workers read the disk themselves
        finally:
            os.close(null_fd)
