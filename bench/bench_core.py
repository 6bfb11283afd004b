"""pvhub against direct Channel Access, side by side, in one run against one IOC.

    python bench/bench_core.py [--quick] [--ioc-nodelay] [--json FILE]   # from the repository root

It starts the zoo IOC (``tests/iocs/zoo.py``) and ``pvhub serve`` on loopback, then measures
pvhub's client against ophyd (caproto control layer) and caproto's threading client:

1. put with completion round trip  2. read  3. time to the first value of a PV
4. monitor fan-out to 1..16 subscriber processes (delivery, loss, CPU)  5. monitor latency

and prints markdown tables with pvhub / direct ratios. See ``bench/README.md``.

Rule 1: loopback only; the IOC and the daemons are this run's own, on ports picked at run time.
Rule 2: every loop is bounded by a count and by a time budget; every wait has a deadline.
Rule 3: in parts 1-2 the clients take turns in rounds (pvhub, ophyd, caproto, pvhub, ...),
and in part 3 the order rotates from one PV to the next, so that a slow spell of a shared
machine does not land on one client only.
Rule 4: part 4's direct runs come before any pvhub client touches ``fast``, so the IOC then
serves the direct monitors only. The CPU counted for pvhub is that of the daemon (its broker
and readings forwarder) and of the actor that owns ``fast``; the idle actors that part 3
started count among the other processes.
Rule 5: everything started here is stopped in ``finally``; the run ends by checking that no
process it started (IOC, daemons, actors, subscribers) is still alive, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import procstat
import report
import structlog
from fanout import IOCControl, Subscribers, Window, measure
from stats import Timing, number, table

from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC

# The IOC runs as ``python -m tests.iocs.zoo`` from here. Not resolved: a checkout that links
# bench/ in from elsewhere benchmarks its own tree.
REPO_ROOT = Path(__file__).absolute().parent.parent
TIMEOUT = 10.0  # any single put, read or connection
# PVs that no other part touches, so that part 3 meets each of them for the first time.
NEW_PVS = ("x", "count", "wave", "text", "mode", "slow_delay", "slow", "ro", "reject", "chars", "dt")


@dataclass(frozen=True)
class Plan:
    rounds: int  # parts 1-2: turns per client
    puts: int  # per client, all rounds together
    put_budget: float  # seconds per client, all rounds together
    network_reads: int
    cached_reads: int
    read_budget: float
    new_pvs: int  # part 3: PVs each client connects to for the first time
    fresh_clients: int  # part 3: new clients of a PV already served
    actor_starts: int  # part 3: times Python is started with an actor's imports
    rates: tuple[float, ...]  # part 4: fast_rate values, Hz
    fan_out: tuple[int, ...]  # part 4: subscriber processes
    window: float  # part 4: seconds per measurement window
    tail: float  # seconds after a window in which its updates still count as delivered
    settle: float  # seconds after a rate change before a window
    latency_rate: float  # part 5: a rate at which caproto's server does not batch
    latency_window: float


FULL = Plan(
    rounds=3, puts=600, put_budget=5.0, network_reads=3000, cached_reads=30000, read_budget=4.0,
    new_pvs=len(NEW_PVS), fresh_clients=8, actor_starts=3, rates=(1000.0, 5000.0), fan_out=(1, 4, 16),
    window=4.0, tail=1.5, settle=1.0, latency_rate=50.0, latency_window=4.0,
)  # fmt: skip
QUICK = Plan(
    rounds=2, puts=150, put_budget=1.5, network_reads=600, cached_reads=5000, read_budget=1.0,
    new_pvs=4, fresh_clients=3, actor_starts=2, rates=(1000.0,), fan_out=(1, 4),
    window=2.0, tail=1.2, settle=0.4, latency_rate=50.0, latency_window=1.5,
)  # fmt: skip


# --- parts 1-3: one client call at a time ------------------------------------------------------


def timed(call: Callable[[int], Any], n: int, budget: float, start: int = 0) -> list[float]:
    """Durations of ``call(i)`` for up to ``n`` calls or ``budget`` seconds."""
    samples = []
    deadline = time.monotonic() + budget
    for i in range(start, start + n):
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return samples


def timed_setup(setup: Callable[[int], Callable[[], Any]], n: int, budget: float) -> list[float]:
    """Durations of ``setup(i)``, which returns its own teardown (run, but not timed)."""
    samples = []
    deadline = time.monotonic() + budget
    for i in range(n):
        t0 = time.perf_counter()
        teardown = setup(i)
        samples.append(time.perf_counter() - t0)
        teardown()
        if time.monotonic() > deadline:
            break
    return samples


def in_rounds(calls: dict[str, tuple[Callable[[int], Any], int]], budget: float, rounds: int,
              warmup: int = 10) -> dict[str, Timing]:
    """Each client's calls, taking turns for ``rounds`` (see Rule 3)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call, _ in calls.values():
        timed(call, warmup, budget / rounds)
    for _ in range(rounds):
        for name, (call, n) in calls.items():
            samples[name] += timed(call, n // rounds, budget / rounds, start=len(samples[name]))
    return {name: Timing.of(s) for name, s in samples.items()}


def put_value(i: int) -> float:
    return 1.0 + (i % 50) * 0.1  # inside motor's limits, and a change on every put


def first_values(pvs: list[str], connect: dict[str, Callable[[str], Any]]) -> dict[str, list[float]]:
    """Seconds from nothing to a PV's first value, each client on each PV once, the order of
    the clients rotating from one PV to the next."""
    samples: dict[str, list[float]] = {name: [] for name in connect}
    names = list(connect)
    for k, pv in enumerate(pvs):
        for name in names[k % len(names):] + names[: k % len(names)]:
            t0 = time.perf_counter()
            connect[name](pv)
            samples[name].append(time.perf_counter() - t0)
    return samples


# --- the run -----------------------------------------------------------------------------------


class Run:
    def __init__(self, plan: Plan, stack: ExitStack) -> None:
        self.plan = plan
        self.stack = stack
        self.started: set[int] = set()  # every pid this run caused to exist (Rule 5)
        self.results: dict[str, dict[str, Timing]] = {}
        self.keep: list[Any] = []  # signals and channels that must outlive their part
        self.logdir = Path(tempfile.mkdtemp(prefix="pvhub-bench-"))
        self.control: IOCControl | None = None

    # -- processes

    def start_ioc(self, module: str) -> SimulatedIOC:
        prefix = f"bench{uuid.uuid4().hex[:6]}:"
        ioc = SimulatedIOC(module, prefix=prefix, cwd=REPO_ROOT, ready_pv="dt")
        self.stack.enter_context(ioc)
        self.started.add(ioc.pid)
        return ioc

    def daemon_pid(self, daemon: DaemonProcess) -> int:
        """The pid of ``daemon`` (a child of ours), found in /proc by its address."""
        pid = procstat.find_child(os.getpid(), "pvhub", "serve", daemon.address)
        if pid is None:
            raise RuntimeError(f"cannot find the pid of the daemon at {daemon.address}")
        self.started.add(pid)
        return pid

    def hub_pids(self, daemon_pid: int, pv: str | None = None) -> list[int]:
        """The daemon and its actors (only the one that owns ``pv``, if given)."""
        actors = procstat.children(daemon_pid)
        self.started.update(actors)
        if pv is not None:
            actors = [pid for pid in actors if pv in procstat.command_line(pid).split()]
        return [daemon_pid, *actors]

    def leftovers(self) -> list[int]:
        if self.control is not None:
            self.started.update(self.control.pids)
        deadline = time.monotonic() + 5.0  # actors notice their daemon's exit within a beat
        while True:
            alive = sorted(pid for pid in self.started if procstat.alive(pid))
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    # -- parts 1-3

    def request_parts(self, ioc: SimulatedIOC, address: str, ctx: Any) -> None:
        from caproto.threading.client import Context
        from ophyd.signal import EpicsSignal as OphydSignal
        from ophyd.signal import EpicsSignalRO as OphydSignalRO
        from pvhub.client import EpicsSignal, EpicsSignalRO, Hub

        plan = self.plan
        motor = ioc.pv("motor")
        hub_motor = EpicsSignal(motor, name="motor", address=address)
        hub_motor.wait_for_connection(timeout=TIMEOUT)
        ophyd_motor = OphydSignal(motor, name="motor", put_complete=True)
        ophyd_motor.wait_for_connection(timeout=TIMEOUT)
        (ca_motor,) = ctx.get_pvs(motor, timeout=TIMEOUT)
        ca_motor.wait_for_connection(timeout=TIMEOUT)
        # A client of its own that monitors motor while it writes it, as a pvhub actor does.
        monitoring = Context()
        self.stack.callback(monitoring.disconnect)
        (ca_watched,) = monitoring.get_pvs(motor, timeout=TIMEOUT)
        ca_watched.wait_for_connection(timeout=TIMEOUT)
        subscription = ca_watched.subscribe(data_type="time")

        def ignore(sub: Any, response: Any) -> None:
            pass

        subscription.add_callback(ignore)
        self.keep += [hub_motor, ophyd_motor, ca_motor, ca_watched, subscription, ignore]

        step("1. put with completion")
        self.results["put"] = in_rounds({
            "pvhub": (lambda i: hub_motor.set(put_value(i)).wait(timeout=TIMEOUT), plan.puts),
            "ophyd": (lambda i: ophyd_motor.set(put_value(i)).wait(timeout=TIMEOUT), plan.puts),
            "caproto": (lambda i: ca_motor.write(put_value(i), wait=True, timeout=TIMEOUT), plan.puts),
            "caproto_monitored": (lambda i: ca_watched.write(put_value(i), wait=True, timeout=TIMEOUT), plan.puts),
        }, plan.put_budget, plan.rounds)  # fmt: skip
        subscription.clear()

        step("2. read")
        ophyd_ro = OphydSignalRO(motor, name="motor_ro")
        ophyd_ro.wait_for_connection(timeout=TIMEOUT)
        ophyd_mon = OphydSignalRO(motor, name="motor_mon", auto_monitor=True)
        ophyd_mon.wait_for_connection(timeout=TIMEOUT)
        ophyd_mon.get()
        self.keep += [ophyd_ro, ophyd_mon]
        self.results["read"] = in_rounds({
            "pvhub": (lambda i: hub_motor.read(), plan.cached_reads),
            "ophyd": (lambda i: ophyd_ro.read(), plan.network_reads),
            "caproto": (lambda i: ca_motor.read(data_type="time", timeout=TIMEOUT), plan.network_reads),
            "ophyd_monitored": (lambda i: ophyd_mon.read(), plan.cached_reads),
        }, plan.read_budget, plan.rounds)  # fmt: skip

        step("3. first connection")

        def pvhub_first(pv: str) -> None:
            signal = EpicsSignalRO(pv, name="first", address=address)
            signal.wait_for_connection(timeout=TIMEOUT)
            signal.get()
            self.keep.append(signal)

        def ophyd_first(pv: str) -> None:
            signal = OphydSignalRO(pv, name="first")
            signal.wait_for_connection(timeout=TIMEOUT)
            signal.get()
            self.keep.append(signal)

        def caproto_first(pv: str) -> None:
            (channel,) = ctx.get_pvs(pv, timeout=TIMEOUT)
            channel.wait_for_connection(timeout=TIMEOUT)
            channel.read(data_type="time", timeout=TIMEOUT)
            self.keep.append(channel)

        pvs = [ioc.pv(suffix) for suffix in NEW_PVS[: plan.new_pvs]]
        samples = first_values(pvs, {"pvhub": pvhub_first, "ophyd": ophyd_first, "caproto": caproto_first})

        # What part of an actor's start is Python starting and importing, before any CA.
        def actor_start(i: int) -> None:
            subprocess.run([sys.executable, "-c", "import pvhub.actors.loop"], check=True, timeout=30)

        samples["actor_start"] = timed(actor_start, plan.actor_starts, 10.0)

        # A new client of a PV that is already served: a new Hub (what a new pvhub client
        # process pays, without Python's own start-up) against a new caproto Context.
        def pvhub_fresh(i: int) -> Callable[[], Any]:
            hub = Hub(address, name=f"bench-fresh-{i}")
            signal = EpicsSignalRO(motor, name="fresh", hub=hub)
            signal.wait_for_connection(timeout=TIMEOUT)
            signal.get()
            return hub.close

        def caproto_fresh(i: int) -> Callable[[], Any]:
            context = Context()
            (channel,) = context.get_pvs(motor, timeout=TIMEOUT)
            channel.wait_for_connection(timeout=TIMEOUT)
            channel.read(data_type="time", timeout=TIMEOUT)
            return context.disconnect

        samples["pvhub_fresh"] = timed_setup(pvhub_fresh, plan.fresh_clients, 20.0)
        samples["caproto_fresh"] = timed_setup(caproto_fresh, plan.fresh_clients, 20.0)
        self.results["connect"] = {name: Timing.of(s) for name, s in samples.items()}

    # -- parts 4-5

    def fan_out(self, mode: str, ioc: SimulatedIOC, control: IOCControl, env: dict[str, str],
                hub_pids: Callable[[], list[int]]) -> list[Window]:
        plan = self.plan
        windows = []
        with open(self.logdir / f"subscribers-{mode}.log", "a") as stderr:
            for n in plan.fan_out:
                control.set_rate(0)
                step(f"4. fan-out: {n} {mode} subscriber(s)")
                subscribers = Subscribers(mode, ioc.pv("fast"), n, env, stderr)
                self.started.update(subscribers.pids)
                hz = 0.0
                try:
                    subscribers.wait_ready()
                    rates = ([plan.latency_rate] if n == 1 else []) + list(plan.rates)
                    for hz in rates:
                        control.set_rate(hz)
                        time.sleep(plan.settle)
                        seconds = plan.latency_window if hz == plan.latency_rate else plan.window
                        window = measure(subscribers, control, hub_pids(), hz, seconds, plan.tail)
                        windows.append(window)
                        step(f"   {hz:g} Hz: {number(window.received_per_s, 0)} updates/s per client, "
                             f"{number(window.lost_percent, 2)} % lost")  # fmt: skip
                except BaseException:
                    step(f"subscriber log ({mode}):\n{_tail(self.logdir / f'subscribers-{mode}.log')}")
                    raise
                finally:
                    subscribers.close()  # first: an IOC swamped by N monitors may not answer
                    control.quiet(after=f"{n} {mode} subscribers at {hz:g} Hz")
        return windows


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_all(run: Run, stack: ExitStack, ioc_module: str) -> tuple[list[Window], list[Window]]:
    ioc = run.start_ioc(ioc_module)
    # ophyd and the caproto client read the EPICS environment once, at their first use.
    os.environ.update(ioc.ca_env())
    import ophyd

    ophyd.set_cl("caproto")
    from caproto.threading.client import Context
    from pvhub.client import close_hubs

    ctx = Context()
    stack.callback(ctx.disconnect)
    control = IOCControl(ioc)
    run.control = control
    control.set_rate(0)  # parts 1-3 want a quiet IOC

    step("starting the daemon")
    with DaemonProcess(env=ioc.ca_env()) as daemon:
        daemon_pid = run.daemon_pid(daemon)
        try:
            run.request_parts(ioc, daemon.address, ctx)
        finally:
            close_hubs()
            run.keep.clear()
            run.hub_pids(daemon_pid)
        direct = run.fan_out("caproto", ioc, control, dict(os.environ), lambda: [])
        env = {**os.environ, "PVHUB_ADDRESS": daemon.address}
        hub = run.fan_out("pvhub", ioc, control, env, lambda: run.hub_pids(daemon_pid, ioc.pv("fast")))
        step("stopping the daemon")
    return direct, hub


def machine() -> dict[str, str]:
    import caproto
    import numpy
    import ophyd
    import zmq

    import pvhub

    return {
        "nproc": str(os.cpu_count()),
        "cpu": procstat.cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": f"pvhub {getattr(pvhub, '__version__', '?')}, caproto {caproto.__version__}, "
                    f"ophyd {ophyd.__version__}, pyzmq {zmq.__version__}, numpy {numpy.__version__}",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, one rate, N = 1 and 4 (< 1 min)")
    parser.add_argument("--ioc-nodelay", action="store_true",
                        help="run the zoo with TCP_NODELAY on its sockets, as EPICS base's rsrv has "
                             "(bench/zoo_nodelay.py)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    ioc_module = "bench.zoo_nodelay" if args.ioc_nodelay else "tests.iocs.zoo"
    # pvhub's client logs through structlog, to stdout unless told otherwise: keep the tables clean.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))

    began = time.monotonic()
    info = machine()
    info["IOC"] = f"`python -m {ioc_module}` (caproto asyncio server)"
    info["load average at start"] = procstat.load_average()
    with ExitStack() as stack:
        run = Run(plan, stack)
        try:
            direct, hub = run_all(run, stack, ioc_module)
        finally:
            stack.close()
            leftovers = run.leftovers()
            if leftovers:
                step(f"processes this run started are still alive: {leftovers}")
            for log in run.logdir.iterdir():
                log.unlink()
            run.logdir.rmdir()
    info["load average at end"] = procstat.load_average()
    info["run time"] = f"{time.monotonic() - began:.0f} s ({'--quick' if args.quick else 'full'})"
    info["IOC restarts"] = "; ".join(run.control.restarts if run.control else []) or "none"
    info["processes left behind"] = ", ".join(map(str, leftovers)) or "none"

    sections = [
        "## Machine\n\n" + table(["", ""], [[k, v] for k, v in info.items()]),
        "## 1. Put with completion (motor)\n\n" + report.timing_table("put", run.results["put"]),
        "## 2. Read (motor)\n\n" + report.timing_table("read", run.results["read"]),
        "## 3. Time to the first value\n\n" + report.timing_table("connect", run.results["connect"]),
        "## 4. Monitor fan-out (fast), direct (d) / pvhub (p)\n\n"
        + report.fan_out_tables(direct, hub, plan.latency_rate),
        "## 5. Monitor latency, IOC timestamp to callback, 1 subscriber\n\n" + report.latency_table(direct, hub),
        "## pvhub / direct\n\n"
        + report.summary_table(run.results, direct, hub, plan.rates, plan.fan_out, plan.latency_rate),
    ]  # fmt: skip
    print("\n\n".join(sections))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info,
            "plan": asdict(plan),
            **{part: {name: asdict(t) for name, t in timings.items()} for part, timings in run.results.items()},
            "fan_out": [w.summary() for w in direct + hub],
        }, indent=1))  # fmt: skip
    return 1 if leftovers else 0


if __name__ == "__main__":
    raise SystemExit(main())
