"""Fixtures for pvhub's tests: random PV prefixes, simulated IOCs and real daemons.

Rule 1: everything runs on loopback, on ports chosen at run time, under a PV prefix that no
other test uses, so tests can run side by side and never touch a site's IOCs.
Rule 2: readiness is a real condition polled against a deadline (a CA read, systemd's
``READY=1``), never a sleep.
Rule 3: a test leaves no process behind; teardown checks, kills what is left by its pid, and
fails the test.
Rule 4: a failing test that started a daemon shows that daemon's log in its report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from uuid import uuid4

import pytest

from pvhub.sim import SimulatedIOC, free_tcp_port, free_udp_port, merge_ca_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DAEMON_READY_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 10.0
# How long the processes a daemon started may outlive it (their parent's exit reaches them
# as a closed socket or a signal, not instantly).
CHILDREN_EXIT_TIMEOUT = 5.0
# Longest path a unix socket address may have on Linux (sun_path is 108 bytes with its NUL).
_MAX_UNIX_PATH = 107

_DAEMON_LOGS = pytest.StashKey[list[Path]]()


# --- PV names and IOCs -------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A PV prefix of this test's own, so that no two tests ever see each other's PVs."""
    return f"t{uuid4().hex[:8]}:"


@pytest.fixture
def zoo_ioc(prefix: str) -> Iterator[SimulatedIOC]:
    """``tests/iocs/zoo.py`` under ``prefix``, ready when ``{prefix}dt`` reads."""
    ioc = SimulatedIOC("tests.iocs.zoo", prefix=prefix, ready_pv="dt", cwd=REPO_ROOT)
    with ioc:
        yield ioc
    assert ioc.process.poll() is not None, "the zoo IOC outlived its fixture"


@pytest.fixture
def walk_ioc(prefix: str) -> Iterator[SimulatedIOC]:
    """caproto's random_walk example, under ``prefix + "walk:"``.

    Its own sub-prefix lets it run beside ``zoo_ioc``, which also serves ``dt`` and ``x``:
    two IOCs answering for one name would leave which one a client reaches to chance.
    """
    ioc = SimulatedIOC(
        "caproto.ioc_examples.random_walk", prefix=f"{prefix}walk:", ready_pv="dt"
    )
    with ioc:
        yield ioc
    assert ioc.process.poll() is not None, "the random_walk IOC outlived its fixture"


# --- the daemon --------------------------------------------------------------------------------


