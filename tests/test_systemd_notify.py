"""The daemon under a stand-in systemd: a real ``pvhub serve`` and the notify socket that
``hub_factory`` binds, with a watchdog of 0.4 s asked for through ``WATCHDOG_USEC``.

What systemd acts on, in the order it sees it: READY=1 with a STATUS= line once the daemon
(and the actors it was configured to start) is up; WATCHDOG=1 every WATCHDOG_USEC/2 from the
broker's loop and only from it; STATUS= with the PV and client counts; STOPPING=1 last.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import log_events, wait_until

from pvhub.client import EpicsSignalRO, close_hubs
from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC

pytestmark = pytest.mark.system

WATCHDOG_USEC = 400_000
PING_INTERVAL = WATCHDOG_USEC / 2_000_000  # what the daemon should keep: 0.2 s
# Loose bounds for a loaded machine: the loop pings on its own clock, every 0.2 s; a gap of
# up to 0.6 s, or a mean gap down to 0.1 s, is still right.
PING_SPACING = (0.1, 0.6)
SYSTEMD_ENV = {"WATCHDOG_USEC": str(WATCHDOG_USEC)}
# "STATUS=3 PVs, 2 actors, 1 clients": only the numbers matter here.
STATUS_COUNTS = re.compile(r"^STATUS=(\d+) PVs?\b.*?(\d+) clients?\b")


class Arrivals:
    """When each of a daemon's notify datagrams arrived, as seen from the test.

    A thread polls ``daemon.notifications`` (which ``hub_factory`` records) every few
    milliseconds and stamps what is new with ``time.monotonic()``.
    """

    def __init__(self, daemon: DaemonProcess, poll: float = 0.005) -> None:
        self._daemon = daemon
        self._poll = poll
        self._seen = len(daemon.notifications)
        self._stamped: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-arrivals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            messages = self._daemon.notifications
            now = time.monotonic()
            with self._lock:
                self._stamped.extend((now, m) for m in messages[self._seen :])
            self._seen = max(self._seen, len(messages))

    def times_of(self, state: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Arrival times of the datagrams holding the line ``state``, in a time window."""
        with self._lock:
            return [t for t, m in self._stamped if state in m.split("\n") and since <= t < until]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def arrivals() -> Iterator[Callable[[DaemonProcess], Arrivals]]:
    started: list[Arrivals] = []

    def start(daemon: DaemonProcess) -> Arrivals:
        started.append(Arrivals(daemon))
        return started[-1]

    yield start
    for watcher in started:
        watcher.close()


@pytest.fixture
def no_clients() -> Iterator[None]:
    """Clients this test opens are closed before its daemon stops (teardown runs in reverse)."""
    yield
    close_hubs()


def lines(daemon: DaemonProcess) -> list[str]:
    """Every assignment the daemon has sent, datagram after datagram."""
    return [line for message in daemon.notifications for line in message.split("\n")]


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc ("T" once SIGSTOP has taken effect)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def test_ready_comes_with_a_status_line(zoo_ioc: SimulatedIOC, hub_factory) -> None:
    daemon = hub_factory(zoo_ioc, env=SYSTEMD_ENV)
    ready = [m.split("\n") for m in daemon.notifications if "READY=1" in m.split("\n")]
    assert len(ready) == 1, daemon.notifications
    assert any(STATUS_COUNTS.match(line) for line in ready[0]), ready[0]


def test_watchdog_pings_every_half_watchdog_usec(
    zoo_ioc: SimulatedIOC, hub_factory, arrivals
) -> None:
    daemon = hub_factory(zoo_ioc, env=SYSTEMD_ENV)
    watch = arrivals(daemon)
    pings = wait_until(
        lambda: t if len(t := watch.times_of("WATCHDOG=1")) >= 5 else None,
        timeout=10 * PING_INTERVAL * 5,
        message=lambda: f"fewer than 5 WATCHDOG=1: {daemon.notifications}",
    )
    gaps = [round(b - a, 3) for a, b in zip(pings, pings[1:])]
    assert len(gaps) >= 3
    # Never late (a gap is what the test saw: one ping it read late shortens the next gap,
    # so each gap is bounded above only), and over the run about one per interval, not more.
    assert max(gaps) <= PING_SPACING[1], gaps
    assert (pings[-1] - pings[0]) / len(gaps) >= PING_SPACING[0], gaps


def test_status_counts_pvs_and_clients(
    zoo_ioc: SimulatedIOC, hub_factory, no_clients: None
) -> None:
    daemon = hub_factory(zoo_ioc, env=SYSTEMD_ENV)
    first = next(m for line in lines(daemon) if (m := STATUS_COUNTS.match(line)))
    assert first.groups() == ("0", "0"), lines(daemon)

    signal_ = EpicsSignalRO(zoo_ioc.pv("x"), name="x", address=daemon.address)
    signal_.wait_for_connection(timeout=10)
    signal_.get()

    def counted() -> bool:
        counts = [STATUS_COUNTS.match(line) for line in lines(daemon)]
        return any(m and int(m[1]) >= 1 and int(m[2]) >= 1 for m in counts)

    wait_until(counted, timeout=5, message=lambda: f"no STATUS with a PV and a client: {lines(daemon)}")


