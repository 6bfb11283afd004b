"""The client's callback thread (``pvhub.client.dispatcher``), Rule 5: a bounded queue, where
a reading that finds its listener's last reading still waiting past the bounds takes its
place. Pure: a Dispatcher and plain threads, no sockets."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from helpers import wait_until

from pvhub.client.dispatcher import Dispatcher, array_bytes

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0


class Held:
    """A Dispatcher whose callback thread is held in a callback until ``release``, so that
    what is dispatched meanwhile waits in its queue; ``delivered`` is what ran, in order."""

    def __init__(self, max_backlog: int = 10_000, max_backlog_bytes: int = 2**40) -> None:
        self.dispatcher = Dispatcher()
        self.dispatcher.max_backlog = max_backlog
        self.dispatcher.max_backlog_bytes = max_backlog_bytes
        self.delivered: list[tuple[str, object]] = []
        self.hold()

    def hold(self) -> None:
        """Hold the callback thread (again) in a callback."""
        self._started, self._release = threading.Event(), threading.Event()
        self.dispatcher.dispatch(self._hold, self._started, self._release)
        assert self._started.wait(TIMEOUT)

    @staticmethod
    def _hold(started: threading.Event, release: threading.Event) -> None:
        started.set()
        release.wait(TIMEOUT)

    def reading(self, listener: str, value: object, size: int = 0) -> None:
        self.dispatcher.dispatch_change(listener, True, size, self.delivered.append, (listener, value))

    def other(self, listener: str, what: object) -> None:
        self.dispatcher.dispatch_change(listener, False, 0, self.delivered.append, (listener, what))

    def release(self, close: bool = True) -> list[tuple[str, object]]:
        """Let the queue run; what was delivered, once everything queued has run."""
        done = threading.Event()
        self.dispatcher.dispatch(done.set)
        self._release.set()
        assert done.wait(TIMEOUT)
        if close:
            self.dispatcher.close()
        return self.delivered


def test_under_the_bound_every_reading_is_delivered():
    held = Held(max_backlog=1000)
    for n in range(50):
        held.reading("a", n)
    assert held.release() == [("a", n) for n in range(50)]
    assert held.dispatcher.merged == 0


def test_past_the_bound_the_newest_reading_takes_the_waiting_ones_place():
    held = Held(max_backlog=10)
    for n in range(1, 101):
        held.reading("a", n)
    assert held.release() == [("a", n) for n in range(1, 10)] + [("a", 100)]
    assert held.dispatcher.merged == 90


def test_each_listener_merges_into_its_own_last_reading():
    held = Held(max_backlog=4)
    for n in range(1, 51):
        held.reading("a", n)
        held.reading("b", -n)
    assert held.release() == [("a", 1), ("b", -1), ("a", 50), ("b", -50)]


def test_a_merged_reading_keeps_the_old_value_its_listener_last_saw():
    # A Signal's callback gets (value, old_value): after a merge, old_value is the value the
    # callback was given last, not one it never saw.
    held = Held(max_backlog=3)
    seen = []
    for n in range(1, 8):
        held.dispatcher.dispatch_change("a", True, 0, lambda new, old: seen.append((old, new)), n, n - 1, kept=1)
    held.release()
    assert seen == [(0, 1), (1, 2), (2, 7)]
    assert held.dispatcher.merged == 4


def test_a_reading_never_merges_across_another_change_of_its_listener():
    # A connection change between two readings stays between them: the listener sees its
    # changes in order, only fewer readings.
    held = Held(max_backlog=3)
    for n in (1, 2, 3):
        held.reading("a", n)
    held.other("a", "disconnected")
    for n in (4, 5, 6, 7):
        held.reading("a", n)
    assert held.release() == [("a", 1), ("a", 2), ("a", 3), ("a", "disconnected"), ("a", 7)]


def test_other_work_is_never_merged_or_dropped():
    held = Held(max_backlog=2)
    for n in range(5):
        held.reading("a", n)
        held.other("a", f"meta {n}")
        held.dispatcher.dispatch(held.delivered.append, ("status", n))
    delivered = held.release()
    assert [d for d in delivered if d[0] == "status"] == [("status", n) for n in range(5)]
    assert [d for d in delivered if isinstance(d[1], str)] == [("a", f"meta {n}") for n in range(5)]


def test_arrays_are_bounded_by_their_bytes():
    held = Held(max_backlog_bytes=100)
    for n in range(10):
        held.reading("wave", n, size=60)  # the second brings 120 bytes: past the bound
    assert held.release() == [("wave", 0), ("wave", 9)]


def test_the_bytes_waiting_are_given_back_as_readings_run():
    # Were the merged or delivered readings' bytes not given back, the bound would be reached
    # for good and every reading after would merge.
    dispatcher = Dispatcher()
    dispatcher.max_backlog_bytes = 100
    seen: list[int] = []
    for n in range(200):
        done = threading.Event()
        dispatcher.dispatch_change("wave", True, 60, seen.append, n)
        dispatcher.dispatch(done.set)
        assert done.wait(TIMEOUT)
    dispatcher.close()
    assert seen == list(range(200)) and dispatcher.merged == 0


def test_falling_behind_and_catching_up_are_logged_once_in_a_while(caplog):
    caplog.set_level(logging.INFO, logger="pvhub.client")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "callbacks_" in r.getMessage()]

    held = Held(max_backlog=2)
    for n in range(7):
        held.reading("a", n)
    held.release(close=False)
    wait_until(lambda: len(lines()) == 2, TIMEOUT)
    assert "callbacks_behind" in lines()[0]
    assert "callbacks_caught_up" in lines()[1] and "merged=5" in lines()[1]
    # Behind again at once (bursty callbacks): no new lines before BEHIND_LOG_S, and what
    # merges meanwhile is counted in the next callbacks_caught_up.
    held.hold()
    for n in range(4):
        held.reading("a", n)
    held.release()
    assert held.dispatcher.merged == 7
    assert len(lines()) == 2


def test_a_busy_producer_never_loses_the_newest_reading():
    # The I/O thread merging while the callback thread takes the same item: each listener's
    # readings arrive in order, and the last one dispatched is always delivered.
    dispatcher = Dispatcher()
    dispatcher.max_backlog = 16
    last: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def slow(listener: str, n: int) -> None:
        last[listener].append(n)
        if n % 7 == 0:
            sum(range(200))  # a little work, so the queue backs up

    for n in range(1, 20_001):
        for listener in last:
            dispatcher.dispatch_change(listener, True, 0, slow, listener, n)
    done = threading.Event()
    dispatcher.dispatch(done.set)
    assert done.wait(TIMEOUT)
    dispatcher.close()
    for listener, values in last.items():
        assert values[-1] == 20_000, listener
        assert all(a < b for a, b in zip(values, values[1:])), listener
    assert dispatcher.merged > 0  # the bound was reached: the test tested something


def test_array_bytes():
    assert array_bytes(np.zeros(16)) == 128
    assert array_bytes(1.5) == 0 and array_bytes("text") == 0


def test_listeners_are_told_apart_by_identity_not_equality():
    # A Signal class may define __eq__ (and so lose __hash__): neither may merge one listener's
    # reading into another's, nor fail the I/O thread.
    class Same:
        __hash__ = None  # type: ignore[assignment]

        def __eq__(self, other: object) -> bool:
            return True

    first, second = Same(), Same()
    dispatcher = Dispatcher()
    dispatcher.max_backlog = 0  # merge whenever a listener's reading waits
    got: list[tuple[str, int]] = []
    started, release = threading.Event(), threading.Event()
    dispatcher.dispatch(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    for n in range(3):
        dispatcher.dispatch_change(first, True, 0, got.append, ("first", n))
        dispatcher.dispatch_change(second, True, 0, got.append, ("second", n))
    done = threading.Event()
    dispatcher.dispatch(done.set)
    release.set()
    assert done.wait(TIMEOUT)
    dispatcher.close()
    assert got == [("first", 2), ("second", 2)]
