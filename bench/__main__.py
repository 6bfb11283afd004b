"""pvhub's benchmark: every comparison, side by side, in one run.

    python -m bench [latency|scale|fanout|throughput|waveform ...] [--quick] [--json FILE]

Run it from the repository root; with no part named it runs all five. It starts its own IOCs
(the caproto zoo, ``tests/iocs/zoo.py``, and the rsrv IOC, ``tests/iocs/rsrv.py``) and its own
``pvhub serve`` daemons, all on 127.0.0.1 with ports picked at run time, prints one table
(pvhub's figure, the reference's, their ratio, the target and a verdict) and, with
``--json``, writes every number. See ``bench/README.md`` for the parts and their targets.

Rule 1: loopback only; every IOC and daemon is this run's own, under a random PV prefix.
Rule 2: every wait has a deadline and every loop a count; the full run stays under ten
minutes on two cores, ``--quick`` under four.
Rule 3: everything started here is stopped in ``finally``; the run ends by checking by pid
that no process it started (IOCs, daemons, actors, clients) is still alive, says so, and
exits with status 1 if one is.
Rule 4: a part that fails is reported as failed and the other parts still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).absolute().parent))  # the sibling modules, as scripts see them

import latency  # noqa: E402
import procstat  # noqa: E402
import scale  # noqa: E402
import streams  # noqa: E402
from fanout import IOCControl  # noqa: E402
from stats import duration, table  # noqa: E402

from pvhub.testing import DaemonProcess  # noqa: E402
from pvhub.testing import SimulatedIOC, merge_ca_env  # noqa: E402

REPO_ROOT = Path(__file__).absolute().parent.parent
PARTS = ("latency", "scale", "fanout", "throughput", "waveform")
# PVs of the zoo that nothing else touches, for the latency part's first-value samples.
ZOO_FRESH = ("x", "count", "wave", "text", "mode", "slow_delay", "slow", "reject", "chars", "dt")
SPARE_PVS = 100  # rsrv static PVs past the scale part's: the probes' and latency's first values
MAX_ARRAY_BYTES = "4194304"
DAEMON_STOP_TIMEOUT = 30.0  # a daemon stops its actors first, and there may be many  # a 1 MiB waveform, for libca (ophyd's pyepics layer)


@dataclass(frozen=True)
class Plan:
    latency_rounds: int
    latency_puts: int  # set().wait() per configuration and process
    latency_budget: float  # seconds for those
    latency_points: int  # points of each RunEngine plan
    latency_runs: int  # runs of each plan per process
    scale_counts: tuple[int, ...]  # the largest is N, PVs of each kind
    scale_window: float  # seconds of CPU measurement
    fanout: tuple[tuple[float, int], ...]  # (Hz, subscriber processes)
    throughput: tuple[tuple[int, tuple[float, ...]], ...]  # (subscribers, rates of fast)
    throughput_extra: int  # 1 Hz PVs each throughput subscriber also watches
    waveform_clients: int
    waveform_rate: float
    window: float  # seconds of each streaming measurement
    tail: float  # seconds after it in which its updates still count
    settle: float  # seconds after a rate change


FULL = Plan(
    latency_rounds=2, latency_puts=300, latency_budget=2.5, latency_points=20, latency_runs=6,
    scale_counts=(1000, 10000), scale_window=5.0,
    fanout=((1000.0, 100), (5000.0, 10)),
    throughput=((10, (1000.0, 2000.0, 5000.0, 10000.0)),), throughput_extra=500,
    waveform_clients=10, waveform_rate=10.0, window=4.0, tail=1.5, settle=1.0,
)  # fmt: skip
QUICK = Plan(
    latency_rounds=1, latency_puts=100, latency_budget=1.0, latency_points=10, latency_runs=1,
    scale_counts=(1000,), scale_window=3.0,
    fanout=((1000.0, 20), (5000.0, 10)),
    throughput=((10, (1000.0, 5000.0)),), throughput_extra=200,
    waveform_clients=10, waveform_rate=10.0, window=2.0, tail=1.2, settle=0.4,
)  # fmt: skip


class Bench:
    """What the parts share: the plan, the IOCs and daemons, and every pid started (Rule 3)."""

    def __init__(self, plan: Plan, stack: ExitStack) -> None:
        self.plan = plan
        self.stack = stack
        self.started: set[int] = set()
        self.controls: list[IOCControl] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="pvhub-bench-"))
        self.probe_base = max(plan.scale_counts)
        self._zoo: SimulatedIOC | None = None
        self._rsrv: SimulatedIOC | None = None
        self._daemon: DaemonProcess | None = None
        self._daemons: list[DaemonProcess] = []
        self.extra_pvs = 0
        self.daemon_kills: list[str] = []

    def step(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # -- IOCs

    def zoo(self) -> SimulatedIOC:
        if self._zoo is None:
            self.step("starting the caproto zoo IOC")
            ioc = SimulatedIOC("tests.iocs.zoo", prefix=f"bz{uuid.uuid4().hex[:6]}:", cwd=REPO_ROOT,
                               ready_pv="dt")  # fmt: skip
            self.stack.enter_context(ioc)
            self.started.add(ioc.pid)
            self._zoo = ioc
            self._point_env_at_iocs()
            control = IOCControl(ioc)
            self.controls.append(control)
            control.set_rate(0)  # its fast counter runs at 500 Hz unless told otherwise
        return self._zoo

    def rsrv(self) -> SimulatedIOC:
        if self._rsrv is None:
            count = self.probe_base + SPARE_PVS
            self.step(f"starting the rsrv IOC ({count} PVs of each scale kind)")
            ioc = SimulatedIOC("tests.iocs.rsrv", prefix=f"br{uuid.uuid4().hex[:6]}:", cwd=REPO_ROOT,
                               args=["--count", str(count)], ready_pv="motor", startup_timeout=90.0)  # fmt: skip
            self.stack.enter_context(ioc)
            self.started.add(ioc.pid)
            self._rsrv = ioc
            self._point_env_at_iocs()
        return self._rsrv

    def _point_env_at_iocs(self) -> None:
        """Our own environment names exactly our IOCs: caproto's sync client (``IOCControl``)
        reads it at every call."""
        iocs = [ioc for ioc in (self._zoo, self._rsrv) if ioc is not None]
        os.environ.update(merge_ca_env(*iocs))

    def client_env(self, *iocs: SimulatedIOC) -> dict[str, str]:
        """A client process's environment: these IOCs' CA settings and nothing else EPICS."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        return {**env, **merge_ca_env(*iocs), "EPICS_CA_MAX_ARRAY_BYTES": MAX_ARRAY_BYTES}

    # -- daemons

    def start_daemon(self, iocs: list[SimulatedIOC], name: str) -> DaemonProcess:
        self.step(f"starting a daemon ({name})")
        directory = self.logdir / f"daemon-{name}"
        directory.mkdir()
        daemon = DaemonProcess(env=merge_ca_env(*iocs), directory=directory)
        self._daemons.append(daemon)
        daemon.start()
        self.started.add(daemon.pid)
        return daemon

    def stop_daemon(self, daemon: DaemonProcess) -> None:
        """Stop ``daemon``; a daemon that does not stop in time is killed, and the run says so."""
        if daemon.running():
            self.started.update(procstat.descendants(daemon.pid))
        try:
            daemon.stop(DAEMON_STOP_TIMEOUT)
        except TimeoutError as exc:
            self.step(f"daemon stop: {str(exc)[:300]}")
            self.daemon_kills.append(str(daemon.directory.name))

    def daemon(self) -> DaemonProcess:
        """The daemon of the latency and streaming parts, in front of both IOCs."""
        if self._daemon is None:
            self._daemon = self.start_daemon([self.zoo(), self.rsrv()], "main")
        return self._daemon

    def hub_pids(self) -> list[int]:
        """The main daemon and every process below it."""
        daemon = self.daemon()
        pids = [daemon.pid, *procstat.descendants(daemon.pid)]
        self.started.update(pids)
        return pids

    def close(self) -> list[int]:
        """Stop every daemon (the IOCs stop with the ExitStack); the pids still alive."""
        for daemon in self._daemons:
            self.stop_daemon(daemon)
        for control in self.controls:
            self.started.update(control.pids)
        self.stack.close()
        deadline = time.monotonic() + 5.0  # actors notice their daemon's exit within a beat
        while True:
            alive = sorted(pid for pid in self.started if procstat.alive(pid))
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


