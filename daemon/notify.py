"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram per state change.

Rule: without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same in a
terminal, under a test, and under systemd.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STATUS=...``, ``STOPPING=1`` to systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *states: str) -> None:
        if self._sock is None:
            return
        try:
            # Never block: a notify socket nobody reads must not freeze the daemon.
            self._sock.sendto("\n".join(states).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:
            # systemd gone or socket full: the service goes on; systemd acts on what it saw.
            pass

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of systemd's ``WATCHDOG_USEC`` in seconds (when it is meant for this process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        interval = int(usec) / 2_000_000
    except ValueError:
        return None
    # sd_watchdog_enabled(3): a value that is not positive means no watchdog.
    return interval if interval > 0 else None
