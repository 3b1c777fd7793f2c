"""An iterator run a few items ahead in a background thread of this process.

What ``torch.utils.data.DataLoader``'s pin-memory thread does for pinning, for any per-item host work that would
otherwise run between two model steps: receiving a batch from the worker processes, normalising it, moving it to
the device. The work is mostly torch kernels and blocking queue reads, which release the GIL, so it overlaps the
trainer's step.

The contract: ``ThreadAhead(source, depth)`` yields ``source``'s items in order; at most ``depth`` items wait in
its queue (plus the one the thread is producing), so memory stays bounded. An exception raised by ``source``
(a DataLoader re-raises a worker's there) is raised again, the same object with its message and traceback, by the
``next()`` that would have returned the failed item. ``close()`` stops the thread and waits for it; a
ThreadAhead that is garbage collected without ``close()`` tells its thread to stop, and the daemon thread exits
within ``_POLL_S`` once the item it is producing is done (it never keeps the process alive at exit).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator

__all__ = ["ThreadAhead"]

# How often a blocked thread or reader looks at the stop event / the thread's liveness. Blocking calls with a
# timeout wake at once when their condition is met, so this is only the latency of a stop.
_POLL_S = 0.1
_ITEM, _ERROR, _END = 0, 1, 2
# Every thread started here and its stop event, for _stop_all at interpreter exit.
_RUNNING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stop_all() -> None:
    """At exit, stop the threads before the DataLoader shuts its workers down: a daemon thread still inside
    ``next()`` on a DataLoader while the interpreter finalises can abort the process (SIGABRT, seen in the kill -9
    resume test under load). Registered again at each thread start: atexit runs the last registered first."""
    for stop in list(_RUNNING.values()):
        stop.set()
    for thread in list(_RUNNING):
        thread.join(timeout=10.0)


def _fill(source: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """The thread: ``source``'s items into ``out`` until ``source`` ends or fails, or ``stop`` is set.

    A plain function of these three, not a method: a thread holding its ThreadAhead would keep it alive forever,
    and with it the DataLoader's worker processes.
    """
    try:
        while not stop.is_set():
            try:
                item = (_ITEM, next(source))
            except StopIteration:
                item = (_END, None)
            if not _put(out, item, stop) or item[0] == _END:
                return
    except BaseException as error:  # noqa: BLE001 - handed to the reader, who raises it
        _put(out, (_ERROR, error), stop)


def _put(out: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    """Put ``item`` once there is room; False if ``stop`` was set first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


class ThreadAhead:
    """``source``'s items, produced by a daemon thread up to ``depth`` items ahead of the reader.

    Args:
        source: an iterator, advanced only by the thread from now on.
        depth: items the thread may finish before they are asked for (>= 1).
        name: the thread's name (shown by ``threading.enumerate()`` and debuggers).
    """

    def __init__(self, source: Iterator, depth: int = 2, name: str = "trickbag-ahead") -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_fill, args=(source, self._queue, self._stop), name=name,
                                        daemon=True)  # fmt: skip
        # Re-registered last, so it runs before any exit handler registered so far.
        atexit.unregister(_stop_all)
        atexit.register(_stop_all)
        _RUNNING[self._thread] = self._stop
        self._thread.start()
        # Only sets the event: a finaliser may run on any thread, the producing one included, so it must not join.
        weakref.finalize(self, self._stop.set)
        self._done = False

    def __iter__(self) -> ThreadAhead:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError(
                        "the prefetching thread stopped (closed?) before its source ended"
                    ) from None
        if kind == _ITEM:
            return value
        self._done = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it (it first finishes the item it is producing, if any)."""
        self._done = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
