"""ReadAhead (data/read_ahead.py): files read into the page cache in order, never further than `ahead` beyond what
the consumer has finished, and nothing at all where the kernel cannot."""

from __future__ import annotations

import threading

import pytest

from prolong_lit.data import read_ahead
from prolong_lit.data.read_ahead import ReadAhead, populate


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(8):
        path = tmp_path / f"shard.{i}"
        path.write_bytes(bytes([i]) * (5 << 20 if i == 0 else 1000))  # the first spans two madvise steps
        paths.append(path)
    return paths


def test_populate_reads_a_real_file_and_says_when_the_kernel_cannot(files, monkeypatch, tmp_path):
    assert populate(files[0]) and populate(files[1])
    (tmp_path / "empty").touch()
    assert populate(tmp_path / "empty")  # nothing to read: not a reason to stop reading ahead
    monkeypatch.setattr(read_ahead, "MADV_POPULATE_READ", 12345)  # an advice no kernel knows: EINVAL
    assert not populate(files[1])


def test_reads_in_order_never_beyond_ahead_of_what_is_done(files, monkeypatch):
    read, lock = [], threading.Lock()
    progress = threading.Semaphore(0)

    def record(path):
        with lock:
            read.append(files.index(path))
        progress.release()
        return True

    monkeypatch.setattr(read_ahead, "populate", record)
    with ReadAhead(files, ahead=2) as ahead:
        assert not read  # nothing before the first done: the first tasks are being handed out
        for i in range(len(files)):
            ahead.done(i)
            limit = min(len(files), i + 1 + 2)
            while len(read) < limit - 1:  # the files after i, up to i + 2
                progress.acquire()
            assert max(read) < limit
    assert read == list(range(1, len(files)))  # in order, each once, from the first not yet done


def test_an_unsupported_kernel_stops_reading_ahead_and_leaving_stops_the_thread(files, monkeypatch):
    calls = []
    monkeypatch.setattr(read_ahead, "populate", lambda path: calls.append(path) and False)
    with ReadAhead(files, ahead=4) as ahead:
        ahead.done(0)
        ahead._thread.join(timeout=10)
        assert not ahead._thread.is_alive() and len(calls) == 1
    slow = ReadAhead(files, ahead=1)
    with slow:
        slow.done(0)  # the thread waits for more done() calls, until the block ends
    assert not slow._thread.is_alive()