# --- the parts ---------------------------------------------------------------------------------


def part_latency(bench: Bench) -> tuple[list[dict], Any]:
    zoo, rsrv = bench.zoo(), bench.rsrv()
    daemon = bench.daemon()
    fresh_rsrv = tuple(rsrv.pv(f"scale:s{bench.probe_base + i:05d}") for i in range(40, SPARE_PVS))
    targets = [
        latency.Target("caproto", zoo.pv("motor"), zoo.pv("ro"), tuple(zoo.pv(s) for s in ZOO_FRESH)),
        latency.Target("rsrv", rsrv.pv("motor"), rsrv.pv("temp"), fresh_rsrv),
    ]
    samples = latency.run(bench, targets, daemon.address, bench.client_env(zoo, rsrv))
    return latency.rows(samples), samples


def part_scale(bench: Bench) -> tuple[list[dict], Any]:
    return scale.run(bench, bench.rsrv())


def _streaming(bench: Bench, which: Any) -> tuple[list[dict], Any]:
    rsrv = bench.rsrv()
    daemon = bench.daemon()
    return which(bench, rsrv, daemon.address, bench.client_env(rsrv))


def part_fanout(bench: Bench) -> tuple[list[dict], Any]:
    return _streaming(bench, streams.fanout)


def part_throughput(bench: Bench) -> tuple[list[dict], Any]:
    # Many PVs per client only if the daemon pools them into few actor processes (see scale).
    rsrv, daemon = bench.rsrv(), bench.daemon()
    names = [rsrv.pv(f"scale:s{bench.probe_base + 20 + i:05d}") for i in range(scale.PROBE)]
    bench.extra_pvs = bench.plan.throughput_extra if scale.pooled(daemon, names) else 0
    if not bench.extra_pvs:
        bench.step("throughput: one actor process per PV: subscribers watch fast only")
        return _streaming(bench, streams.throughput)
    # The extra PVs are served before the subscribers start, a batch at a time (a daemon asked
    # for many new PVs at once loses some), by a client that holds them for the whole part.
    from pvhub.client import Hub

    bench.step(f"throughput: serving {bench.extra_pvs} PVs counting at 1 Hz")
    holder = Hub(daemon.address, name="bench-throughput-holder")
    keep: list[Any] = []
    try:
        extra = [rsrv.pv(f"scale:c{i:05d}") for i in range(bench.extra_pvs)]
        scale.connect(holder, extra, keep, scale.CONNECT_BUDGET, scale.MemoryGuard(daemon), scale.FILL_BATCH)
        return _streaming(bench, streams.throughput)
    finally:
        holder.close()


