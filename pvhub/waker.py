"""A waker: how another thread, or a signal, wakes a loop that sleeps in a poll.

The client's I/O thread, the broker and the actor loop each sleep in a ZeroMQ poll that also
watches the read end of a socket pair; whoever has work for the loop queues it, then writes a
byte to the other end.

Rule 1: waking never blocks and never raises: a full pipe already means "wake up", and a
closed one means the loop is gone, so there is no one left to wake.
Rule 2: the loop drains every byte before it looks at its queued work, so one wake-up serves
every piece of work queued before it, however many bytes were written for them.
"""

from __future__ import annotations

import socket


class Waker:
    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        """The descriptor the loop polls for reading."""
        return self._reader.fileno()

    @property
    def signal_fd(self) -> int:
        """The descriptor for ``signal.set_wakeup_fd``: a signal's byte wakes the loop too."""
        return self._writer.fileno()

    def wake(self) -> None:
        try:
            self._writer.send(b"\0")
        except OSError:  # full (BlockingIOError) or closed: Rule 1
            pass

    def drain(self) -> None:
        try:
            while self._reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