def test_sigterm_ends_with_stopping_and_exit_code_0(zoo_ioc: SimulatedIOC, hub_factory) -> None:
    daemon = hub_factory(zoo_ioc, env=SYSTEMD_ENV)
    daemon.wait_for_notification("WATCHDOG=1", timeout=5)

    assert daemon.stop() == 0

    messages = [m.split("\n") for m in daemon.notifications]
    # The last word is STOPPING=1. The daemon may say it more than once, and ping while it
    # lets puts in flight finish (systemd stops its watchdog on STOPPING=1), but once it has
    # said it, it never says READY=1 again.
    assert "STOPPING=1" in messages[-1], messages
    first_stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert not any("READY=1" in m for m in messages[first_stopping:]), messages


@contextlib.contextmanager
def sigstopped(pid: int) -> Iterator[None]:
    """The whole process stopped, every thread."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(pid) == "T", timeout=5, message=f"{pid} did not stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


_PTRACE_DETACH, _PTRACE_SEIZE, _PTRACE_INTERRUPT = 17, 0x4206, 0x4207
_WALL = 0x40000000


@contextlib.contextmanager
def main_thread_stopped(pid: int) -> Iterator[None]:
    """Only the main thread of ``pid`` stopped (a ptrace stop; ptrace acts on one thread),
    its other threads running on. The daemon runs its broker loop on its main thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    if libc.ptrace(_PTRACE_SEIZE, pid, None, None) != 0:
        pytest.skip(f"cannot ptrace the daemon: {os.strerror(ctypes.get_errno())}")
    try:
        assert libc.ptrace(_PTRACE_INTERRUPT, pid, None, None) == 0, os.strerror(ctypes.get_errno())
        # The test is the daemon's parent: nothing else of it waits for the daemon meanwhile.
        _, status = os.waitpid(pid, _WALL)
        assert os.WIFSTOPPED(status), status
        yield
    finally:
        libc.ptrace(_PTRACE_DETACH, pid, None, None)


@pytest.mark.parametrize("stopped", [sigstopped, main_thread_stopped], ids=["process", "loop"])
def test_the_watchdog_stops_when_the_loop_does(
    zoo_ioc: SimulatedIOC, hub_factory, arrivals, stopped
) -> None:
    """Pings come from the broker loop and from nothing else: with the whole process stopped
    (SIGSTOP) no other process or timer pings for it; with only the loop's thread stopped, no
    other thread of the daemon does (a ping thread would tell systemd all is well while the
    loop hangs). Either way the pings resume on the first tick once it runs again."""
    daemon = hub_factory(zoo_ioc, env=SYSTEMD_ENV)
    watch = arrivals(daemon)
    daemon.wait_for_notification("WATCHDOG=1", timeout=5)

    with stopped(daemon.pid):
        # A datagram sent just before the stop is queued already; give the recorder a
        # moment to read it, so that it is not taken for one sent while stopped.
        frozen_from = time.monotonic() + 0.1
        time.sleep(1.2)  # the subject of the test: 1.1 s of silence, 3-5 missed pings
        frozen_until = time.monotonic()

    assert watch.times_of("WATCHDOG=1", frozen_from, frozen_until) == []
    thawed = wait_until(
        lambda: watch.times_of("WATCHDOG=1", since=frozen_until)[:3],
        timeout=5,
        message=lambda: f"no WATCHDOG=1 after SIGCONT: {daemon.notifications[-5:]}",
    )
    # The first ping comes on the first tick after the thaw, long overdue.
    assert thawed[0] - frozen_until < PING_SPACING[1], thawed
    wait_until(
        lambda: len(watch.times_of("WATCHDOG=1", since=frozen_until)) >= 3,
        timeout=5,
        message="pings did not resume",
    )


def test_ready_waits_for_the_configured_actors(
    zoo_ioc: SimulatedIOC, hub_factory, tmp_path: Path
) -> None:
    pv = zoo_ioc.pv("x")
    config = tmp_path / "pvhub.toml"
    config.write_text(f'[pvs]\nstart = ["{pv}"]\n')

    daemon = hub_factory(zoo_ioc, args=("--config", str(config)), env=SYSTEMD_ENV)

    logged = log_events(daemon)
    events = [e.get("event") for e in logged]
    assert "daemon_ready" in events, events
    before_ready = logged[: events.index("daemon_ready")]
    # Every actor process it started (the pool that owns the PV) said it was up first.
    spawned = {e["actor"] for e in logged if e.get("event") == "actor_spawned"}
    up = {e["actor"] for e in before_ready if e.get("event") == "actor_ready"}
    assert spawned and spawned == up, events
    ready = next(m for m in daemon.notifications if "READY=1" in m.split("\n"))
    status = next(STATUS_COUNTS.match(line) for line in ready.split("\n") if STATUS_COUNTS.match(line))
    assert int(status[1]) == 1, ready
