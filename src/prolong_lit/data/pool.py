"""Work spread over worker processes with results kept in input order (so prepare's output does not depend on
the number of workers)."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator

# fork starts a worker (and litdata's writer) in ~0.5 s instead of ~5 s (spawn re-imports torch); spawn where
# fork is missing.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


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
    with mp.get_context(START_METHOD).Pool(num_workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= window * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
