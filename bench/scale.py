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
Rule 2: a step that does not finish within its budget fails its target and ends the part;
the rest of the benchmark still runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import procstat
import structlog

from pvhub.process import DaemonProcess

PROBE = 5  # PVs; with one process each, a loaded machine starts them slowly
CONNECT_BUDGET = 120.0  # seconds for any one step's PVs to connect
ALL_AT_ONCE_BUDGET = 10.0  # seconds per 1,000 PVs asked for at once (five times the target)
FILL_BATCH = 500
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


def connect(hub: Any, names: list[str], keep: list[Any], budget: float,
            batch: int | None = None) -> tuple[float, int]:  # fmt: skip
    """Ask for ``names`` (all at once, or ``batch`` at a time, each batch waited for): the
    seconds until all held a value (or the budget ran out), and how many did."""
    from pvhub.client import EpicsSignalRO, PvhubError

    errors: dict[str, int] = {}
    examples: list[str] = []
    t0 = time.perf_counter()
    deadline = time.monotonic() + budget
    step = batch or len(names)
    signals = []
    for start in range(0, len(names), step):
        chunk = [EpicsSignalRO(name, name=f"s{len(keep) + i}", hub=hub)
                 for i, name in enumerate(names[start:start + step])]  # fmt: skip
        keep.extend(chunk)
        signals += chunk
        for signal in chunk:
            try:
                signal.wait_for_connection(timeout=max(0.01, deadline - time.monotonic()))
            except PvhubError as exc:  # a timeout, or the daemon refused: counted below
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if len(examples) < 3:
                    examples.append(str(exc))
    if errors:
        log.warning("pvs_not_connected", errors=errors, examples=examples)
    return time.perf_counter() - t0, sum(1 for s in signals if s.connected)


