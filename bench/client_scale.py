"""One client process holding thousands of Signals: what each costs, and what the I/O thread does.

    python bench/client_scale.py [--counts 1000,10000] [--rate 20] [--window 3] [--json FILE]

Run it from the repository root. It starts, on 127.0.0.1 with ports picked at run time:

- one IOC with as many PVs as the largest count (``bench/scale_ioc.py``: ``v0`` .. ``vN``, and
  ``tick``, which counts at ``tick_rate`` Hz);
- one ``pvhub serve`` whose config puts those PVs in groups of ``GROUP_SIZE`` (one actor
  process each), since a PV outside any group gets a process of its own.

Then, for each count N, a fresh ``Hub`` in this process and N ``EpicsSignalRO`` on ``v0`` ..
``v{N-1}`` plus one on ``tick``, and it reports:

- RSS per Signal: this process's resident memory after all are connected, less before any
  was created, over N (a Signal, its channel, and the hub's share);
- the time until all are connected;
- the hub's I/O thread: CPU per wake-up (one pass of its loop) with everything idle, and
  while ``tick`` updates at ``--rate`` Hz; and its CPU per update;
- the callback thread's CPU per update of ``tick`` when N Signals, none subscribed, all read
  ``tick``, and when one of them is subscribed.

CPU is the thread's own, from ``/proc/self/task/<tid>/schedstat`` (nanoseconds on the CPU).
The machine is shared, so expect noise; the figures that matter differ by orders of magnitude.

Rule 1: loopback only; the IOC and the daemon are this run's own, stopped in ``finally``.
Rule 2: every wait has a deadline. Once the daemon's actors have connected their PVs (a
warm-up client waits for that first; it takes as long as Channel Access takes to connect
10,000 channels on this machine), the steps for 1,000 and 10,000 take about a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import structlog

from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC

REPO_ROOT = Path(__file__).absolute().parent.parent
GROUP_SIZE = 2500  # PVs per actor process
CONNECT_TIMEOUT = 60.0
WARM_UP_TIMEOUT = 120.0
IOC_START_TIMEOUT = 60.0


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def thread_cpu_ns(native_id: int | None) -> int:
    """Nanoseconds thread ``native_id`` of this process has spent on a CPU."""
    if native_id is None:
        raise RuntimeError("the thread has not started")
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.01)


def config_text(ioc: SimulatedIOC, count: int) -> str:
    lines = []
    for start in range(0, count, GROUP_SIZE):
        names = ", ".join(f'"{ioc.pv(f"v{i}")}"' for i in range(start, min(count, start + GROUP_SIZE)))
        lines += [f"[groups.scale{start // GROUP_SIZE}]", f"pvs = [{names}]", ""]
    return "\n".join(lines)


class Window:
    """What the hub's threads did between ``open`` and ``close``."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def __enter__(self) -> Window:
        self.io0 = thread_cpu_ns(self.hub._io.native_id)
        self.cb0 = thread_cpu_ns(self.hub._dispatcher.thread.native_id)
        self.wakeups0 = getattr(self.hub, "wakeups", 0)
        self.dispatches0 = getattr(self.hub, "dispatches", 0)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        self.io_ns = thread_cpu_ns(self.hub._io.native_id) - self.io0
        self.cb_ns = thread_cpu_ns(self.hub._dispatcher.thread.native_id) - self.cb0
        self.wakeups = getattr(self.hub, "wakeups", 0) - self.wakeups0
        self.dispatches = getattr(self.hub, "dispatches", 0) - self.dispatches0

    def io_per_wakeup_us(self) -> float | None:
        return self.io_ns / self.wakeups / 1e3 if self.wakeups else None


def warm_up(ioc: SimulatedIOC, address: str, count: int) -> None:
    """Until the daemon's actors have connected every PV, so that the steps measure the
    client, not the actors' start (a client of its own, closed after)."""
    from pvhub.client import EpicsSignalRO, Hub

    hub = Hub(address, name="client-scale-warm-up")
    try:
        t0 = time.monotonic()
        signals = [EpicsSignalRO(ioc.pv(f"v{i}"), name=f"v{i}", hub=hub) for i in range(count)]
        for signal in signals:
            signal.wait_for_connection(timeout=max(0.1, t0 + WARM_UP_TIMEOUT - time.monotonic()))
        step(f"   the actors had all {count} PVs after {time.monotonic() - t0:.1f} s")
    finally:
        hub.close()


def measure(count: int, ioc: SimulatedIOC, address: str, rate_signal: Any, rate: float,
            window: float) -> dict[str, Any]:
    from pvhub.client import EpicsSignalRO, Hub

    gc.collect()
    rss0 = rss_bytes()
    hub = Hub(address, name=f"client-scale-{count}")
    try:
        t0 = time.monotonic()
        signals = [EpicsSignalRO(ioc.pv(f"v{i}"), name=f"v{i}", hub=hub) for i in range(count)]
        tick = EpicsSignalRO(ioc.pv("tick"), name="tick", hub=hub)
        created = time.monotonic() - t0
        deadline = t0 + CONNECT_TIMEOUT
        for signal in [*signals, tick]:
            signal.wait_for_connection(timeout=max(0.1, deadline - time.monotonic()))
        connected = time.monotonic() - t0
        gc.collect()
        rss1 = rss_bytes()
        step(f"   {count} Signals: created in {created:.2f} s, all connected after {connected:.2f} s")
        # Idle means no channel left to prove (hub.py, Rule 4): until then the I/O thread
        # still works for the channels whose subscriptions have not shown up yet.
        unproven = getattr(hub, "unproven", None)
        if unproven is not None:
            wait_until(lambda: hub.unproven == 0, CONNECT_TIMEOUT, "channels still unproven")
        live = time.monotonic() - t0
        step(f"   all live after {live:.2f} s")
        time.sleep(0.5)  # let the last pings pass

        with Window(hub) as idle:
            time.sleep(window)

        rate_signal.set(rate).wait(10)
        first = tick.get()
        wait_until(lambda: tick.get() > first + 2, 10, "tick did not count")
        start_tick = tick.get()
        with Window(hub) as busy:
            time.sleep(window)
        updates = tick.get() - start_tick

        # The callback thread: N Signals on the one PV that updates, none subscribed, then one.
        same = [EpicsSignalRO(ioc.pv("tick"), name=f"tick{i}", hub=hub) for i in range(count)]
        time.sleep(0.3)
        start_tick = tick.get()
        with Window(hub) as unsubscribed:
            time.sleep(window)
        unsubscribed_updates = tick.get() - start_tick
        seen: list[Any] = []
        same[0].subscribe(lambda value, **kwargs: seen.append(value))
        wait_until(lambda: seen, 5, "no callback")
        start_tick = tick.get()
        with Window(hub) as subscribed:
            time.sleep(window)
        subscribed_updates = tick.get() - start_tick
        rate_signal.set(0).wait(10)
        same[0].unsubscribe_all()
        del same
    finally:
        hub.close()

    def per(value: float, n: float) -> float | None:
        return value / n if n else None

    return {
        "signals": count,
        "rss_per_signal_bytes": (rss1 - rss0) / count,
        "create_s": created,
        "connect_s": connected,
        "live_s": live if unproven is not None else None,
        "idle_wakeups_per_s": idle.wakeups / idle.seconds,
        "idle_io_us_per_wakeup": idle.io_per_wakeup_us(),
        "idle_io_cpu_percent": 100 * idle.io_ns / 1e9 / idle.seconds,
        "updates_per_s": updates / busy.seconds,
        "busy_wakeups_per_s": busy.wakeups / busy.seconds,
        "busy_io_us_per_wakeup": busy.io_per_wakeup_us(),
        "busy_io_us_per_update": per(busy.io_ns / 1e3, updates),
        "unsubscribed_callback_us_per_update": per(unsubscribed.cb_ns / 1e3, unsubscribed_updates),
        "unsubscribed_dispatches_per_update": per(unsubscribed.dispatches, unsubscribed_updates),
        "unsubscribed_io_us_per_update": per(unsubscribed.io_ns / 1e3, unsubscribed_updates),
        "subscribed_callback_us_per_update": per(subscribed.cb_ns / 1e3, subscribed_updates),
        "subscribed_dispatches_per_update": per(subscribed.dispatches, subscribed_updates),
    }


