"""trickbag.prefetch.ThreadAhead: the source's items in order, bounded run-ahead, errors re-raised, clean stops."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from trickbag.prefetch import ThreadAhead


def counting(n, taken):
    for k in range(n):
        taken.append(k)
        yield k


def test_items_in_order_and_at_most_depth_ahead():
    taken = []
    ahead = ThreadAhead(counting(10, taken), depth=2)
    time.sleep(0.3)
    assert len(taken) == 3  # two waiting in the queue, one produced and waiting for room
    assert list(ahead) == list(range(10))
    assert list(ahead) == []  # ended: stays ended
    assert not ahead.alive


def test_the_sources_error_is_raised_again_after_the_items_before_it():
    error = ValueError("bad file: broken.jpg")

    def failing():
        yield 1
        raise error

    ahead = ThreadAhead(failing())
    assert next(ahead) == 1
    with pytest.raises(ValueError, match="broken.jpg") as raised:
        next(ahead)
    assert raised.value is error
    with pytest.raises(StopIteration):
        next(ahead)


def test_close_and_collection_stop_the_thread():
    ahead = ThreadAhead(iter(range(10**9)), depth=1)
    next(ahead)
    ahead.close()
    assert not ahead.alive
    with pytest.raises(StopIteration):
        next(ahead)
    ahead = ThreadAhead(iter(range(10**9)), depth=1, name="collected")
    del ahead
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "collected" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "collected" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_bad_depth_is_named(depth):
    with pytest.raises(ValueError, match="depth"):
        ThreadAhead(iter([]), depth=depth)
