"""The callback thread of a hub: where user callbacks run, in order, one at a time.

Rule 1: user code never runs on the I/O thread. Everything queued here runs on this thread in
the order it was queued, from whatever thread queued it; a slow callback delays the callbacks
after it, never the connection.
Rule 2: a wake-up per batch, not per callback. The I/O thread queues the work of a whole pass
of its loop (or ``DISPATCH_BATCH`` readings) and then wakes this thread once (``flush``);
another thread's work wakes it at once. A thousand readings a second cost a few dozen
wake-ups.
Rule 3: each wake-up token is put after the work it stands for, so no work is left without a
token still to come; a token whose work already ran costs one look at an empty queue.
Rule 4: closing is a marker in the queue: what was queued before it (a Status finishing, a
last disconnection callback) still runs. After the thread has ended, work runs at once on
the caller's thread, so nothing handed over later is lost.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable

from pvhub.logs import library_logger

log = library_logger("pvhub.client")

# Readings the I/O thread applies before it wakes the dispatcher even mid-drain (Rule 2).
DISPATCH_BATCH = 128


class Dispatcher:
    """Runs callbacks on a thread of its own (Rules 1-4)."""

    def __init__(self) -> None:
        self.dispatches = 0  # callbacks queued (benchmarks: work per reading)
        # (func, args, kwargs) in order, None once closing. The wake-up queue is a
        # SimpleQueue: its put and get are C, an Event's set and wait are Python and a new
        # lock per wait.
        self._work: collections.deque = collections.deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._batcher: int | None = None  # the thread that wakes us per batch (Rule 2)
        self._batched = False  # that thread queued work it has not woken us for
        self._ended = False
        self.thread = threading.Thread(target=self._run, name="pvhub-callbacks", daemon=True)
        self.thread.start()

    def batch_from_this_thread(self) -> None:
        """From now on, work queued by the calling thread waits for its ``flush`` (Rule 2)."""
        self._batcher = threading.get_ident()

    def dispatch(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` on the callback thread, after everything queued
        before it; once the thread has ended, at once on the caller's (Rule 4)."""
        if self._ended:
            func(*args, **kwargs)
            return
        self.dispatches += 1
        self._work.append((func, args, kwargs))
        if threading.get_ident() == self._batcher:
            self._batched = True
        else:
            self._wake.put(None)

    def flush(self) -> None:
        """On the batching thread: its batch is complete, the callbacks may run (Rule 2)."""
        if self._batched:
            self._batched = False
            self._wake.put(None)

    def close(self, timeout: float = 5.0) -> None:
        """Run what is queued, then end the thread (Rule 4)."""
        self._work.append(None)
        self._wake.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.get()
            if self._run_queued():  # the close came; what came with or after it still runs
                self._ended = True
                self._run_queued()  # queued between the last look and the flag
                return

    def _run_queued(self) -> bool:
        """Run what is queued, in order; whether the close was among it."""
        work, closing = self._work, False
        while work:
            item = work.popleft()
            if item is None:
                closing = True  # statuses must still finish: go on
                continue
            func, args, kwargs = item
            try:
                func(*args, **kwargs)
            except Exception:
                log.exception("callback_failed", callback=repr(func))
            # Hold nothing between callbacks: a Signal the user dropped must be freed.
            del item, func, args, kwargs
        return closing
