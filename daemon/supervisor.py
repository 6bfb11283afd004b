"""Actor processes: start them, notice when they exit, stop them all.

Rule 1: every actor is a child of the daemon and is reaped by it; the supervisor never leaves
a zombie or an orphan (actors also die with their parent, see ``pvhub.actors.loop``).
Rule 2: stopping is bounded: SIGTERM to all, then SIGKILL to whoever is left at the deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import structlog

log = structlog.get_logger("pvhub.supervisor")


@dataclass
class ActorProcess:
    actor: str
    pvs: tuple[str, ...]
    process: subprocess.Popen
    started: float


class Supervisor:
    """Starts actor processes connected to the broker's actor and readings endpoints."""

    def __init__(self, broker_endpoint: str, readings_endpoint: str, log_format: str, log_level: str) -> None:
        self.broker_endpoint = broker_endpoint
        self.readings_endpoint = readings_endpoint
        self.log_format = log_format
        self.log_level = log_level
        self.processes: dict[str, ActorProcess] = {}

    def spawn(self, actor: str, pvs: tuple[str, ...], identity: str | None = None) -> ActorProcess:
        command = [
            sys.executable,
            "-m",
            "pvhub.actors",
            "--actor",
            identity or actor,
            "--broker",
            self.broker_endpoint,
            "--readings",
            self.readings_endpoint,
            "--log-format",
            self.log_format,
            "--log-level",
            self.log_level,
            "--",
            *pvs,
        ]
        # Actors inherit stderr: their log lines join the daemon's (and journald's) stream.
        # systemd's notify and watchdog variables are the daemon's own business.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("WATCHDOG_")}
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True, env=env)
        record = ActorProcess(actor, pvs, process, time.monotonic())
        self.processes[actor] = record
        log.info("actor_spawned", actor=actor, actor_pid=process.pid, pvs=list(pvs))
        return record

    def reap(self) -> list[tuple[str, int]]:
        """Actors whose process has exited since the last call, with their exit codes."""
        exited = []
        for actor, record in list(self.processes.items()):
            code = record.process.poll()
            if code is not None:
                del self.processes[actor]
                exited.append((actor, code))
                log.warning("actor_exited", actor=actor, actor_pid=record.process.pid, code=code)
        return exited

    def kill(self, actor: str) -> None:
        """SIGKILL a hung actor; ``reap`` reports its exit."""
        record = self.processes.get(actor)
        if record is not None:
            _signal(record.process, signal.SIGKILL)

    def pid_of(self, actor: str) -> int | None:
        record = self.processes.get(actor)
        return record.process.pid if record else None

    def stop_all(self, timeout: float = 5.0) -> None:
        for record in self.processes.values():
            _signal(record.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for record in self.processes.values():
            try:
                record.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("actor_killed", actor=record.actor, actor_pid=record.process.pid)
                _signal(record.process, signal.SIGKILL)
                record.process.wait()
        self.processes.clear()


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass
