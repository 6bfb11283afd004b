"""``python -m bench scale``: thousands of PVs behind one daemon, asked for by one client.

A daemon of its own (so that its memory and CPU are this part's alone) in front of the rsrv
IOC, whose ``scale:s*`` records never change and ``scale:c*`` records count once a second.
One client (a ``Hub`` in this process) asks for, in order:

1. 1,000 static PVs, all at once: the time from the request to all of them holding a value
   (and how many did, if some never do);
2. static PVs up to the largest count N (a second client, a batch at a time): then, with
   nothing changing, the CPU of the daemon and its actors over a window, their resident
   memory, and how long ``pvhub status --json`` takes (the command, as an operator runs it);
3. N counting PVs, all at once: the time to all connected; then (the second client making
   sure all are served) the same CPU, memory and status figures with N PVs updating at 1 Hz.

Rule 1: the machine is shared, and a daemon that starts one process per PV would need tens
of GB for 10,000: a probe of a few PVs looks at ``pvhub status`` first, and when it finds one
actor per PV, the part measures those few only, projects their memory to 10,000, and fails
the targets it could not try.
Rule 2: a step that does not finish within its budget (three times its target, at least
10 s) fails its target, says how many PVs did connect, and the part goes on.
Rule 3: the machine is shared: while PVs connect and while CPU is measured, the daemon's and
its actors' memory is watched, and past ``MEMORY_LIMIT`` the part stops, says so and fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import procstat
import structlog

from pvhub.testing import DaemonProcess

PROBE = 5  # PVs; with one process each, a loaded machine starts them slowly
CONNECT_BUDGET = 60.0  # seconds for a batched step (or the probe) to connect
FILL_BATCH = 500
# Rule 3: the most the daemon and its actors may hold, resident, before the part stops.
MEMORY_LIMIT = 4e9
GUARD_PERIOD = 0.5  # seconds between two looks at their memory
GB = 1e9
log = structlog.get_logger("bench.scale")


def status(address: str) -> tuple[dict, float]:
    """``pvhub status --json`` against ``address``, and the seconds the command took."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pvhub", "status", "--json", "--address", address, "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"pvhub status failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout), elapsed


class MemoryGuardTripped(RuntimeError):
    """The daemon and its actors hold more memory than the shared machine can spare."""


class MemoryGuard:
    """Rule 3: ``check()`` raises ``MemoryGuardTripped`` once the daemon and every process
    below it hold more than ``limit`` bytes, resident."""

    def __init__(self, daemon: DaemonProcess, limit: float = MEMORY_LIMIT) -> None:
        self.daemon = daemon
        self.limit = limit

    def check(self, doing: str) -> None:
        rss = procstat.rss_bytes([self.daemon.pid, *procstat.descendants(self.daemon.pid)])
        if rss > self.limit:
            raise MemoryGuardTripped(f"daemon+actors held {rss / GB:.1f} GB while {doing}; stopped there")


def connect(hub: Any, names: list[str], keep: list[Any], budget: float, guard: MemoryGuard,
            batch: int | None = None) -> tuple[float, int]:  # fmt: skip
    """Ask for ``names`` (all at once, or ``batch`` at a time, each batch waited for): the
    seconds until all held a value (or the budget ran out), and how many did then."""
    from pvhub.client import ConnectionTimeoutError, EpicsSignalRO, PvhubError

    errors: dict[str, int] = {}
    examples: list[str] = []
    t0 = time.perf_counter()
    deadline = time.monotonic() + budget
    step = batch or len(names)
    signals = []
    for start in range(0, len(names), step):
        if time.monotonic() >= deadline:
            break  # asking for more now would only be another burst
        chunk = [EpicsSignalRO(name, name=f"s{len(keep) + i}", hub=hub)
                 for i, name in enumerate(names[start:start + step])]  # fmt: skip
        keep.extend(chunk)
        signals += chunk
        for signal in chunk:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    signal.wait_for_connection(timeout=min(GUARD_PERIOD, remaining))
                    break
                except ConnectionTimeoutError:
                    guard.check(f"waiting for {len(names):,} PVs to connect")
                except PvhubError as exc:  # the daemon refused it: counted below
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    if len(examples) < 3:
                        examples.append(str(exc))
                    break
    if errors:
        log.warning("pvs_not_connected", errors=errors, examples=examples)
    return time.perf_counter() - t0, sum(1 for s in signals if s.connected)


def status_request(hub: Any) -> float:
    """Seconds for the daemon to answer a status request from a client already connected
    (what ``pvhub status`` waits for, without starting Python)."""
    from pvhub import protocol as p

    t0 = time.perf_counter()
    hub.call(lambda rid: p.StatusRequest(id=rid), timeout=30.0)
    return time.perf_counter() - t0


