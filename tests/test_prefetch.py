"""infra.runtime.prefetch: a shard's next batch is produced while the current one is used."""

from __future__ import annotations

import threading

import pytest

from infra.runtime.prefetch import prefetch


def test_items_come_in_order_and_the_next_one_is_made_ahead():
    made: list[int] = []
    second_made = threading.Event()

    def source():
        for i in range(5):
            made.append(i)
            if i == 1:
                second_made.set()
            yield i

    seen = []
    for item in prefetch(source()):
        if item == 0:  # while the consumer still holds item 0, the producer makes item 1
            assert second_made.wait(timeout=10)
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4] and made == seen


def test_a_producer_error_is_raised_at_its_item():
    def source():
        yield "a"
        raise ValueError("corrupt batch")

    items = prefetch(source())
    assert next(items) == "a"
    with pytest.raises(ValueError, match="corrupt batch"):
        next(items)


def test_stopping_early_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            yield from range(100)
        finally:
            closed.set()

    items = prefetch(source(), depth=2)
    assert [next(items), next(items)] == [0, 1]
    items.close()
    assert closed.is_set()
