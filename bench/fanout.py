"""N subscriber processes on one counting PV: the fan-out of ``bench_core.py`` and the
streaming parts of ``python -m bench`` (fanout, throughput, waveform).

Rule 1: every subscriber is a process of its own (``subscriber.py``), as real clients are; a
pvhub subscriber goes through the daemon, a direct one holds its own Channel Access monitor.
Rule 2: a measurement window is the same for every side. The benchmark tells every
subscriber to collect, reads the IOC's counter and the CPU time of the IOC, of the daemon
with its actors and of the machine, sleeps, and reads them all again. The updates that count
are the counter values the IOC produced in between; a subscriber that gets one of them later
than ``tail`` seconds after the window, or never, has lost it.
Rule 3: every wait has a deadline, and ``close()`` leaves no subscriber alive: ``quit``, then
SIGKILL by pid after a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import procstat

from pvhub.testing import SimulatedIOC

SUBSCRIBER = Path(__file__).with_name("subscriber.py")
READY_TIMEOUT = 90.0  # sixteen Python processes importing numpy on two cores take a while
RESULT_GRACE = 30.0  # a saturated subscriber may answer late
CONTROL_TIMEOUT = 60.0  # an IOC swamped by monitors can take many seconds to answer a read
RECOVER_TIMEOUT = 10.0  # after that long without an answer, the IOC is restarted
QUIT_TIMEOUT = 5.0


class Subscribers:
    """``n`` subscriber processes of one ``mode`` ("pvhub" or "caproto") on ``pv``."""

    def __init__(self, mode: str, pv: str, n: int, env: dict[str, str], stderr: IO[Any],
                 extra: tuple[str, int] | None = None) -> None:
        self.mode = mode
        self._lines: list[queue.SimpleQueue[str | None]] = []
        self.processes: list[subprocess.Popen[str]] = []
        # extra: (name prefix, count) of more counting PVs each subscriber also watches.
        more = ["--extra", extra[0], str(extra[1])] if extra else []
        for _ in range(n):
            process = subprocess.Popen(
                [sys.executable, str(SUBSCRIBER), mode, pv, *more],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )  # fmt: skip
            lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
            threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
            self.processes.append(process)
            self._lines.append(lines)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def wait_ready(self, timeout: float | None = None) -> None:
        # A hundred Python processes importing numpy on two cores take a couple of minutes.
        timeout = max(READY_TIMEOUT, 2.0 * len(self.processes)) if timeout is None else timeout
        for line in self._next_lines(timeout):
            if line != "ready":
                raise RuntimeError(f"{self.mode} subscriber did not start: {line!r}")

    def start_window(self, seconds: float, tail: float) -> None:
        for process in self.processes:
            process.stdin.write(f"window {seconds} {tail}\n")
            process.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._next_lines(timeout)]

    def _next_lines(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        lines = []
        for process, queue_ in zip(self.processes, self._lines):
            try:
                line = queue_.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.mode} subscriber {process.pid} did not answer in {timeout} s") from None
            if line is None:
                raise RuntimeError(f"{self.mode} subscriber {process.pid} exited (code {process.poll()})")
            lines.append(line)
        return lines

    def close(self) -> None:
        for process in self.processes:
            try:
                process.stdin.write("quit\n")
                process.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        deadline = time.monotonic() + QUIT_TIMEOUT
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _pump(stream: IO[str], lines: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)


@dataclass
class Window:
    """What one measurement window saw: the IOC produced counter values ``first``..``last``
    during ``elapsed`` seconds; each result says which of them a subscriber received."""

    mode: str
    n: int
    rate: float
    elapsed: float
    first: int
    last: int
    monitors: int  # CA monitors the IOC held on the PV (its fast_monitors PV; -1: unknown)
    probe: float  # seconds the slower of the two counter reads took (each a new client: search, connect, read)
    ioc_cpu: float  # % of one core
    hub_cpu: float  # daemon plus its actors, % of one core (0 for direct)
    others_cpu: float  # every other process on the machine, % of one core
    results: list[dict[str, Any]] = field(repr=False, default_factory=list)

    @property
    def produced(self) -> int:
        return self.last - self.first + 1

    @property
    def ioc_rate(self) -> float:
        return self.produced / self.elapsed

    def _clipped(self, result: dict[str, Any]) -> list[tuple[int, int]]:
        clipped = [(max(a, self.first), min(b, self.last)) for a, b in result["runs"]]
        return [(a, b) for a, b in clipped if a <= b]

    def delivered(self, result: dict[str, Any]) -> int:
        """How many of the window's values this subscriber received (by the end of its tail)."""
        return sum(b - a + 1 for a, b in self._clipped(result))

    def late(self, result: dict[str, Any]) -> int:
        """Of the window's values, how many came after the last one this subscriber received:
        still on their way when its tail ended, or dropped at the very end."""
        clipped = self._clipped(result)
        return self.last - (clipped[-1][1] if clipped else self.first - 1)

    def _percent(self, count: Callable[[dict[str, Any]], int]) -> float:
        expected = self.produced * len(self.results)
        return 100.0 * sum(count(r) for r in self.results) / expected if expected > 0 else 0.0

    @property
    def received_per_s(self) -> float:
        """Mean over subscribers of the window's values received, per second of window."""
        return sum(self.delivered(r) for r in self.results) / len(self.results) / self.elapsed

    @property
    def lost_percent(self) -> float:
        """Of the values each subscriber should have had, the share it did not get in time."""
        return self._percent(lambda r: self.produced - self.delivered(r))

    @property
    def seq_missed_percent(self) -> float:
        """pvhub only: the part of ``lost_percent`` lost between the actor and the clients
        (gaps in the actor's sequence numbers); NaN where the client cannot tell."""
        counts = [r.get("seq_missed") for r in self.results]
        if any(c is None for c in counts):
            return math.nan
        return self._percent(lambda r: r["seq_missed"])

    @property
    def late_percent(self) -> float:
        """The part of ``lost_percent`` after a subscriber's last update (see ``late``)."""
        return self._percent(self.late)

    @property
    def dropped_percent(self) -> float:
        """The part of ``lost_percent`` skipped over: later values did arrive."""
        return self.lost_percent - self.late_percent

    @property
    def clients_cpu(self) -> float:
        """Mean CPU of one subscriber process, % of one core."""
        return 100.0 * sum(r["cpu"] / r["elapsed"] for r in self.results) / len(self.results)

    @property
    def extra_received(self) -> int:
        """Updates of the extra PVs received during the window, all subscribers together."""
        return sum(r.get("extra_received", 0) for r in self.results)

    @property
    def extra_lost(self) -> int:
        """Values of the extra PVs skipped over (gaps in their counts), all subscribers."""
        return sum(r.get("extra_lost", 0) for r in self.results)

    @property
    def delivered_per_s(self) -> float:
        """Readings per second delivered to all subscribers together: the counting PV's
        window values and the extra PVs' updates."""
        counted = sum(self.delivered(r) for r in self.results) + self.extra_received
        return counted / self.elapsed

    @property
    def backwards(self) -> int:
        return sum(r["backwards"] for r in self.results)

    @property
    def latencies(self) -> list[float]:
        return [lat for r in self.results for v, lat in r["latencies"] if self.first <= v <= self.last]

    def summary(self) -> dict[str, Any]:
        from stats import percentile

        return {
            "mode": self.mode, "n": self.n, "rate": self.rate, "elapsed": self.elapsed,
            "produced": self.produced, "ioc_rate": self.ioc_rate, "monitors": self.monitors,
            "probe": self.probe,
            "received_per_s": self.received_per_s, "lost_percent": self.lost_percent,
            "dropped_percent": self.dropped_percent, "late_percent": self.late_percent,
            "seq_missed_percent": self.seq_missed_percent,
            "backwards": self.backwards,
            "extra_received": self.extra_received, "extra_lost": self.extra_lost,
            "delivered_per_s": self.delivered_per_s,
            "latency_p50": percentile(self.latencies, 50), "latency_p99": percentile(self.latencies, 99),
            "ioc_cpu": self.ioc_cpu, "hub_cpu": self.hub_cpu, "clients_cpu": self.clients_cpu,
            "others_cpu": self.others_cpu,
        }  # fmt: skip


