"""A ``pvhub serve`` process started by another program (``pvhub demo``, the tests).

Rule 1: ready means what systemd would be told: the daemon sends ``READY=1`` on a notify
socket that we bind, so no one polls or sleeps to guess when it has bound its sockets.
Rule 2: ``stop()`` is bounded and leaves nothing behind: SIGTERM, then SIGKILL at the deadline.
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
from collections.abc import Mapping, Sequence
from pathlib import Path

from pvhub.sim import LOOPBACK, free_tcp_port


class DaemonProcess:
    """``python -m pvhub serve`` on loopback, with its log in a file."""

    def __init__(
        self,
        *,
        address: str | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.address = address or f"tcp://{LOOPBACK}:{free_tcp_port()}"
        self._env = dict(env or {})
        self._args = tuple(args)
        self._tmpdir = tempfile.mkdtemp(prefix="pvhub-daemon-")
        self.log_path = Path(log_path) if log_path else Path(self._tmpdir) / "daemon.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._notify_sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the daemon is not started")
        return self.process.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pvhub", "serve", "--address", self.address,
                "--readings", f"tcp://{LOOPBACK}:*", "--log-format", "json", *self._args]

    def start(self) -> DaemonProcess:
        notify_path = os.path.join(self._tmpdir, "notify")
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_sock.bind(notify_path)
        self._reader = threading.Thread(target=self._read_notifications, daemon=True)
        self._reader.start()
        env = {**os.environ, **self._env, "NOTIFY_SOCKET": notify_path}
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.wait(0.05):
            if self.process.poll() is not None:
                self._close_notify()
                raise RuntimeError(f"pvhub serve exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pvhub serve was not ready within {self.startup_timeout} s:\n{self.log_text()[-4000:]}")
        return self

    def _read_notifications(self) -> None:
        sock = self._notify_sock
        while sock is not None:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            text = data.decode(errors="replace")
            self.notifications.append(text)
            if "READY=1" in text.split("\n"):
                self._ready.set()

    def _close_notify(self) -> None:
        if self._notify_sock is not None:
            sock, self._notify_sock = self._notify_sock, None
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def children(self) -> list[int]:
        """Pids of the daemon's child processes (its actors), from /proc."""
        if self.process is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("PPid:") and int(line.split()[1]) == self.process.pid:
                    found.append(int(entry.name))
                    break
        return found

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_notify()
        return process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
