"""Work spread over worker processes with results kept in input order (so prepare's output does not depend on
the number of workers).

A failure in a worker reaches the caller at once: an exception it raised is re-raised here (an OSError keeps its
errno and file, so prepare names the file of a full disk), and a worker that dies (the kernel's out-of-memory
killer, a SIGKILL) is an error too, where multiprocessing.Pool would wait forever for the task it held. On any
error (or when the caller stops reading) the other workers are terminated, not waited for.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

# fork starts a worker in ~0.5 s instead of ~5 s (spawn re-imports torch); spawn where fork is missing.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


class WorkerDied(RuntimeError):
    """A worker process ended without a result (killed: often the out-of-memory killer)."""


def ordered_map(fn: Callable, tasks: Iterable, num_workers: int, window: int = 2,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """fn(task) for every task, in task order, computed by `num_workers` processes (in this one for 0 or 1,
    after `initializer(*initargs)`). At most `window` x num_workers tasks are in flight: Pool.imap would read
    every task into its queue ahead of the workers (a whole corpus, a whole dataset)."""
    if num_workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context(START_METHOD), initializer=_start_worker,
                               initargs=(initializer, initargs))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= window * num_workers:
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    except BaseException:  # an error here or in a worker, a Ctrl-C, or the caller closing the generator
        _terminate(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise WorkerDied(f"a worker process of `prepare` died without finishing its task ({err}); the system may "
                         "have killed it for lack of memory: try fewer num_workers") from err


def _terminate(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (their tasks are of no use any more); shutdown then only reaps them."""
    for process in list((pool._processes or {}).values()):  # no public way before Python 3.14
        if process.is_alive():
            process.terminate()


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    """A worker dies at once on SIGTERM, as `_terminate` expects: a forked worker would otherwise inherit the
    parent's handler (`prepare` exits through its clean-up on SIGTERM) and run it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer(*initargs)
