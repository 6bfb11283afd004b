"""Actor processes: start them, notice when they exit, stop them all.

Rule 1: every actor is a child of the daemon and is reaped by it; the supervisor never leaves
a zombie or an orphan (actors also die with their parent, see ``pvhub.actors.__main__``).
The interpreter starts without ``site`` (``-S``) and asks for its parent-death signal, and
checks its parent, before it loads ``site`` and the actor (``_BOOTSTRAP``): a daemon killed
right after a spawn is noticed after a few milliseconds of the new process's CPU, not after
the tens ``site`` and the package imports take (much more wall time on a busy machine).
Rule 2: the broker never waits for a process to start: ``spawn`` hands the work to the
supervisor's own thread and returns at once; the broker hears of the new process when it
says ``ActorReady``, or of its failure through ``reap``.
Rule 3: stopping is bounded: SIGTERM to all, then SIGKILL to whoever is left at the deadline,
and only then the spawner's thread ends. The kernel sends an actor its parent-death signal
when the *thread* that started it ends, not the daemon: ended first, it SIGKILLed every actor
before its SIGTERM, and no actor ever stopped in order.
Rule 4: a retired actor (one the broker has no more use for) gets SIGTERM, SIGKILL after
``RETIRE_GRACE_S``, and is reaped without a word to the broker. A new actor of the same name
may start meanwhile: the broker gives it the next incarnation's identity.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import structlog

log = structlog.get_logger("pvhub.supervisor")

# Rule 1: run by ``python -S -c`` ahead of ``python -m pvhub.actors``, with the actor's
# arguments. PR_SET_PDEATHSIG is 1; a parent that is already gone is not the one named.
_BOOTSTRAP = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[sys.argv.index("--parent-pid") + 1]):
    os._exit(0)
import runpy, site
site.main()
runpy.run_module("pvhub.actors", run_name="__main__", alter_sys=True)
"""

RETIRE_GRACE_S = 2.0


@dataclass
class ActorProcess:
    actor: str
    identity: str
    process: subprocess.Popen | None  # None when it could not be started
    started: float
    killed: bool = False