class IOCControl:
    """The benchmark's hands on the IOC: the rate and the counter of one of its counting PVs
    (``fast`` by default; its first element for an array), and a restart for when it no
    longer answers.

    Every read and write goes over a circuit of its own. A long-lived client is no good here:
    when an IOC swamped by monitors drops its circuit, caproto's threading client searches
    again, and after 8 s of no answer it searches only once a minute.
    """

    def __init__(self, ioc: SimulatedIOC, counter: str = "fast", rate: str = "fast_rate",
                 monitors: str | None = "fast_monitors") -> None:
        self.ioc = ioc
        self.counter_pv, self.rate_pv, self.monitors_pv = counter, rate, monitors
        self.pids = [ioc.pid]
        self.restarts: list[str] = []

    @property
    def pid(self) -> int:
        return self.ioc.pid

    def set_rate(self, hz: float, timeout: float = CONTROL_TIMEOUT) -> None:
        """Put ``fast_rate`` with completion, retrying until ``timeout``."""
        from caproto import CaprotoError
        from caproto.sync.client import write

        deadline = time.monotonic() + timeout
        while True:
            try:
                # repeater=False: the sync client would otherwise spawn a caproto-repeater.
                write(self.ioc.pv(self.rate_pv), hz, notify=True, timeout=5.0, repeater=False)
                return
            except (CaprotoError, OSError):
                if time.monotonic() > deadline:
                    raise

    def counter(self) -> int:
        return int(self.ioc.read(self.counter_pv, timeout=CONTROL_TIMEOUT).data[0])

    def monitors(self) -> int:
        if self.monitors_pv is None:
            return -1
        return int(self.ioc.read(self.monitors_pv, timeout=CONTROL_TIMEOUT).data[0])

    def quiet(self, after: str) -> None:
        """Pause the counter; restart the IOC if it does not answer within ``RECOVER_TIMEOUT``."""
        from caproto import CaprotoError

        try:
            self.set_rate(0, timeout=RECOVER_TIMEOUT)
            return
        except (CaprotoError, OSError):
            pass
        self.restarts.append(f"after {after}: no answer for {RECOVER_TIMEOUT:g} s, restarted")
        self.ioc.stop()
        self.ioc.start()
        self.pids.append(self.ioc.pid)
        self.set_rate(0)