def measure_hub(bench: Any, daemon: DaemonProcess, seconds: float, hub: Any) -> dict[str, float]:
    """CPU (% of one core) of the daemon and its actors over ``seconds``, their RSS, and the
    status command's time (and the status request's alone)."""
    pids = [daemon.pid, *procstat.descendants(daemon.pid)]
    bench.started.update(pids)
    guard = MemoryGuard(daemon)
    cpu0, t0 = procstat.cpu_seconds(pids), time.monotonic()
    while time.monotonic() < t0 + seconds:
        time.sleep(min(GUARD_PERIOD, t0 + seconds - time.monotonic()))
        guard.check("measuring its CPU")
    cpu = 100.0 * (procstat.cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
    rss = procstat.rss_bytes(pids)
    daemon_rss = procstat.rss_bytes([daemon.pid])
    answer, took = status(daemon.address)
    return {"cpu": cpu, "rss": rss, "daemon_rss": daemon_rss, "status_s": took,
            "status_request_s": status_request(hub), "processes": len(pids),
            "pvs": len(answer["pvs"]), "actors": len(answer.get("actors", []))}  # fmt: skip


def pooled(daemon: DaemonProcess, names: list[str]) -> bool:
    """Whether ``daemon`` serves ``names`` (PVs new to it) from fewer actors than PVs (Rule 1)."""
    from pvhub.client import Hub

    hub = Hub(daemon.address, name="bench-probe")
    keep: list[Any] = []
    try:
        before = len(status(daemon.address)[0].get("actors", []))
        connect(hub, names, keep, CONNECT_BUDGET, MemoryGuard(daemon))
        return len(status(daemon.address)[0].get("actors", [])) - before < len(names)
    finally:
        hub.close()


def unpooled(bench: Any, daemon: DaemonProcess, hub: Any, raw: dict[str, Any]) -> tuple[list[dict], dict]:
    """Rule 1: what the probe's PVs cost, and the targets failed for want of trying."""
    bench.step(f"scale: {PROBE} PVs made {raw['probe']['actors']} actor processes: "
               f"not asking for thousands")  # fmt: skip
    idle = measure_hub(bench, daemon, bench.plan.scale_window, hub)
    raw["idle"] = idle
    why = f"not run: {PROBE} PVs made {raw['probe']['actors']} actor processes"
    projected = idle["daemon_rss"] + (idle["rss"] - idle["daemon_rss"]) / PROBE * 10_000
    rows = [
        {"part": "scale", "what": f"1,000 PVs from one client: all connected ({why})", "pvhub": None,
         "unit": "s", "target": "<= 2 s", "pass": False},
        {"part": "scale", "what": f"{PROBE} PVs, nothing changing: CPU of daemon+actors", "pvhub": idle["cpu"],
         "unit": "%", "target": "", "pass": None},
        {"part": "scale", "what": f"10,000 PVs: RSS of daemon+actors, projected from {PROBE} "
         f"({idle['rss'] / 1e6:,.0f} MB, {idle['processes']} processes)", "pvhub": projected, "unit": "B",
         "target": "< 1 GB", "pass": projected < GB},
        {"part": "scale", "what": f"{PROBE} PVs: `pvhub status --json`", "pvhub": idle["status_s"], "unit": "s",
         "target": "", "pass": None},
        {"part": "scale", "what": f"10,000 PVs at 1 Hz: connected, CPU, status ({why})", "pvhub": None,
         "unit": "s", "target": "<= 15 s, < 1 core, < 1 s", "pass": False},
    ]  # fmt: skip
    return rows, raw


def run(bench: Any, ioc: Any) -> tuple[list[dict], dict]:
    from pvhub.client import Hub

    plan = bench.plan
    rows: list[dict] = []
    raw: dict[str, Any] = {}
    keep: list[Any] = []
    daemon = bench.start_daemon([ioc], "scale")
    # ``hub`` asks as a user's session would, all at once; ``filler`` makes sure that every
    # PV is served (batch by batch) before the daemon's CPU and memory are measured, so those
    # figures hold even when the all-at-once request loses some of its PVs.
    hub = Hub(daemon.address, name="bench-scale")
    filler = Hub(daemon.address, name="bench-scale-filler")
    guard = MemoryGuard(daemon)
    try:
        probe = [ioc.pv(f"scale:s{bench.probe_base + i:05d}") for i in range(PROBE)]
        before = len(status(daemon.address)[0].get("actors", []))
        connect(hub, probe, keep, CONNECT_BUDGET, guard)
        answer, _ = status(daemon.address)
        raw["probe"] = {"pvs": PROBE, "actors": len(answer.get("actors", [])), "actors_before": before}
        if raw["probe"]["actors"] - before >= PROBE:
            return unpooled(bench, daemon, hub, raw)
        largest = max(plan.scale_counts)
        static = [ioc.pv(f"scale:s{i:05d}") for i in range(largest)]
        counting = [ioc.pv(f"scale:c{i:05d}") for i in range(largest)]

        bench.step("scale: 1000 static PVs, asked for at once")
        took, got = connect(hub, static[:1000], keep, _budget(2.0), guard)
        raw["first_1000"] = {"seconds": took, "connected": got}
        rows.append(_connected_row("1,000 PVs from one client, asked for at once", took, got, 1000, 2.0))
        bench.step(f"scale: all {largest} static PVs served ({FILL_BATCH} at a time)")
        raw["static_fill"] = connect(filler, static, keep, CONNECT_BUDGET, guard, FILL_BATCH)
        bench.step(f"scale: {largest} static PVs, nothing changing: {plan.scale_window:g} s window")
        idle = measure_hub(bench, daemon, plan.scale_window, hub)
        raw["idle"] = idle
        rows += [
            {"part": "scale", "what": f"{idle['pvs']:,} PVs, nothing changing: CPU of daemon+actors",
             "pvhub": idle["cpu"], "unit": "%", "target": "< 5 % of a core", "pass": idle["cpu"] < 5.0},
            {"part": "scale", "what": f"{idle['pvs']:,} PVs: RSS of daemon+actors ({idle['processes']} processes)",
             "pvhub": idle["rss"], "unit": "B", "target": "< 1 GB (10,000)", "pass": idle["rss"] < GB},
            {"part": "scale", "what": f"{idle['pvs']:,} PVs: `pvhub status --json` (the command)",
             "pvhub": idle["status_s"], "unit": "s", "target": "< 1 s (10,000)", "pass": idle["status_s"] < 1.0},
            {"part": "scale", "what": f"{idle['pvs']:,} PVs: status request, a connected client",
             "pvhub": idle["status_request_s"], "unit": "s", "target": "", "pass": None},
        ]  # fmt: skip

        bench.step(f"scale: {largest} PVs counting at 1 Hz, asked for at once")
        target = 15.0 if largest >= 10_000 else 2.0 * largest / 1000
        took, got = connect(hub, counting, keep, _budget(target), guard)
        raw["counting"] = {"seconds": took, "connected": got}
        rows.append(_connected_row(f"{largest:,} more PVs (counting at 1 Hz), asked for at once", took, got,
                                   largest, target))  # fmt: skip
        raw["counting_fill"] = connect(filler, counting, keep, CONNECT_BUDGET, guard, FILL_BATCH)
        busy = measure_hub(bench, daemon, plan.scale_window, hub)
        raw["busy"] = busy
        rows += [
            {"part": "scale", "what": f"{largest:,} PVs at 1 Hz (of {busy['pvs']:,}): CPU of daemon+actors",
             "pvhub": busy["cpu"], "unit": "%", "target": "< 100 % of a core", "pass": busy["cpu"] < 100.0},
            {"part": "scale", "what": f"{busy['pvs']:,} PVs: RSS of daemon+actors ({busy['processes']} processes)",
             "pvhub": busy["rss"], "unit": "B", "target": "", "pass": None},
            {"part": "scale", "what": f"{busy['pvs']:,} PVs: `pvhub status --json` (the command)",
             "pvhub": busy["status_s"], "unit": "s", "target": "(< 1 s at 10,000)", "pass": None},
            {"part": "scale", "what": f"{busy['pvs']:,} PVs: status request, a connected client",
             "pvhub": busy["status_request_s"], "unit": "s", "target": "", "pass": None},
        ]  # fmt: skip
    except MemoryGuardTripped as exc:
        bench.step(f"scale: {exc}")
        raw["memory_guard"] = str(exc)
        rows.append({"part": "scale", "what": f"memory guard: {exc}", "pvhub": None, "pass": False})
    finally:
        hub.close()
        filler.close()
        keep.clear()
        bench.stop_daemon(daemon)
    return rows, raw


def _budget(target: float) -> float:
    """How long an all-at-once request may take before the PVs still missing are counted as
    not connected: three times its target, at least 10 s (Rule 2)."""
    return max(10.0, 3.0 * target)


def _connected_row(what: str, took: float, got: int, asked: int, target: float) -> dict:
    if got < asked:
        return {"part": "scale", "what": f"{what}: only {got:,} of {asked:,} connected", "pvhub": took,
                "unit": "s", "target": f"<= {target:g} s", "pass": False}  # fmt: skip
    return {"part": "scale", "what": f"{what}: all connected", "pvhub": took, "unit": "s",
            "target": f"<= {target:g} s", "pass": took <= target}  # fmt: skip