ROWS = [
    ("RSS per Signal (bytes)", "rss_per_signal_bytes", "{:.0f}"),
    ("time until all connected (s)", "connect_s", "{:.2f}"),
    ("time until all subscriptions proven (s)", "live_s", "{:.2f}"),
    ("idle: I/O wake-ups per s", "idle_wakeups_per_s", "{:.1f}"),
    ("idle: I/O CPU per wake-up (us)", "idle_io_us_per_wakeup", "{:.1f}"),
    ("idle: I/O thread CPU (%)", "idle_io_cpu_percent", "{:.2f}"),
    ("1 PV updating: updates per s", "updates_per_s", "{:.1f}"),
    ("1 PV updating: I/O wake-ups per s", "busy_wakeups_per_s", "{:.1f}"),
    ("1 PV updating: I/O CPU per wake-up (us)", "busy_io_us_per_wakeup", "{:.1f}"),
    ("1 PV updating: I/O CPU per update (us)", "busy_io_us_per_update", "{:.1f}"),
    ("N Signals on it, none subscribed: callback CPU per update (us)",
     "unsubscribed_callback_us_per_update", "{:.1f}"),
    ("N Signals on it, none subscribed: dispatches per update", "unsubscribed_dispatches_per_update", "{:.2f}"),
    ("N Signals on it, none subscribed: I/O CPU per update (us)", "unsubscribed_io_us_per_update", "{:.1f}"),
    ("N Signals on it, 1 subscribed: callback CPU per update (us)",
     "subscribed_callback_us_per_update", "{:.1f}"),
    ("N Signals on it, 1 subscribed: dispatches per update", "subscribed_dispatches_per_update", "{:.2f}"),
]


def table(results: list[dict[str, Any]]) -> str:
    header = "| | " + " | ".join(f"N = {r['signals']:,}" for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    for label, key, fmt in ROWS:
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1000,10000", help="Signals per step, comma-separated")
    parser.add_argument("--rate", type=float, default=20.0, help="updates per second of the one PV")
    parser.add_argument("--window", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from pvhub.client import EpicsSignal, close_hubs

    began = time.monotonic()
    results = []
    step(f"starting an IOC with {max(counts)} PVs")
    ioc = SimulatedIOC("bench.scale_ioc", prefix=f"scale{uuid.uuid4().hex[:6]}:", cwd=REPO_ROOT,
                       ready_pv="tick", args=["--count", str(max(counts))], startup_timeout=IOC_START_TIMEOUT)
    with ioc, tempfile.TemporaryDirectory(prefix="pvhub-client-scale-") as tmp:
        config = Path(tmp) / "pvhub.toml"
        config.write_text(config_text(ioc, max(counts)))
        step("starting the daemon")
        with DaemonProcess(env=ioc.ca_env(), args=["--config", str(config)], directory=tmp,
                           startup_timeout=CONNECT_TIMEOUT) as daemon:
            try:
                rate_signal = EpicsSignal(ioc.pv("tick_rate"), name="tick_rate", address=daemon.address)
                rate_signal.wait_for_connection(timeout=CONNECT_TIMEOUT)
                step(f"waiting for the daemon's actors to connect {max(counts)} PVs")
                warm_up(ioc, daemon.address, max(counts))
                for count in counts:
                    step(f"N = {count}")
                    results.append(measure(count, ioc, daemon.address, rate_signal, args.rate, args.window))
            finally:
                close_hubs()
    step(f"done in {time.monotonic() - began:.0f} s")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"rate": args.rate, "window": args.window, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
