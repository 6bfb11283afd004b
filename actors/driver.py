"""A Channel Access backend run on its own, without an actor: for tests and benchmarks that
drive ``actors/backend.py`` directly against a real IOC."""

from __future__ import annotations

import collections
import time
from typing import Callable

import zmq

from pvhub.actors.backend import ChannelAccessBackend, poller_watch
from pvhub.actors.codec import Event, PutAnsweredEvent


class Driver:
    """A backend run on its own, without an actor (benchmarks, tests): the actor loop's part
    in small. It reads a completed put back when the read behind it came too early, as the
    state machine would ask; other events than the one waited for are dropped."""

    def __init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()
        self._poller = zmq.Poller()
        self.backend = ChannelAccessBackend(self._events.append, poller_watch(self._poller))

    def wait_for(self, wanted: Callable[[Event], bool], timeout: float) -> Event:
        """Run until an event ``wanted`` says yes to; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._events:
                event = self._events.popleft()
                if type(event) is PutAnsweredEvent and not event.read_back_pending:
                    self.backend.read_back(event.pv, event.put_id)  # as the state machine asks
                if wanted(event):
                    return event
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no such event within {timeout} s")
            due = self.backend.timeout(now)
            wait = deadline - now if due is None else min(due, deadline - now)
            for fd, flags in self._poller.poll(int(wait * 1000) + 1):
                self.backend.service(fd, flags)
            self.backend.tick(time.monotonic())

    def close(self) -> None:
        self.backend.close()
