"""The waker the client's I/O thread, the broker and the actor loop sleep on (pvhub/waker.py)."""

from __future__ import annotations

import select

import pytest

from pvhub.waker import Waker

pytestmark = pytest.mark.timeout(10)


def readable(waker: Waker, timeout: float = 0.0) -> bool:
    return bool(select.select([waker.fileno()], [], [], timeout)[0])


def test_a_wake_makes_the_loop_readable_and_a_drain_makes_it_quiet():
    waker = Waker()
    try:
        assert not readable(waker)
        waker.wake()
        waker.wake()
        assert readable(waker, timeout=5)
        waker.drain()
        assert not readable(waker)  # one drain serves every wake before it (Rule 2)
    finally:
        waker.close()


def test_waking_never_blocks_or_raises_even_when_full_or_closed():
    waker = Waker()
    for _ in range(200_000):  # far past any socket buffer: a full pipe already means "wake"
        waker.wake()
    assert readable(waker)
    waker.drain()
    assert not readable(waker)
    waker.close()
    waker.wake()  # the loop is gone: nothing to wake, nothing raised (Rule 1)


def test_a_signal_byte_on_the_signal_fd_wakes_the_loop():
    import os

    waker = Waker()
    try:
        os.write(waker.signal_fd, b"\x0f")  # what signal.set_wakeup_fd writes
        assert readable(waker, timeout=5)
    finally:
        waker.close()
