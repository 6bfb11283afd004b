"""``python -m bench scale``: thousands of PVs behind one daemon, asked for by one client.

A daemon of its own (so that its memory and CPU are this part's alone) in front of the rsrv
IOC, whose ``scale:s*`` records never change and ``scale:c*`` records count once a second.
One client (a ``Hub`` in this process) asks for, in order:

1. 1,000 static PVs: the time from the request to all of them holding a value;
2. static PVs up to the largest count N: then, with nothing changing, the CPU of the daemon
   and its actors over a window, their resident memory, and how long ``pvhub status --json``
   takes (the command, as an operator runs it);
3. N counting PVs: the time to all connected, then the same CPU, memory and status figures
   with those N PVs updating at 1 Hz.

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

from pvhub.process import DaemonProcess

PROBE = 5  # PVs; with one process each, a loaded machine starts them slowly
CONNECT_BUDGET = 120.0  # seconds for any one step's PVs to connect
GB = 1e9


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


def connect(hub: Any, names: list[str], keep: list[Any]) -> float:
    """Seconds from asking for ``names`` to all of them holding a value."""
    from pvhub.client import EpicsSignalRO

    t0 = time.perf_counter()
    signals = [EpicsSignalRO(name, name=f"s{len(keep) + i}", hub=hub) for i, name in enumerate(names)]
    keep.extend(signals)
    deadline = time.monotonic() + CONNECT_BUDGET
    for signal in signals:
        signal.wait_for_connection(timeout=max(0.1, deadline - time.monotonic()))
    return time.perf_counter() - t0


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
        connect(hub, names, keep)
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
    hub = Hub(daemon.address, name="bench-scale")
    try:
        probe = [ioc.pv(f"scale:s{bench.probe_base + i:05d}") for i in range(PROBE)]
        connect(hub, probe, keep)
        answer, _ = status(daemon.address)
        pooled = len(answer.get("actors", [])) < PROBE
        raw["probe"] = {"pvs": PROBE, "actors": len(answer.get("actors", []))}
        if not pooled:
            return unpooled(bench, daemon, raw)
        first, largest = 1000, max(plan.scale_counts)
        note = ""

        bench.step(f"scale: {first} static PVs")
        took = connect(hub, [ioc.pv(f"scale:s{i:05d}") for i in range(first)], keep)
        rows.append({"part": "scale", "what": f"{first:,} PVs from one client: all connected{note}",
                     "pvhub": took, "unit": "s", "target": "<= 2 s (1,000)",
                     "pass": took <= 2.0 if pooled else False})  # fmt: skip
        if largest > first:
            bench.step(f"scale: static PVs up to {largest}")
            raw["static_more_s"] = connect(hub, [ioc.pv(f"scale:s{i:05d}") for i in range(first, largest)], keep)
        bench.step(f"scale: {largest} static PVs, nothing changing: {plan.scale_window:g} s window")
        idle = measure_hub(bench, daemon, plan.scale_window)
        raw["idle"] = idle
        rows += [
            {"part": "scale", "what": f"{largest:,} PVs, nothing changing: CPU of daemon+actors{note}",
             "pvhub": idle["cpu"], "unit": "%", "target": "< 5 % of a core", "pass": idle["cpu"] < 5.0},
            {"part": "scale", "what": f"{largest:,} PVs: RSS of daemon+actors ({idle['processes']} processes){note}",
             "pvhub": idle["rss"], "unit": "B", "target": "< 1 GB (10,000)", "pass": idle["rss"] < GB and pooled},
            {"part": "scale", "what": f"{largest:,} PVs: `pvhub status --json`{note}", "pvhub": idle["status_s"],
             "unit": "s", "target": "< 1 s (10,000)", "pass": idle["status_s"] < 1.0 and pooled},
        ]  # fmt: skip

        bench.step(f"scale: {largest} PVs counting at 1 Hz")
        took = connect(hub, [ioc.pv(f"scale:c{i:05d}") for i in range(largest)], keep)
        rows.append({"part": "scale", "what": f"{largest:,} more PVs (updating at 1 Hz): all connected{note}",
                     "pvhub": took, "unit": "s", "target": "<= 15 s (10,000)",
                     "pass": took <= 15.0 and pooled})  # fmt: skip
        busy = measure_hub(bench, daemon, plan.scale_window)
        raw["busy"] = busy
        total = largest * 2 + PROBE
        rows += [
            {"part": "scale", "what": f"{largest:,} PVs at 1 Hz (of {total:,}): CPU of daemon+actors{note}",
             "pvhub": busy["cpu"], "unit": "%", "target": "< 100 % of a core", "pass": busy["cpu"] < 100.0 and pooled},
            {"part": "scale", "what": f"{total:,} PVs: RSS of daemon+actors ({busy['processes']} processes){note}",
             "pvhub": busy["rss"], "unit": "B", "target": "", "pass": None},
            {"part": "scale", "what": f"{total:,} PVs: `pvhub status --json`{note}", "pvhub": busy["status_s"],
             "unit": "s", "target": "< 1 s", "pass": busy["status_s"] < 1.0 and pooled},
        ]  # fmt: skip
    finally:
        hub.close()
        keep.clear()
        bench.stop_daemon(daemon)
    return rows, raw