def part_waveform(bench: Bench) -> tuple[list[dict], Any]:
    return _streaming(bench, streams.waveform)


RUNNERS = {"latency": part_latency, "scale": part_scale, "fanout": part_fanout,
           "throughput": part_throughput, "waveform": part_waveform}  # fmt: skip


# --- the report --------------------------------------------------------------------------------


def value_text(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return duration(value)
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "B":
        return f"{value / 1e6:,.0f} MB"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:,.1f} {unit}"


def report(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        unit = row.get("unit", "")
        reference = row.get("reference")
        ref = f"{value_text(reference, unit)} ({row.get('reference_is', '')})" if reference is not None else ""
        p99 = f"{value_text(row['p99'], unit)} / {value_text(row['reference_p99'], unit)}" if "reference_p99" in row else ""
        ratio = row.get("ratio")
        verdict = {True: "PASS", False: "FAIL", None: ""}[row.get("pass")]
        lines.append([
            row["part"], row["what"], row.get("text") or value_text(row.get("pvhub"), unit), p99, ref,
            f"{ratio:.2f}×" if ratio is not None and not math.isnan(ratio) else "",
            row.get("target", ""), verdict,
        ])  # fmt: skip
    return table(["part", "what", "pvhub (median)", "p99 pvhub / ref", "reference (median)",
                  "pvhub / ref", "target", "verdict"], lines)  # fmt: skip


def machine() -> dict[str, str]:
    import caproto
    import ophyd
    import zmq

    return {
        "nproc": str(os.cpu_count()), "cpu": procstat.cpu_model(), "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": f"caproto {caproto.__version__}, ophyd {ophyd.__version__}, pyzmq {zmq.__version__}",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer samples and clients (a few minutes)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args(argv)
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    parts = [p for p in PARTS if p in args.parts] or list(PARTS)
    plan = QUICK if args.quick else FULL
    # Rule 1: until an IOC is started, Channel Access from this process reaches nowhere.
    os.environ.update({"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "127.0.0.1:1"})
    import structlog

    # pvhub's client logs through structlog, to stdout unless told otherwise: keep the table clean.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))

    began = time.monotonic()
    info = {**machine(), "load average at start": procstat.load_average()}
    rows: list[dict] = []
    raw: dict[str, Any] = {}
    failed: dict[str, str] = {}
    with ExitStack() as stack:
        bench = Bench(plan, stack)
        try:
            for part in parts:
                t0 = time.monotonic()
                try:
                    part_rows, raw[part] = RUNNERS[part](bench)
                    rows += part_rows
                except Exception as exc:  # Rule 4: the part failed, the run goes on
                    failed[part] = f"{type(exc).__name__}: {exc}"
                    bench.step(f"{part} failed:\n{traceback.format_exc()}")
                    rows.append({"part": part, "what": f"failed: {type(exc).__name__}: {str(exc)[:120]}",
                                 "pvhub": None, "pass": False})  # fmt: skip
                bench.step(f"{part}: {time.monotonic() - t0:.0f} s")
        finally:
            leftovers = bench.close()
            if failed:  # the daemons' and subscribers' logs say why: kept
                bench.step(f"logs of this run (a part failed): {bench.logdir}")
            else:
                for path in sorted(bench.logdir.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()
                bench.logdir.rmdir()
    info["load average at end"] = procstat.load_average()
    info["run time"] = f"{time.monotonic() - began:.0f} s ({'--quick' if args.quick else 'full'}; {', '.join(parts)})"
    info["IOC restarts"] = "; ".join(r for c in bench.controls for r in c.restarts) or "none"
    info["daemons killed at stop"] = ", ".join(bench.daemon_kills) or "none"
    info["processes left behind"] = ", ".join(map(str, leftovers)) or "none"
    print("## Machine\n\n" + table(["", ""], [[k, v] for k, v in info.items()]))
    print("\n## Results\n\n" + report(rows))
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": info, "plan": asdict(plan), "rows": rows, "raw": raw, "failed": failed},
            indent=1, default=str,
        ))  # fmt: skip
    return 1 if leftovers else 0


if __name__ == "__main__":
    raise SystemExit(main())
