"""The requests a hub has sent and still waits on: who hears each reply, and when each gives up.

Rule 1: no I/O, no threads, no clock. The hub's I/O thread, its only user, passes the time
(``now``) and the replies; this module decides who hears what. Its tests need no sockets.
Rule 2: a request's handler sees every reply to it and says whether that one was the last;
then the request is forgotten, and a later reply with its id reaches no one. A handler that
raises counts as answered, and is logged.
Rule 3: no request waits forever (hub.py Rule 5). A request may have a deadline for its
final reply; past it the handler gets a ``PvhubTimeoutError`` reply. Reads, describes and
status get ``REQUEST_TIMEOUT`` unless the caller gives its own; a set gets none, since its
final reply comes when the IOC completes the put, which may be a motor's whole move.
Deadlines wait in a heap: what expires costs its own work, the requests still pending none.
Rule 4: failing many at once (the daemon lost, the hub closed), each handler is answered and
one handler's error stops no other.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Collection, Iterable

from pvhub import protocol as p
from pvhub.errors import HubUnavailableError, PvhubTimeoutError
from pvhub.logs import library_logger

log = library_logger("pvhub.client")

ReplyHandler = Callable[[p.Message], bool]

# Rule 3: how long a read, describe or status waits for its reply unless told otherwise.
REQUEST_TIMEOUT = 60.0


def default_timeout(message: p.Message) -> float | None:
    """Rule 3: how long a request may wait for its final reply unless its caller says."""
    return None if isinstance(message, p.SetRequest) else REQUEST_TIMEOUT


def describe(message: p.Message) -> str:
    """A request in a few words, for errors and logs: ``read X:motor``, ``status``."""
    pv = getattr(message, "pv", "")
    return f"{message.OP} {pv}" if pv else message.OP


class RequestTable:
    """The requests waiting for their final reply, and their deadlines (Rules 1-4)."""

    def __init__(self, address: str) -> None:
        self.address = address  # the daemon's, for the words of a failure
        self._handlers: dict[int, ReplyHandler] = {}
        self._deadlines = RequestDeadlines()

    def __len__(self) -> int:
        return len(self._handlers)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._handlers

    @property
    def next_deadline(self) -> float | None:
        """The soonest deadline still in the heap (perhaps of a request answered since: an
        early wake-up, never a late one)."""
        heap = self._deadlines.heap
        return heap[0][0] if heap else None

    def add(self, request_id: int, handler: ReplyHandler, now: float, timeout: float | None = None,
            what: str = "") -> None:
        """Wait for replies to ``request_id``; with a finite ``timeout``, at most that long."""
        self._handlers[request_id] = handler
        if timeout is not None and math.isfinite(timeout):
            self._deadlines.add(request_id, timeout, what, now, self._handlers)

    def discard(self, request_id: int) -> None:
        """Forget ``request_id`` without answering it (its answer no longer matters)."""
        self._handlers.pop(request_id, None)

    def waiting_besides(self, request_ids: Collection[int]) -> bool:
        """Whether any request outside ``request_ids`` still waits."""
        return len(self._handlers) > len(request_ids) or any(r not in request_ids for r in self._handlers)

    def answer(self, message: p.Message) -> bool:
        """Hand ``message`` to its request's handler (Rule 2); whether one was waiting."""
        request_id = getattr(message, "id", None)
        handler = self._handlers.get(request_id) if type(request_id) is int else None
        if handler is None:
            return False
        try:
            final = handler(message)
        except Exception:
            log.exception("reply_handler_failed", op=message.OP)
            final = True
        if final:
            self._handlers.pop(request_id, None)
        return True

    def expire(self, now: float) -> int:
        """Fail every request past its deadline at ``now`` (Rule 3); how many."""
        expired = self._deadlines.expired(now, self._handlers)
        for request_id, timeout, what in expired:
            handler = self._handlers.pop(request_id)
            log.warning("request_timed_out", address=self.address, request=request_id, what=what, timeout=timeout)
            answer_all([(request_id, handler)],
                       f"request {request_id} ({what}) got no reply from the pvhub daemon at {self.address} "
                       f"within {timeout:g} s", code=PvhubTimeoutError.code)
        return len(expired)

    def fail_lost(self, request_ids: Iterable[object]) -> None:
        """Fail the requests whose final reply the daemon could not deliver (a ``Pong``'s
        ``lost``): their outcome is unknown."""
        for request_id in request_ids:
            handler = self._handlers.pop(request_id, None) if type(request_id) is int else None
            if handler is None:
                continue
            log.warning("reply_lost", address=self.address, request=request_id)
            answer_all([(request_id, handler)],
                       f"the pvhub daemon could not deliver the reply to request {request_id} (this client did "
                       "not read its replies fast enough); the outcome is unknown")

    def fail_all(self, message: str) -> None:
        """Answer every request still waiting with ``message`` (Rule 4), so that no Status
        or call waits forever."""
        handlers, self._handlers = self._handlers, {}
        self._deadlines.clear()
        answer_all(handlers.items(), message)


class RequestDeadlines:
    """When each request with a deadline expires (Rule 3), without I/O or a clock of its own.

    A heap of (deadline, request id, timeout, what). A request answered in time is not looked
    for: its entry is dropped when it comes up, or when the heap has grown to twice what is
    pending (and at least ``SLACK``), so both its size and its cost per request stay bounded.
    """

    SLACK = 1024

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def heap(self) -> list[tuple[float, int, float, str]]:
        """The entries, soonest first (``heap[0]``)."""
        return self._heap

    def add(self, request_id: int, timeout: float, what: str, now: float, pending: Collection[int]) -> None:
        heapq.heappush(self._heap, (now + timeout, request_id, timeout, what))
        if len(self._heap) > 2 * len(pending) + self.SLACK:
            self._heap = [entry for entry in self._heap if entry[1] in pending]
            heapq.heapify(self._heap)

    def expired(self, now: float, pending: Collection[int]) -> list[tuple[int, float, str]]:
        """(request id, timeout, what) of each request in ``pending`` past its deadline at
        ``now``, taken out; the work is the entries that came up, never all of them."""
        heap, expired = self._heap, []
        while heap and heap[0][0] <= now:
            _, request_id, timeout, what = heapq.heappop(heap)
            if request_id in pending:
                expired.append((request_id, timeout, what))
        return expired

    def clear(self) -> None:
        self._heap.clear()


def answer_all(requests: Iterable[tuple[int, ReplyHandler]], message: str,
               code: str = HubUnavailableError.code) -> None:
    """Fail each ``(id, handler)`` request with ``message``; one handler's error stops no
    other (Rule 4)."""
    for request_id, handler in requests:
        try:
            handler(p.ErrorReply(id=request_id, code=code, message=message))
        except Exception:
            log.exception("reply_handler_failed", op="error")
