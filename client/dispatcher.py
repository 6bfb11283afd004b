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
Rule 5: the queue is bounded as a Channel Access server bounds a slow client's events. While
``MAX_BACKLOG`` callbacks (or ``MAX_BACKLOG_BYTES`` of arrays) wait, the user's callbacks are
behind the updates: a new reading for a listener whose last queued change is a reading still
waiting takes that reading's place (the callback runs once, with the newest), as rsrv
replaces a subscription's last queued event when its queue is full. Nothing else is merged
(a Status finishing, a connection change), and a reading is never merged across another
change of its listener, so each listener still sees its changes in order. The queue then
holds at most ``MAX_BACKLOG`` items, one more reading per listener, and the work users
started. A merged change keeps what its listener last saw where it says so (``kept``: the
``old_value`` of a Signal's callback is the value before the first reading merged, not one
the callback never saw). Listeners are told apart by identity (``id``), whatever their
``__eq__`` says; the waiting change holds its listener, so the id is not reused meanwhile.
Falling behind logs ``callbacks_behind``, and catching up ``callbacks_caught_up`` with how
many readings were merged since the last such line; each at most once per ``BEHIND_LOG_S``,
however bursty.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from pvhub.logs import library_logger

log = library_logger("pvhub.client")

# Readings the I/O thread applies before it wakes the dispatcher even mid-drain (Rule 2).
DISPATCH_BATCH = 128
# Waiting callbacks, or bytes of arrays in waiting readings, past which readings merge (Rule 5).
MAX_BACKLOG = 10_000
MAX_BACKLOG_BYTES = 64 * 2**20
BEHIND_LOG_S = 10.0  # Rule 5: the least time between two callbacks_behind lines


_NO_KWARGS: dict[str, Any] = {}


def array_bytes(value: Any) -> int:
    """What a reading's value weighs against ``MAX_BACKLOG_BYTES``: an array's bytes (Rule 5)."""
    return value.nbytes if type(value) is np.ndarray else 0


class _Change:
    """A listener's change waiting in the queue (Rule 5): its ``args`` are replaced when a
    newer reading merges into it."""

    __slots__ = ("args", "func", "listener", "size")

    def __init__(self, func: Callable[..., Any], args: tuple, listener: object, size: int) -> None:
        self.func = func
        self.args = args
        self.listener = listener
        self.size = size


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
        # Rule 5: each listener's last queued change while it is a reading that may take a
        # newer one's place, and the bytes of arrays waiting; both under ``_lock``.
        self.max_backlog, self.max_backlog_bytes = MAX_BACKLOG, MAX_BACKLOG_BYTES
        self.merged = 0  # readings that took a waiting one's place
        self._lock = threading.Lock()
        self._mergeable: dict[int, _Change] = {}  # by id(listener)
        self._bytes = 0
        self._behind = False  # merging since the queue was last empty
        self._behind_logged_at: float | None = None  # when callbacks_behind was last logged
        self._announced = False  # callbacks_behind was logged; callbacks_caught_up is owed
        self._merged_logged = 0  # ``merged`` at the last callbacks_caught_up line
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

    def dispatch_change(self, listener: object, reading: bool, size: int,
                        func: Callable[..., Any], *args: Any, kept: int | None = None) -> None:
        """Like ``dispatch``, for a change that ``listener`` was told of: a new value
        (``reading``, with ``size`` bytes of array) or another change. Past the bounds, a
        reading takes the place of the listener's reading still waiting, keeping that one's
        ``args[kept]`` (Rule 5)."""
        if self._ended:
            func(*args)
            return
        if reading and not size and not self._mergeable and len(self._work) * 2 < self.max_backlog:
            # Far from the bound, nothing to merge into: queued as plain work, with no lock.
            # Readings come from the I/O thread alone, the only thread that adds to
            # ``_mergeable``, so it cannot fill between the look and the append; a reading
            # queued so is never merged into, and later ones merge only into later items.
            self.dispatches += 1
            self._work.append((func, args, _NO_KWARGS))
        else:
            self._dispatch_tracked(listener, reading, size, func, args, kept)
        if threading.get_ident() == self._batcher:
            self._batched = True
        else:
            self._wake.put(None)

    def _dispatch_tracked(self, listener: object, reading: bool, size: int,
                          func: Callable[..., Any], args: tuple, kept: int | None) -> None:
        """Queue a change that may be merged into, or merge it (Rule 5)."""
        with self._lock:
            key = id(listener)
            waiting = self._mergeable.get(key) if reading else None
            if waiting is not None and (len(self._work) >= self.max_backlog
                                        or self._bytes >= self.max_backlog_bytes):
                self._bytes += size - waiting.size
                if kept is not None:
                    args = (*args[:kept], waiting.args[kept], *args[kept + 1:])
                waiting.args, waiting.size = args, size
                self.merged += 1
                if not self._behind:
                    self._behind = True
                    now = time.monotonic()
                    if self._behind_logged_at is None or now - self._behind_logged_at >= BEHIND_LOG_S:
                        self._behind_logged_at, self._announced = now, True
                        log.warning("callbacks_behind", waiting=len(self._work), bytes=self._bytes)
                return
            change = _Change(func, args, listener, size)
            self._bytes += size
            if reading:
                self._mergeable[key] = change
            else:
                self._mergeable.pop(key, None)
            self.dispatches += 1
            self._work.append(change)

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
            if self._behind and not self._work:
                self._caught_up()

    def _caught_up(self) -> None:
        """The queue ran empty after merging (Rule 5): a callbacks_behind line gets its
        callbacks_caught_up, with every merge since the last one."""
        with self._lock:
            self._behind = False
            if not self._announced:
                return
            self._announced = False
            merged, self._merged_logged = self.merged - self._merged_logged, self.merged
        log.info("callbacks_caught_up", merged=merged)

    def _run_queued(self) -> bool:
        """Run what is queued, in order; whether the close was among it."""
        work, closing = self._work, False
        while work:
            item = work.popleft()
            if item is None:
                closing = True  # statuses must still finish: go on
                continue
            if type(item) is _Change:
                with self._lock:
                    key = id(item.listener)
                    if self._mergeable.get(key) is item:
                        del self._mergeable[key]
                    self._bytes -= item.size
                    func, args, kwargs = item.func, item.args, _NO_KWARGS
            else:
                func, args, kwargs = item
            try:
                func(*args, **kwargs)
            except Exception:
                log.exception("callback_failed", callback=repr(func))
            # Hold nothing between callbacks: a Signal the user dropped must be freed.
            del item, func, args, kwargs
        return closing