def measure_hub(bench: Any, daemon: DaemonProcess, seconds: float) -> dict[str, float]:
    """CPU (% of one core) of the daemon and its actors over ``seconds``, their RSS, and the
    status command's time."""
    pids = [daemon.pid, *procstat.descendants(daemon.pid)]
    bench.started.update(pids)
    cpu0, t0 = procstat.cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    cpu = 100.0 * (procstat.cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
    rss = procstat.rss_bytes(pids)
    daemon_rss = procstat.rss_bytes([daemon.pid])
    answer, took = status(daemon.address)
    return {"cpu": cpu, "rss": rss, "daemon_rss": daemon_rss, "status_s": took, "processes": len(pids),
            "pvs": len(answer["pvs"]), "actors": len(answer.get("actors", []))}  # fmt: skip


def pooled(daemon: DaemonProcess, names: list[str]) -> bool:
    """Whether ``daemon`` serves ``names`` (PVs new to it) from fewer actors than PVs (Rule 1)."""
    from pvhub.client import Hub

    hub = Hub(daemon.address, name="bench-probe")
    keep: list[Any] = []
    try:
        before = len(status(daemon.address)[0].get("actors", []))
        connect(hub, names, keep, CONNECT_BUDGET)
        return len(status(daemon.address)[0].get("actors", [])) - before < len(names)
    finally:
        hub.close()


def unpooled(bench: Any, daemon: DaemonProcess, raw: dict[str, Any]) -> tuple[list[dict], dict]:
    """Rule 1: what the probe's PVs cost, and the targets failed for want of trying."""
    bench.step(f"scale: {PROBE} PVs made {raw['probe']['actors']} actor processes: "
               f"not asking for thousands")  # fmt: skip
    idle = measure_hub(bench, daemon, bench.plan.scale_window)
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
    try:
        probe = [ioc.pv(f"scale:s{bench.probe_base + i:05d}") for i in range(PROBE)]
        before = len(status(daemon.address)[0].get("actors", []))
        connect(hub, probe, keep, CONNECT_BUDGET)
        answer, _ = status(daemon.address)
        raw["probe"] = {"pvs": PROBE, "actors": len(answer.get("actors", [])), "actors_before": before}
        if raw["probe"]["actors"] - before >= PROBE:
            return unpooled(bench, daemon, raw)
        largest = max(plan.scale_counts)
        static = [ioc.pv(f"scale:s{i:05d}") for i in range(largest)]
        counting = [ioc.pv(f"scale:c{i:05d}") for i in range(largest)]

        bench.step("scale: 1000 static PVs, asked for at once")
        took, got = connect(hub, static[:1000], keep, ALL_AT_ONCE_BUDGET)
        raw["first_1000"] = {"seconds": took, "connected": got}
        rows.append(_connected_row("1,000 PVs from one client, asked for at once", took, got, 1000, 2.0))
        bench.step(f"scale: all {largest} static PVs served ({FILL_BATCH} at a time)")
        raw["static_fill"] = connect(filler, static, keep, CONNECT_BUDGET, FILL_BATCH)
        bench.step(f"scale: {largest} static PVs, nothing changing: {plan.scale_window:g} s window")
        idle = measure_hub(bench, daemon, plan.scale_window)
        raw["idle"] = idle
        rows += [
            {"part": "scale", "what": f"{idle['pvs']:,} PVs, nothing changing: CPU of daemon+actors",
             "pvhub": idle["cpu"], "unit": "%", "target": "< 5 % of a core", "pass": idle["cpu"] < 5.0},
            {"part": "scale", "what": f"{idle['pvs']:,} PVs: RSS of daemon+actors ({idle['processes']} processes)",
             "pvhub": idle["rss"], "unit": "B", "target": "< 1 GB (10,000)", "pass": idle["rss"] < GB},
            {"part": "scale", "what": f"{idle['pvs']:,} PVs: `pvhub status --json`", "pvhub": idle["status_s"],
             "unit": "s", "target": "< 1 s (10,000)", "pass": idle["status_s"] < 1.0},
        ]  # fmt: skip

        bench.step(f"scale: {largest} PVs counting at 1 Hz, asked for at once")
        budget = ALL_AT_ONCE_BUDGET * largest / 1000
        took, got = connect(hub, counting, keep, budget)
        raw["counting"] = {"seconds": took, "connected": got}
        rows.append(_connected_row(f"{largest:,} more PVs (counting at 1 Hz), asked for at once", took, got,
                                   largest, 15.0 if largest >= 10_000 else 2.0 * largest / 1000))  # fmt: skip
        raw["counting_fill"] = connect(filler, counting, keep, CONNECT_BUDGET, FILL_BATCH)
        busy = measure_hub(bench, daemon, plan.scale_window)
        raw["busy"] = busy
        rows += [
            {"part": "scale", "what": f"{largest:,} PVs at 1 Hz (of {busy['pvs']:,}): CPU of daemon+actors",
             "pvhub": busy["cpu"], "unit": "%", "target": "< 100 % of a core", "pass": busy["cpu"] < 100.0},
            {"part": "scale", "what": f"{busy['pvs']:,} PVs: RSS of daemon+actors ({busy['processes']} processes)",
             "pvhub": busy["rss"], "unit": "B", "target": "", "pass": None},
            {"part": "scale", "what": f"{busy['pvs']:,} PVs: `pvhub status --json`", "pvhub": busy["status_s"],
             "unit": "s", "target": "< 1 s", "pass": busy["status_s"] < 1.0},
        ]  # fmt: skip
    finally:
        hub.close()
        filler.close()
        keep.clear()
        bench.stop_daemon(daemon)
    return rows, raw


def _connected_row(what: str, took: float, got: int, asked: int, target: float) -> dict:
    if got < asked:
        return {"part": "scale", "what": f"{what}: only {got:,} of {asked:,} connected", "pvhub": took,
                "unit": "s", "target": f"<= {target:g} s", "pass": False}  # fmt: skip
    return {"part": "scale", "what": f"{what}: all connected", "pvhub": took, "unit": "s",
            "target": f"<= {target:g} s", "pass": took <= target}  # fmt: skip