class Supervisor:
    """Starts actor processes connected to the broker's actor and readings endpoints."""

    def __init__(self, broker_endpoint: str, readings_endpoint: str, log_format: str, log_level: str) -> None:
        self.broker_endpoint = broker_endpoint
        self.readings_endpoint = readings_endpoint
        self.log_format = log_format
        self.log_level = log_level
        self._lock = threading.Lock()
        self._processes: dict[str, ActorProcess] = {}  # by actor; guarded by _lock
        self._failed: list[tuple[str, int | None]] = []  # spawns that raised; guarded by _lock
        # Rule 4: (actor, process, when it was retired), not yet reaped; guarded by _lock.
        # Bounded by the retirements of the last few seconds: each leaves at its SIGTERM, or
        # its SIGKILL.
        self._retiring: list[tuple[str, subprocess.Popen, float]] = []
        self._requests: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._stopped = False
        self._last_epoch = 0  # on the spawner thread only
        self._thread = threading.Thread(target=self._spawn_loop, name="actor-spawner", daemon=True)
        self._thread.start()

    # --- on the broker's thread --------------------------------------------------------------

    def spawn(self, actor: str, identity: str) -> None:
        """Start an incarnation of ``actor`` in the background (Rule 2)."""
        with self._lock:
            # Claimed now, so that reap() and kill() know of it before the process exists.
            self._processes[actor] = ActorProcess(actor, identity, None, time.monotonic())
        self._requests.put((actor, identity))

    def reap(self) -> list[tuple[str, int | None]]:
        """Actors whose process has exited (or could not start) since the last call."""
        exited: list[tuple[str, int | None]] = []
        with self._lock:
            exited.extend(self._failed)
            self._failed.clear()
            self._reap_retired()
            for actor, record in list(self._processes.items()):
                if record.process is None:
                    continue
                code = record.process.poll()
                if code is not None:
                    del self._processes[actor]
                    exited.append((actor, code))
                    log.warning("actor_exited", actor=actor, actor_pid=record.process.pid, code=code)
        return exited

    def _reap_retired(self) -> None:
        """Rule 4, with the lock held: forget the retired that left; SIGKILL the late."""
        still = []
        for actor, process, since in self._retiring:
            if process.poll() is not None:
                log.info("actor_retired", actor=actor, actor_pid=process.pid)
                continue
            if time.monotonic() - since > RETIRE_GRACE_S:
                _signal(process, signal.SIGKILL)
            still.append((actor, process, since))
        self._retiring = still

    def retire(self, actor: str) -> None:
        """Stop ``actor``'s process for good, quietly (Rule 4)."""
        with self._lock:
            record = self._processes.pop(actor, None)
            if record is None:
                return
            record.killed = True  # one still being started is killed by the spawner
            if record.process is not None:
                _signal(record.process, signal.SIGTERM)
                self._retiring.append((actor, record.process, time.monotonic()))

    def kill(self, actor: str) -> None:
        """SIGKILL a hung actor; ``reap`` reports its exit."""
        with self._lock:
            record = self._processes.get(actor)
            if record is None:
                return
            record.killed = True  # a process still being started is killed once it exists
            if record.process is not None:
                _signal(record.process, signal.SIGKILL)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every actor, then the spawner (Rule 3)."""
        with self._lock:
            self._stopped = True  # the spawner starts nothing more; one it is starting is killed
            processes = [(r.actor, r.process) for r in self._processes.values() if r.process is not None]
            processes += [(actor, process) for actor, process, _ in self._retiring]
            self._processes.clear()
            self._retiring.clear()
        for _, process in processes:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for actor, process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("actor_killed", actor=actor, actor_pid=process.pid)
                _signal(process, signal.SIGKILL)
                process.wait()
        # Last: an actor's parent-death signal follows the thread that started it, so the
        # spawner's end is every actor's SIGKILL (Rule 1).
        self._requests.put(None)
        self._thread.join(timeout)

    # --- on the spawner's thread -------------------------------------------------------------

    def _spawn_loop(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            actor, identity = request
            with self._lock:
                claimed = self._processes.get(actor)
                if self._stopped or claimed is None or claimed.identity != identity:
                    continue  # stopped, or superseded before it started
            try:
                process = self._start(identity)
            except Exception as exc:  # never this thread's end: its end SIGKILLs every actor (Rule 3)
                log.error("actor_spawn_failed", actor=actor, error=repr(exc))
                with self._lock:
                    if self._processes.get(actor) is claimed:
                        del self._processes[actor]
                        self._failed.append((actor, None))
                continue
            with self._lock:
                if self._stopped or self._processes.get(actor) is not claimed:
                    _signal(process, signal.SIGKILL)
                    process.wait()
                    continue
                claimed.process = process
                if claimed.killed:
                    _signal(process, signal.SIGKILL)
            log.info("actor_spawned", actor=actor, incarnation=identity, actor_pid=process.pid)

    def _next_epoch(self) -> int:
        """Each incarnation's epoch is larger than the last one's, even if the wall clock was
        stepped back between them: clients ignore a smaller epoch as a dead actor's late word."""
        self._last_epoch = next_epoch(self._last_epoch, time.time_ns())
        return self._last_epoch

    def _start(self, identity: str) -> subprocess.Popen:
        command = [
            sys.executable,
            "-S",
            "-c",
            _BOOTSTRAP,
            "--parent-pid",
            str(os.getpid()),
            "--epoch",
            str(self._next_epoch()),
            "--actor",
            identity,
            "--broker",
            self.broker_endpoint,
            "--readings",
            self.readings_endpoint,
            "--log-format",
            self.log_format,
            "--log-level",
            self.log_level,
        ]
        # Actors inherit stderr: their log lines join the daemon's (and journald's) stream.
        # systemd's notify and watchdog variables are the daemon's own business.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET" and not k.startswith("WATCHDOG_")}
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, close_fds=True, env=env)


def _signal(process: subprocess.Popen, signum: int) -> None:
    # Popen.send_signal does nothing once the process was reaped: its pid may be reused.
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def next_epoch(last: int, now_ns: int) -> int:
    """The wall clock in ns (so that epochs also grow across daemon restarts), but always
    more than ``last``."""
    return max(now_ns, last + 1)
