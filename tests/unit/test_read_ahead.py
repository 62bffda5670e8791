"""ReadAhead (data/read_ahead.py): files read into the page cache in order, never further than `ahead` beyond what
the consumer has finished, and nothing at all where the kernel cannot."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from prolong_lit.data import read_ahead
from prolong_lit.data.read_ahead import ReadAhead, read_into_page_cache


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(8):
        path = tmp_path / f"shard.{i}"
        path.write_bytes(bytes([i]) * (3 << 20 if i == 0 else 1000))
        paths.append(path)
    return paths


def test_a_file_is_read_whole_and_an_unsupported_kernel_says_so(files, monkeypatch, tmp_path):
    null = os.open(os.devnull, os.O_WRONLY)
    sent = []
    real_sendfile = os.sendfile

    def counting(out_fd, in_fd, offset, count):
        n = real_sendfile(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    try:
        monkeypatch.setattr(os, "sendfile", counting)
        assert read_into_page_cache(files[0], null) and sum(sent) == files[0].stat().st_size
        (tmp_path / "empty").touch()
        assert read_into_page_cache(tmp_path / "empty", null)
        assert read_into_page_cache(tmp_path / "vanished", null)  # the file's reader reports it

        def unsupported(*args):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(os, "sendfile", unsupported)
        assert not read_into_page_cache(files[1], null)
    finally:
        os.close(null)


def test_reads_in_order_never_beyond_ahead_of_what_is_done(files, monkeypatch):
    read, lock = [], threading.Lock()
    progress = threading.Semaphore(0)

    def record(path, null_fd):
        with lock:
            read.append(files.index(path))
        progress.release()
        return True

    monkeypatch.setattr(read_ahead, "read_into_page_cache", record)
    with ReadAhead(files, ahead=2) as ahead:
        for _ in range(2):
            progress.acquire()
        assert read == [0, 1]  # `ahead` files before anything is done
        for i in range(len(files)):
            ahead.done(i)
            limit = min(len(files), i + 1 + 2)
            while len(read) < limit:
                progress.acquire()
            assert max(read) < limit
    assert read == list(range(len(files)))  # in order, each once


def test_an_unsupported_kernel_stops_reading_ahead_and_leaving_stops_the_thread(files, monkeypatch):
    calls = []
    monkeypatch.setattr(read_ahead, "read_into_page_cache", lambda path, null_fd: calls.append(path) and False)
    with ReadAhead(files, ahead=4) as ahead:
        ahead._thread.join(timeout=10)
        assert not ahead._thread.is_alive() and len(calls) == 1
    waiting = ReadAhead(files, ahead=1)
    with waiting:
        pass  # the thread waits for a done() that never comes, until the block ends
    assert not waiting._thread.is_alive()