class NotifySocket:
    """systemd's end of ``sd_notify``: a unix datagram socket and a thread that records what
    arrives.

    The thread reads for the daemon's whole life because a sender blocks once the socket's
    queue is full, and that queue is short (``net.unix.max_dgram_qlen``, 10 on many hosts):
    an unread notify socket would soon freeze the daemon.
    """

    def __init__(self, directory: Path) -> None:
        path = str(directory / "notify.sock")
        # Long pytest temporary paths do not fit in a sockaddr_un; the abstract namespace
        # ("@" in NOTIFY_SOCKET, a leading NUL for bind) has no such limit and leaves no file.
        fits = len(os.fsencode(path)) <= _MAX_UNIX_PATH
        self.address = path if fits else f"@pvhub-test-{uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:] if self.address.startswith("@") else path)
        self._sock.settimeout(0.1)  # how often the reader looks at its stop flag
        self._messages: list[str] = []
        self._arrived = threading.Condition()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    @property
    def messages(self) -> list[str]:
        """Every datagram received so far, oldest first."""
        with self._arrived:
            return list(self._messages)

    def wait_for(self, state: str, timeout: float, alive: Callable[[], bool]) -> bool:
        """Wait until a datagram holds the line ``state`` (e.g. ``"READY=1"``).

        Gives up at the deadline, or as soon as ``alive()`` says the sender has exited (then
        the socket is closed after reading what the sender left in it).
        """
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not self._has(state):
                if not alive():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._arrived.wait(min(remaining, 0.1))
            else:
                return True
        self.close()
        return self._has(state)

    def close(self) -> None:
        """Stop reading, keeping every datagram already sent; safe to call again.

        Call it once the sender has exited, so that ``messages`` is complete.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        self._reader.join()
        self._sock.setblocking(False)
        while True:
            try:
                self._record(self._sock.recv(65536))
            except BlockingIOError:
                break
        self._sock.close()

    def _has(self, state: str) -> bool:
        with self._arrived:
            return any(state in message.split("\n") for message in self._messages)

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                self._record(self._sock.recv(65536))
            except TimeoutError:
                continue

    def _record(self, datagram: bytes) -> None:
        with self._arrived:
            self._messages.append(datagram.decode(errors="replace"))
            self._arrived.notify_all()


class DaemonProcess:
    """A running ``pvhub serve``, as a test sees it."""

    def __init__(
        self, address: str, process: subprocess.Popen[bytes], log_path: Path, notify: NotifySocket
    ) -> None:
        self.address = address
        self.process = process
        self.log_path = log_path
        self._notify = notify

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def notifications(self) -> list[str]:
        """The sd_notify datagrams the daemon has sent, oldest first (all of them, once it
        has been stopped)."""
        return self._notify.messages

    def wait_for_notification(self, state: str, timeout: float = 10.0) -> None:
        """Wait until the daemon has sent the line ``state``, e.g. ``"WATCHDOG=1"``."""
        if not self._notify.wait_for(state, timeout, alive=self._running):
            pytest.fail(
                f"the daemon did not send {state!r} within {timeout} s (it sent "
                f"{self.notifications}; exit code {self.process.poll()}):\n{self.log_text()}"
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = DAEMON_STOP_TIMEOUT) -> int:
        """SIGTERM, and the daemon's exit code; a daemon that will not stop fails the test.

        Safe to call again: a daemon that has exited just reports its code.
        """
        try:
            if self._running():
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    pytest.fail(
                        f"the daemon ignored SIGTERM for {timeout} s and was killed:\n"
                        f"{self.log_text()}"
                    )
            return self.process.wait()
        finally:
            if not self._running():
                self._notify.close()

    def _running(self) -> bool:
        return self.process.poll() is None


@pytest.fixture
def hub_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real ``pvhub serve`` processes: ``hub_factory(*iocs, args=(), env=None)``.

    Each daemon reaches only ``iocs``, listens on a fresh loopback port, logs JSON to a file
    in ``tmp_path``, and is ready when it sends ``READY=1`` to a notify socket of its own.
    At teardown every daemon is stopped, and every process it started must be gone too.
    """
    daemons: list[DaemonProcess] = []
    request.node.stash.setdefault(_DAEMON_LOGS, [])

    def start(
        *iocs: SimulatedIOC,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = DAEMON_READY_TIMEOUT,
    ) -> DaemonProcess:
        number = len(daemons)
        directory = tmp_path / f"daemon{number}"
        directory.mkdir()
        notify = NotifySocket(directory)
        address = f"tcp://127.0.0.1:{free_tcp_port()}"
        log_path = directory / "daemon.log"
        command = [
            sys.executable, "-m", "pvhub", "serve",
            "--address", address,
            "--readings", "tcp://127.0.0.1:*",
            "--log-format", "json",
            *args,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=_daemon_environment(iocs, notify.address, env),
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so that teardown can find every process the
                # daemon started, even one whose parent died.
                start_new_session=True,
            )
        daemon = DaemonProcess(address, process, log_path, notify)
        daemons.append(daemon)
        request.node.stash[_DAEMON_LOGS].append(log_path)
        if not notify.wait_for("READY=1", ready_timeout, alive=lambda: process.poll() is None):
            pytest.fail(
                f"pvhub serve was not ready after {ready_timeout} s (exit code "
                f"{process.poll()}, notifications {notify.messages}):\n{daemon.log_text()}"
            )
        return daemon

    yield start

    problems = [problem for daemon in daemons if (problem := _tear_down(daemon))]
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def hub(
    zoo_ioc: SimulatedIOC,
    hub_factory: Callable[..., DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DaemonProcess]:
    """One daemon serving ``zoo_ioc``; ``$PVHUB_ADDRESS`` points the client library at it.

    ``zoo_ioc`` comes first so that pytest, tearing down in reverse, stops the daemon before
    the IOC (a test that asks for both fixtures itself should name them in that order too).
    """
    daemon = hub_factory(zoo_ioc)
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    yield daemon
    from pvhub.client import close_hubs

    # Clients go first, so that the daemon's stop is not mistaken by them for a failure.
    close_hubs()


def _daemon_environment(
    iocs: Sequence[SimulatedIOC], notify_address: str, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """This process's environment without anything that could reach other IOCs or another
    systemd, plus what finds ``iocs`` and our notify socket."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("EPICS_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    return {
        **inherited,
        **(merge_ca_env(*iocs) if iocs else _no_ioc_ca_env()),
        "NOTIFY_SOCKET": notify_address,
        **(extra or {}),
    }


def _no_ioc_ca_env() -> dict[str, str]:
    # An empty address list makes caproto fall back to broadcasting on every interface,
    # so a daemon without IOCs searches a loopback port where nobody answers instead.
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{free_udp_port()}",
        "EPICS_CA_REPEATER_PORT": str(free_udp_port()),
    }


def _tear_down(daemon: DaemonProcess) -> str | None:
    """Stop ``daemon`` and make sure all it started is gone; what went wrong, if anything."""
    started = _descendants(daemon.pid)
    problems = []
    try:
        daemon.stop()
    except pytest.fail.Exception as exc:
        problems.append(str(exc))
    deadline = time.monotonic() + CHILDREN_EXIT_TIMEOUT
    while (left := _still_running(started, daemon.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for pid, _ in left:
            _kill(pid)
        problems.append(
            f"processes started by the daemon outlived it (killed now): "
            f"{sorted(pid for pid, _ in left)}\n{daemon.log_text()}"
        )
    return "\n".join(problems) or None


# --- processes, from /proc ---------------------------------------------------------------------
# A process is named by (pid, start time): a pid alone may be reused by an unrelated process
# between the moment we list it and the moment we look again.

ProcessId = tuple[int, int]


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, process group, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> set[ProcessId]:
    """Every living process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
            starts[pid] = stat[3]
    found: set[ProcessId] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, starts[child]))
            stack.append(child)
    return found


def _still_running(started: set[ProcessId], group: int) -> set[ProcessId]:
    """Those of ``started``, and of process group ``group``, that have not exited."""
    running = set()
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        if (pid, stat[3]) in started or stat[2] == group:
            running.add((pid, stat[3]))
    return running


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- reports -----------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the log of every daemon a failing test started to its report (Rule 4)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for path in item.stash.get(_DAEMON_LOGS, []):
            if path.exists():
                report.sections.append(
                    (f"pvhub daemon log ({path.parent.name})", path.read_text(errors="replace"))
                )
