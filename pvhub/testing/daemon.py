"""A ``pvhub serve`` process started by another program (``pvhub demo``, the tests).

Rule 1: ready means what systemd would be told: the daemon sends ``READY=1`` on a notify
socket that we bind, so no one polls or sleeps to guess when it has bound its sockets.
Rule 2: we are that daemon's systemd, and read its notify socket for as long as it runs: a
sender blocks once the socket's queue is full, and that queue is short
(``net.unix.max_dgram_qlen``, 10 on many hosts), so an unread socket would soon freeze it.
Rule 3: the daemon finds exactly the IOCs that ``env`` names. No ``EPICS_*`` variable, and
none of our own systemd's (``NOTIFY_SOCKET``, ``WATCHDOG_*``), is inherited from the process
that starts it, so a developer's shell or a CI runner cannot point it at a site's IOCs or at
another notify socket.
Rule 4: ``stop()`` is bounded: SIGTERM to the daemon, which stops its actors; SIGKILL to its
whole process group at the deadline.
Rule 5: a port picked here is only free when it is picked. A daemon that exits because
another process bound its picked address first is started again on a fresh port, up to
``_PORT_ATTEMPTS`` times; an address given is never changed.
Rule 6: the daemon does not outlive the process that started it: it is told our pid
(``--parent-pid``) and stops, as at SIGTERM, within a tick of our exit, however we exit
(killed, or never reaching ``stop``), so its actors go with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from uuid import uuid4

from pvhub.testing.ioc import LOOPBACK, free_tcp_port, signal_group

__all__ = ["DaemonProcess", "NotifySocket"]

_NOT_INHERITED = ("EPICS_", "NOTIFY_SOCKET", "WATCHDOG_")
_LOG_TAIL_CHARS = 4000
# Longest path a unix socket address may have on Linux (sun_path is 108 bytes with its NUL).
_MAX_UNIX_PATH = 107
_READ_POLL_INTERVAL = 0.1  # how often the reader thread looks at its stop flag


class NotifySocket:
    """systemd's end of ``sd_notify``: a unix datagram socket in ``directory`` and a thread
    that records every datagram that arrives (Rule 2)."""

    def __init__(self, directory: Path) -> None:
        path = str(directory / "notify.sock")
        # A long directory does not fit in a sockaddr_un; the abstract namespace ("@" in
        # NOTIFY_SOCKET, a leading NUL for bind) has no such limit and leaves no file.
        self._path = path if len(os.fsencode(path)) <= _MAX_UNIX_PATH else None
        self.address = self._path or f"@pvhub-notify-{uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self._path or "\0" + self.address[1:])
        self._sock.settimeout(_READ_POLL_INTERVAL)
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
                self._arrived.wait(min(remaining, _READ_POLL_INTERVAL))
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
        if self._path is not None:
            Path(self._path).unlink(missing_ok=True)

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


_PORT_ATTEMPTS = 5
# What ``pvhub serve`` prints (cli.py) when its address is taken (Rule 5).
_ADDRESS_TAKEN = b"Address already in use"


def _picked_address() -> str:
    return f"tcp://{LOOPBACK}:{free_tcp_port()}"


class DaemonProcess:
    """``python -m pvhub serve`` on loopback, in a process group of its own; a context manager.

    ``directory`` holds its log (``daemon.log``, JSON lines) and its notify socket, and is its
    working directory; by default a new temporary directory, left for the log to be read.
    ``env`` is the daemon's Channel Access environment (e.g. ``SimulatedIOC.ca_env()``) and
    anything else it should see (Rule 3). ``args`` are added to the ``serve`` command line.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        directory: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self._picked = address is None  # Rule 5
        self.address = address or _picked_address()
        self._env = dict(env or {})
        self._args = tuple(args)
        self.directory = Path(directory or tempfile.mkdtemp(prefix="pvhub-daemon-"))
        self.log_path = self.directory / "daemon.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._notify: NotifySocket | None = None

    # -- lifecycle

    def start(self) -> DaemonProcess:
        """Start the daemon and return once it has sent ``READY=1``; stops it on any failure.

        Raises ``RuntimeError`` if it exits first, ``TimeoutError`` if it is not ready within
        ``startup_timeout``; either quotes the end of its log.
        """
        if self.running():
            raise RuntimeError(f"pvhub serve at {self.address} is already running")
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._start()
            except RuntimeError:
                this_start = self.log_path.read_bytes()[logged:] if self.log_path.exists() else b""
                if not (self._picked and attempt < _PORT_ATTEMPTS and _ADDRESS_TAKEN in this_start):
                    raise
                self.address = _picked_address()
            else:
                self._picked = False  # clients know it now: a restart keeps it (Rule 5)
                return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _start(self) -> None:
        self._notify = NotifySocket(self.directory)
        try:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self._command(),
                    env=self._environment(self._notify.address),
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own process group: a Ctrl-C at the terminal reaches only us, who
                    # stop it in order, and all it starts can be found (and killed) by group.
                    start_new_session=True,
                )
            self.wait_for_notification("READY=1", self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, and the daemon's exit code (``None`` if it was never started).

        A daemon still running after ``timeout`` is killed with its process group, and
        ``TimeoutError`` says so. Safe to call again: a daemon that has exited just reports
        its code. Once it returns, ``notifications`` is complete.
        """
        process = self.process
        try:
            if process is None:
                return None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    signal_group(process, signal.SIGKILL)
                    process.wait()
                    raise TimeoutError(
                        f"pvhub serve ignored SIGTERM for {timeout} s and was killed:\n"
                        f"{self._log_tail()}"
                    ) from None
            return process.wait()
        finally:
            if self._notify is not None and not self.running():
                self._notify.close()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what callers see

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("pvhub serve has not been started")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def notifications(self) -> list[str]:
        """The sd_notify datagrams the daemon has sent, oldest first (all of them, once it
        has been stopped)."""
        return self._notify.messages if self._notify is not None else []

    def wait_for_notification(self, state: str, timeout: float = 10.0) -> None:
        """Wait until the daemon has sent the line ``state``, e.g. ``"WATCHDOG=1"``.

        Raises ``TimeoutError`` if it has not after ``timeout`` seconds, ``RuntimeError`` if
        it exits first.
        """
        if self._notify is None:
            raise RuntimeError("pvhub serve has not been started")
        if self._notify.wait_for(state, timeout, alive=self.running):
            return
        sent = f"it sent {self.notifications}"
        returncode = self.process.poll() if self.process is not None else None
        if returncode is None:
            raise TimeoutError(
                f"pvhub serve did not send {state!r} within {timeout} s ({sent}):\n"
                f"{self._log_tail()}"
            )
        raise RuntimeError(
            f"pvhub serve exited with code {returncode} before sending {state!r} ({sent}):\n"
            f"{self._log_tail()}"
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"DaemonProcess(address={self.address!r}, pid={pid})"

    # -- internals

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "pvhub", "serve",
            "--address", self.address,
            "--readings", f"tcp://{LOOPBACK}:*",
            "--log-format", "json",
            "--parent-pid", str(os.getpid()),  # Rule 6
            *self._args,
        ]  # fmt: skip

    def _environment(self, notify_address: str) -> dict[str, str]:
        inherited = {
            name: value for name, value in os.environ.items() if not name.startswith(_NOT_INHERITED)
        }
        return {**inherited, "NOTIFY_SOCKET": notify_address, **self._env}

    def _log_tail(self) -> str:
        return self.log_text()[-_LOG_TAIL_CHARS:] or "(the log is empty)"
