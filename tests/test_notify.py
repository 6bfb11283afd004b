"""systemd's notify protocol as the daemon speaks it (``pvhub.daemon.notify``), against a real
unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from pvhub.daemon.notify import Notifier, watchdog_interval

# A datagram that was sent is queued at once; this only turns a bug into a failure, not a hang.
RECEIVE_TIMEOUT = 5.0


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``."""

    def __init__(self, bind_address: str, notify_socket: str) -> None:
        self.notify_socket = notify_socket  # as systemd would put it in the environment
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_address)
        self.sock.settimeout(RECEIVE_TIMEOUT)

    def receive(self) -> list[str]:
        """The assignments of the next datagram, in order."""
        return self.sock.recv(4096).decode().split("\n")

    def nothing_pending(self) -> bool:
        """True if no datagram is waiting (every send here is synchronous: a datagram that was
        sent is already queued, so there is nothing to wait for)."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(RECEIVE_TIMEOUT)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = str(tmp_path / "notify")
    fake = FakeSystemd(path, path)
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"pvhub-test-notify-{uuid4().hex}"
    fake = FakeSystemd("\0" + name, "@" + name)
    yield fake
    fake.close()


@pytest.fixture
def notifier(systemd: FakeSystemd) -> Iterator[Notifier]:
    notifier = Notifier(systemd.notify_socket)
    yield notifier
    notifier.close()


@pytest.fixture(autouse=True)
def no_inherited_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under systemd too; its variables must not leak into these tests."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


# --- Notifier ----------------------------------------------------------------------------------


def test_ready(notifier, systemd):
    assert notifier.enabled
    notifier.ready()
    assert systemd.receive() == ["READY=1"]


def test_ready_with_status_is_one_datagram(notifier, systemd):
    notifier.ready("serving 3 PVs")
    assert systemd.receive() == ["READY=1", "STATUS=serving 3 PVs"]


def test_status(notifier, systemd):
    notifier.status("2 actors, 5 clients")
    assert systemd.receive() == ["STATUS=2 actors, 5 clients"]


def test_watchdog(notifier, systemd):
    notifier.watchdog()
    assert systemd.receive() == ["WATCHDOG=1"]


def test_stopping(notifier, systemd):
    notifier.stopping()
    assert systemd.receive() == ["STOPPING=1"]


def test_datagrams_arrive_in_order(notifier, systemd):
    notifier.ready()
    notifier.watchdog()
    notifier.stopping()
    assert [systemd.receive() for _ in range(3)] == [["READY=1"], ["WATCHDOG=1"], ["STOPPING=1"]]


def test_address_from_environment(systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.notify_socket)
    notifier = Notifier()
    try:
        notifier.ready()
        assert systemd.receive() == ["READY=1"]
    finally:
        notifier.close()


def test_abstract_namespace_address(abstract_systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_systemd.notify_socket)
    notifier = Notifier()
    try:
        notifier.ready()
        assert abstract_systemd.receive() == ["READY=1"]
    finally:
        notifier.close()


def test_without_notify_socket_everything_is_a_no_op():
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("status")
    notifier.status("status")
    notifier.watchdog()
    notifier.stopping()
    notifier.close()


def test_explicit_empty_address_disables_even_with_notify_socket(systemd, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.notify_socket)
    notifier = Notifier("")
    assert not notifier.enabled
    notifier.ready()
    assert systemd.nothing_pending()


def test_vanished_systemd_does_not_raise(tmp_path):
    path = str(tmp_path / "gone")
    FakeSystemd(path, path).close()
    os.unlink(path)
    notifier = Notifier(path)
    assert notifier.enabled
    notifier.ready()
    notifier.stopping()
    notifier.close()


def test_close_is_idempotent_and_silences(notifier, systemd):
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    notifier.ready()
    assert systemd.nothing_pending()


# --- watchdog_interval -------------------------------------------------------------------------


def test_no_watchdog_without_watchdog_usec():
    assert watchdog_interval() is None


def test_watchdog_interval_is_half_the_timeout(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    assert watchdog_interval() == 1.5


def test_watchdog_for_this_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch):
    # systemd sets WATCHDOG_PID so that children which inherit the environment stay quiet.
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    assert watchdog_interval() is None


@pytest.mark.parametrize("usec", ["", "abc", "1.5e6", "3 s"])
def test_unparsable_watchdog_usec_means_no_watchdog(monkeypatch, usec):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval() is None


@pytest.mark.parametrize("usec", ["0", "-5"])
def test_zero_or_negative_watchdog_usec_means_no_watchdog(monkeypatch, usec):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval() is None