LEAD = 0.2  # subscribers start collecting this long before the window opens


def measure(
    subscribers: Subscribers, ioc: IOCControl, hub_pids: list[int], rate: float, seconds: float, tail: float
) -> Window:
    """One window of about ``seconds`` with every subscriber collecting (see Rule 2).

    The window runs from the middle of one read of the IOC's counter to the middle of the
    next: an IOC swamped by monitors may take a while to answer a read.
    """
    ncpu = os.cpu_count() or 1
    own = [os.getpid(), *subscribers.pids]
    subscribers.start_window(seconds, tail)
    time.sleep(LEAD)
    cpu0 = [procstat.cpu_seconds(p) for p in ([ioc.pid], hub_pids, own)]
    busy0, total0 = procstat.system_jiffies()
    c0 = time.monotonic()
    first, t0, probe0 = _read_counter(ioc)
    time.sleep(max(0.0, c0 + seconds - LEAD - time.monotonic()))
    last, t1, probe1 = _read_counter(ioc)
    c1 = time.monotonic()
    cpu1 = [procstat.cpu_seconds(p) for p in ([ioc.pid], hub_pids, own)]
    busy1, total1 = procstat.system_jiffies()
    monitors = ioc.monitors()
    results = subscribers.results(tail + RESULT_GRACE)
    cpu = [100.0 * (b - a) / (c1 - c0) for a, b in zip(cpu0, cpu1)]  # % of one core
    machine = 100.0 * ncpu * (busy1 - busy0) / max(1, total1 - total0)
    return Window(
        mode=subscribers.mode,
        n=len(results),
        rate=rate,
        elapsed=t1 - t0,
        first=first + 1,
        last=last,
        monitors=monitors,
        probe=max(probe0, probe1),
        ioc_cpu=cpu[0],
        hub_cpu=cpu[1],
        others_cpu=max(0.0, machine - sum(cpu)),
        results=results,
    )


def _read_counter(ioc: IOCControl) -> tuple[int, float, float]:
    """The counter's value, the time it was read (the middle of the read) and how long the
    read took."""
    before = time.monotonic()
    value = ioc.counter()
    after = time.monotonic()
    return value, (before + after) / 2, after - before
