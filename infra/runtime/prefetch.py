"""Run an iterator one step ahead of its consumer, in a background thread.

A stage's shard loop alternates reading + decoding a batch and running the model on it. PIL's decoders
and torch's kernels run outside the GIL, so producing the next batch while the model works on this one
overlaps the two, as a DataLoader worker would, without another process. The reader's pure-Python work
(parsing tar headers) holds the GIL and stalls the model thread instead, so it is kept small
(``infra.storage.tarstream``). Reading ahead works within a shard: a shard of one batch has nothing to overlap.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Yield ``items`` in order while up to ``depth`` further items are produced in one worker thread.

    Exceptions of the producer are raised here, at the item where they happened. Stopping early (the
    consumer breaks or is closed) waits for the items in flight, then closes ``items``.
    """
    source = iter(items)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as worker:
            pending = deque(worker.submit(next, source, _END) for _ in range(depth))
            while (item := pending.popleft().result()) is not _END:
                pending.append(worker.submit(next, source, _END))
                yield item
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
