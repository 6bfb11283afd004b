"""Status objects: the promise of an operation that finishes later, as ophyd and Bluesky
know it.

Rule 1: a Status finishes once, either successfully or with an exception; later attempts
are ignored (the first word wins), so a late put-completion after a timeout cannot flip it.
Rule 2: ``wait(timeout)`` giving up raises ``StatusTimeoutError`` (a ``TimeoutError``) and
does not cancel anything: the operation goes on, and the Status still finishes when it does.
A ``timeout`` given at creation is different: it fails the Status itself when it expires, as
ophyd's ``StatusBase(timeout=)`` does.
Rule 3: callbacks run once, after the Status finished, on the thread that finished it, or,
when the finisher passes ``dispatch`` (the hub's I/O thread, which runs no user code), on
the thread ``dispatch`` hands them to; one added later runs at once on the caller's thread.
Rule 4: ``wait`` returns the moment the Status is finished, whoever finished it: a waiter
never depends on the callback thread, so ``status.wait()`` inside a subscription callback
(which runs on that thread) does not deadlock, and a put's waiter wakes one hop sooner.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable


from pvhub.errors import PvhubError, StatusTimeoutError
from pvhub.logs import library_logger

log = library_logger("pvhub.client")


class Status:
    """The outcome of an operation that completes later (ophyd's ``StatusBase`` surface)."""

    def __init__(self, obj: Any = None, *, timeout: float | None = None, settle_time: float = 0.0) -> None:
        self.obj = obj
        self.timeout = timeout
        self.settle_time = settle_time or 0.0
        self.start_ts = time.time()
        self.finish_ts: float | None = None
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._exception: BaseException | None = None
        self._settling = False
        self._callbacks: list[Callable[[Status], Any]] = []
        self._timer: threading.Timer | None = None
        if timeout is not None:
            # As ophyd: the settle time is part of the time allowed.
            self._timer = threading.Timer(timeout + self.settle_time, self._expire)
            self._timer.daemon = True
            self._timer.start()

    # --- state -----------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def success(self) -> bool:
        return self.done and self._exception is None

    @property
    def elapsed(self) -> float:
        return (self.finish_ts or time.time()) - self.start_ts

    @property
    def callbacks(self) -> list[Callable[[Status], Any]]:
        return list(self._callbacks)

    # --- finishing -------------------------------------------------------------------------

    def set_finished(self, *, dispatch: Callable[..., None] | None = None) -> None:
        """Mark success (after ``settle_time``, if one was given); callbacks go to
        ``dispatch`` if given (Rule 3)."""
        if self.settle_time > 0:
            with self._lock:
                if self._event.is_set() or self._settling:
                    return
                self._settling = True
            timer = threading.Timer(self.settle_time, self._finish, args=(None,))
            timer.daemon = True
            timer.start()
        else:
            self._finish(None, dispatch)

    def set_exception(self, exc: BaseException, *, dispatch: Callable[..., None] | None = None) -> None:
        """Mark failure with ``exc`` (ignored once success was reported and is settling)."""
        with self._lock:
            if self._settling:
                return
        self._finish(exc, dispatch)

    def _expire(self) -> None:
        with self._lock:
            if self._settling:
                return
        self._finish(StatusTimeoutError(f"{self!r} did not finish within its {self.timeout} s timeout"))

    def _finish(self, exc: BaseException | None, dispatch: Callable[..., None] | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._exception = exc
            self.finish_ts = time.time()
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        if self._timer is not None:
            self._timer.cancel()
        if dispatch is not None:
            if callbacks:
                dispatch(_run_callbacks, callbacks, self)
            return
        _run_callbacks(callbacks, self)

    # --- waiting ---------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> None:
        """Block until finished; raise its exception, or ``StatusTimeoutError`` if ``timeout``
        passes first (the operation is not cancelled)."""
        if not self._event.wait(timeout):
            raise StatusTimeoutError(f"{self!r} not done after waiting {timeout} s (it goes on)")
        if self._exception is not None:
            raise self._exception

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the Status finished with, or None for success."""
        if not self._event.wait(timeout):
            raise StatusTimeoutError(f"{self!r} not done after waiting {timeout} s")
        return self._exception

    def add_callback(self, callback: Callable[[Status], Any]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        _run_callback(callback, self)

    def __and__(self, other: Status) -> AndStatus:
        return AndStatus(self, other)

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("success" if self.success else "failed")
        target = getattr(self.obj, "name", None)
        return f"<{type(self).__name__} {state}{' ' + target if target else ''}>"


class AndStatus(Status):
    """Finishes when both parts have; fails as soon as either fails."""

    def __init__(self, left: Status, right: Status) -> None:
        super().__init__(obj=None)
        self.left = left
        self.right = right

        def check(_: Status) -> None:
            for part in (left, right):
                if part.done and not part.success:
                    self.set_exception(part.exception(0) or PvhubError("a part failed"))
                    return
            if left.done and right.done:
                self.set_finished()

        left.add_callback(check)
        right.add_callback(check)

    def __repr__(self) -> str:
        return f"({self.left!r} & {self.right!r})"


def wait(*statuses: Status | Iterable[Status], timeout: float | None = None) -> None:
    """Wait for every status (as the tutorial's ``wait(status1, status2, timeout=1)``); raise
    the first failure, or ``StatusTimeoutError`` when ``timeout`` passes with some unfinished."""
    flat: list[Status] = []
    for item in statuses:
        if isinstance(item, Status) or not isinstance(item, Iterable):
            flat.append(item)  # type: ignore[arg-type]
        else:
            flat.extend(item)
    # One event for all of them, so that a failure anywhere is raised at once, not after the
    # statuses before it in the list have finished.
    changed = threading.Event()
    for status in flat:
        status.add_callback(lambda _: changed.set())
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        changed.clear()
        for status in flat:
            if status.done and not status.success:
                status.wait(0)  # raises its exception
        if all(status.done for status in flat):
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            pending = [s for s in flat if not s.done]
            raise StatusTimeoutError(f"{len(pending)} of {len(flat)} statuses not done after {timeout} s: {pending}")
        changed.wait(remaining)


def _run_callbacks(callbacks: list[Callable[[Status], Any]], status: Status) -> None:
    for callback in callbacks:
        _run_callback(callback, status)


def _run_callback(callback: Callable[[Status], Any], status: Status) -> None:
    try:
        callback(status)
    except Exception:
        log.exception("status_callback_failed", callback=repr(callback))
