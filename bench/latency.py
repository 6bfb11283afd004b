"""``python -m bench latency``: pvhub against ophyd on both its control layers, on two IOCs.

Each (library, IOC) pair runs in a process of its own (``latency_client.py``): ophyd picks
its control layer once per process. The IOCs are the caproto zoo and the rsrv IOC; pvhub goes
through one daemon that reaches both.

Rule 1: the processes run one at a time, never beside each other, and the order of the
libraries turns from round to round, so that a busy moment of a shared machine does not land
on one library only.
Rule 2: every (library, IOC) pair gets PVs of its own for the first-value samples, so each
is the first to use them (for pvhub: the first to ask the daemon for them).
Rule 3: the comparison is with the faster ophyd configuration, whichever it is, and says
which.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stats import Timing

CLIENT = Path(__file__).with_name("latency_client.py")
LIBRARIES = ("pvhub", "ophyd-caproto", "ophyd-pyepics")
CLIENT_TIMEOUT = 240.0


@dataclass(frozen=True)
class Target:
    """The PVs a latency run uses on one IOC."""

    name: str  # "caproto" or "rsrv"
    motor: str  # a float with limits that puts complete on at once
    det: str  # a PV to count
    fresh: tuple[str, ...]  # PVs nobody uses before this part; split among the libraries


def run(bench: Any, targets: list[Target], address: str, env: dict[str, str]) -> dict[str, Any]:
    """Samples per IOC, measurement and (library, configuration): {ioc: {what: {who: [s]}}}."""
    plan = bench.plan
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for target in targets:
        per = len(target.fresh) // len(LIBRARIES) // plan.latency_rounds
        fresh = iter(target.fresh)
        got = samples.setdefault(target.name, {"set": {}, "count": {}, "list_scan": {}, "first": {}})
        for r in range(plan.latency_rounds):
            order = LIBRARIES[r % 3:] + LIBRARIES[: r % 3]
            for library in order:
                bench.step(f"latency: {library} on the {target.name} IOC (round {r + 1})")
                client_plan = {
                    "motor": target.motor, "det": target.det,
                    "fresh": [next(fresh) for _ in range(per)],
                    "puts": plan.latency_puts, "budget": plan.latency_budget,
                    "points": plan.latency_points, "runs": plan.latency_runs,
                }  # fmt: skip
                result = _client(bench, library, client_plan, {**env, "PVHUB_ADDRESS": address})
                for what in ("set", "list_scan"):
                    for config, values in result[what].items():
                        who = library if library == "pvhub" else f"{library} {config}"
                        got[what].setdefault(who, []).extend(values)
                for what in ("count", "first"):
                    got[what].setdefault(library, []).extend(result[what])
    return samples


def _client(bench: Any, library: str, plan: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, str(CLIENT), library, json.dumps(plan)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    bench.started.add(process.pid)
    try:
        out, err = process.communicate(timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"latency client {library} failed (code {process.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1])


def rows(samples: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (IOC, measurement): pvhub against the faster ophyd (Rule 3), with targets."""
    out = []
    targets = {"set": ("set(v).wait(), median", 1.0), "count": ("RunEngine count, per point, median", 1.1),
               "list_scan": ("RunEngine list_scan, per point, median", 1.1)}  # fmt: skip
    for ioc, parts in samples.items():
        for what, (label, limit) in targets.items():
            timings = {who: Timing.of(values) for who, values in parts[what].items()}
            ophyds = {who: t for who, t in timings.items() if who != "pvhub"}
            best = min(ophyds, key=lambda who: ophyds[who].median)
            hub = timings["pvhub"]
            out.append({
                "part": "latency", "what": f"{label} ({ioc} IOC)", "pvhub": hub.median,
                "reference": ophyds[best].median, "reference_is": best,
                "p99": hub.p99, "reference_p99": ophyds[best].p99, "unit": "s",
                "ratio": hub.median / ophyds[best].median, "target": f"<= {limit}x", "pass": hub.median <= limit * ophyds[best].median,
                "all": {who: {"n": t.n, "median": t.median, "p99": t.p99} for who, t in timings.items()},
            })  # fmt: skip
        firsts = {who: Timing.of(values) for who, values in parts["first"].items()}
        hub = firsts["pvhub"]
        ophyds = {who: t for who, t in firsts.items() if who != "pvhub"}
        best = min(ophyds, key=lambda who: ophyds[who].median)
        out.append({
            "part": "latency", "what": f"first value of a PV nobody used, median ({ioc} IOC)",
            "pvhub": hub.median, "reference": ophyds[best].median, "reference_is": best,
            "p99": hub.p99, "reference_p99": ophyds[best].p99, "unit": "s",
            "ratio": hub.median / ophyds[best].median, "target": "<= 50 ms", "pass": hub.median <= 0.050,
            "all": {who: {"n": t.n, "median": t.median, "p99": t.p99} for who, t in firsts.items()},
        })  # fmt: skip
    return out
