"""A soak test: a daemon, two IOCs and subscriber processes, with faults injected for a while.

    python bench/soak.py --duration 600 --clients 4 --pvs 6 --seed 1    # from the repository root

It starts two zoo IOCs (``tests/iocs/zoo.py``) with their ``fast`` counters at ``--fast-rate``
Hz, one ``pvhub serve`` for both, and ``--clients`` subscriber processes (this file, run with
``--client``), each watching ``--pvs`` PVs: both ``fast`` counters and a rotating choice of
others. For ``--duration`` seconds it then injects faults, one at a time, at seeded random
intervals: SIGKILL of an actor, SIGSTOP of an actor for ``FREEZE_S`` (the daemon should kill
and replace it meanwhile), and a restart of an IOC (``stop()``, a few seconds, ``start()``).
After each fault it waits until everything has settled (every PV connected in the daemon's
status, every client connected to every PV) before the next quiet period starts. It samples
the daemon's memory, open files and children, and ends with a report (see ``docs/soak.md``).

Rule 1: loopback only; the IOCs and the daemon are this run's own, on ports picked at run
time, with a random PV prefix.
Rule 2: bounded. Every wait has a deadline; clients exit when their stdin closes (the parent
is gone) or after their own lifetime limit, whatever happens.
Rule 3: a counter step other than +1 is a loss. The client says whether it spans a
disconnection or an actor change it saw (``explained``); the parent says whether it falls
inside a fault window (from the fault's start to ``WINDOW_TAIL_S`` after everything settled).
A step outside every window is a finding, explained or not.
Rule 4: nothing started here outlives the run: the end checks, through /proc, every pid it
started or saw (IOCs, daemon, actors, clients) and reports any still alive.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pvhub.errors import PvhubError

REPO_ROOT = Path(__file__).absolute().parent.parent
COUNTER_SUFFIX = "fast"
# What a client watches besides the two counters, in order; each client starts at its own
# offset so that together they cover many kinds of PV.
OTHER_SUFFIXES = ("x", "motor", "dt", "count", "mode", "text", "wave")
FREEZE_S = 5.0
IOC_DOWN_S = (2.0, 6.0)
WINDOW_TAIL_S = 3.0  # caproto's server may hold monitor updates up to 1 s under load
SETTLE_TIMEOUT_S = 90.0
FINAL_QUIET_S = 10.0
CONTROL_TIMEOUT_S = 30.0
CLIENT_READY_TIMEOUT_S = 90.0
MAX_EVENTS_PER_REPORT = 200


# ================================================================================================
# The client process
# ================================================================================================


class Watch:
    """One PV seen by one client: counts, and the events the parent must judge."""

    def __init__(self, signal_: Any, counter: bool) -> None:
        self.signal = signal_
        self.pv = signal_.pvname
        self.counter = counter
        self.lock = threading.Lock()
        self.updates = 0
        self.last: Any = None
        self.last_epoch: int | None = None
        self.last_ts: float | None = None
        self.disrupted = False
        self.stale = 0
        self.connected: bool | None = None
        self.disconnects = 0
        self.steps = 0
        self.lost = 0
        self.repeats = 0
        self.backwards = 0
        self.gaps_seen = 0
        self.missed_seen = 0
        self.events: list[dict] = []

    # Runs on the hub's callback thread.
    def on_value(self, value: Any, timestamp: float | None = None, **kwargs: Any) -> None:
        now = time.time()
        epoch = self.signal._read_channel.epoch  # a private attribute: this is a test tool
        with self.lock:
            self.updates += 1
            # A disruption (a meta event, a new actor) explains steps until the counter runs
            # on by +1 again: a reconnection may bring more than one odd value.
            if epoch != self.last_epoch and self.last_epoch is not None:
                self.disrupted = True
            if timestamp is not None and self.last_ts is not None and timestamp <= self.last_ts:
                # Not newer than what we had: an old reading delivered again as an update.
                self.stale += 1
                self._event(now, "stale", value=_plain(value), ts=timestamp, last_ts=self.last_ts,
                            explained=self.disrupted)
            if self.counter:
                value = int(value)
                if self.last is not None and value != self.last + 1:
                    step = value - self.last
                    self.steps += 1
                    if step > 1:
                        self.lost += step - 1
                    elif step == 0:
                        self.repeats += 1
                    else:
                        self.backwards += 1
                    self._event(now, "step", old=self.last, new=value, ts=timestamp,
                                explained=self.disrupted, epoch_changed=epoch != self.last_epoch)
                elif self.last is not None:
                    self.disrupted = False
            else:
                self.disrupted = False
            self.last = value if self.counter else _plain(value)
            self.last_epoch = epoch
            if timestamp is not None:
                self.last_ts = max(timestamp, self.last_ts or timestamp)
            gaps, missed = self.signal.update_gaps, self.signal.missed_updates
            if gaps != self.gaps_seen:
                self._event(now, "gap", gaps=gaps - self.gaps_seen, missed=missed - self.missed_seen)
                self.gaps_seen, self.missed_seen = gaps, missed

    def on_meta(self, connected: bool | None = None, **kwargs: Any) -> None:
        now = time.time()
        with self.lock:
            self.disrupted = True
            if connected is False and self.connected:
                self.disconnects += 1
                self._event(now, "disconnect")
            elif connected and self.connected is False:
                self._event(now, "reconnect")
            self.connected = bool(connected)

    def _event(self, t: float, kind: str, **fields: Any) -> None:
        self.events.append({"t": t, "pv": self.pv, "kind": kind, **fields})

    def report(self) -> tuple[dict, list[dict]]:
        with self.lock:
            events, self.events = self.events[:MAX_EVENTS_PER_REPORT], self.events[MAX_EVENTS_PER_REPORT:]
            return {
                "updates": self.updates,
                "last": self.last,
                "connected": self.signal.connected,
                "meta_connected": self.connected,
                "disconnects": self.disconnects,
                "steps": self.steps,
                "lost": self.lost,
                "repeats": self.repeats,
                "backwards": self.backwards,
                "stale": self.stale,
                "gaps": self.signal.update_gaps,
                "missed": self.signal.missed_updates,
                "epoch": self.last_epoch,
            }, events


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) > 4:
        value = value[:4] + ["..."]
    return value


def run_client(args: argparse.Namespace) -> int:
    """Subscribe to ``args.pv``; print one JSON line every ``args.interval`` s; obey stdin."""
    # The client library's warnings (pv_lost, readings_missed) go to stderr, which the parent
    # keeps in a file; stdout is the line protocol.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.Timer(args.lifetime, os._exit, args=(3,)).start()  # Rule 2, whatever happens
    from pvhub.client import EpicsSignalRO, close_hubs, get_hub

    hub = get_hub(args.address)
    watches = []
    for pv in args.pv:
        sig = EpicsSignalRO(pv, name=pv.replace(":", "_"), address=args.address)
        watch = Watch(sig, counter=pv.endswith(":" + COUNTER_SUFFIX))
        sig.subscribe(watch.on_meta, event_type="meta")
        sig.subscribe(watch.on_value)
        watches.append(watch)
    for watch in watches:
        watch.signal.wait_for_connection(timeout=CLIENT_READY_TIMEOUT_S)
    _emit({"type": "ready", "t": time.time(), "pid": os.getpid()})

    def report(kind: str) -> None:
        pvs, events = {}, []
        for watch in watches:
            pvs[watch.pv], new = watch.report()
            events.extend(new)
        _emit({"type": kind, "t": time.time(), "pid": os.getpid(), "hub_losses": hub.losses,
               "rss_kb": _vm_rss(os.getpid()), "pvs": pvs, "events": events})

    next_report = time.monotonic() + args.interval
    while True:
        timeout = max(0.0, next_report - time.monotonic())
        readable, _, _ = select.select([sys.stdin], [], [], timeout)
        if readable:
            line = sys.stdin.readline()
            if not line:  # the parent is gone, or done with us
                break
            if line.strip() == "final":
                report("final")
            continue
        report("report")
        next_report += args.interval
    for watch in watches:
        watch.signal.unsubscribe_all()
    close_hubs()
    sys.stdout.flush()
    os._exit(0)  # the lifetime timer is a non-daemon thread: do not wait for it


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# ================================================================================================
# /proc
# ================================================================================================


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _vm_rss(pid: int) -> int | None:
    value = _proc_status(pid).get("VmRSS")
    return int(value.split()[0]) if value else None


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _state(pid: int) -> str | None:
    """The process state letter (``R``, ``S``, ``T``, ``Z``...), ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        status = _proc_status(int(entry))
        if status.get("PPid", "").strip() == str(parent):
            found.append((int(entry), status.get("State", "?").split()[0]))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}


# ================================================================================================
# The parent: clients, faults, samples, report
# ================================================================================================


class ClientProcess:
    """One ``--client`` subprocess and what it has reported so far."""

    def __init__(self, index: int, address: str, pvs: list[str], interval: float, lifetime: float,
                 workdir: Path) -> None:
        self.index = index
        self.pvs = pvs
        self.stderr_path = workdir / f"client{index}.log"
        self.latest: dict | None = None
        self.final: dict | None = None
        self.events: list[dict] = []
        self.ready = threading.Event()
        self.final_arrived = threading.Event()
        self.bad_lines: list[str] = []
        self.lock = threading.Lock()
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).absolute()), "--client", "--address", address,
                 "--interval", str(interval), "--lifetime", str(lifetime), *pvs],
                cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                text=True, bufsize=1,
            )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, name=f"client{index}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                self.bad_lines.append(line.rstrip()[:200])
                continue
            with self.lock:
                self.events.extend(record.get("events", ()))
                if record["type"] == "ready":
                    self.ready.set()
                elif record["type"] == "report":
                    self.latest = record
                elif record["type"] == "final":
                    self.latest = self.final = record
                    self.final_arrived.set()

    def all_connected_since(self, t: float) -> bool:
        with self.lock:
            latest = self.latest
        return (latest is not None and latest["t"] > t
                and all(pv["connected"] for pv in latest["pvs"].values()))

    def ask_final(self) -> None:
        self.process.stdin.write("final\n")
        self.process.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass
class Fault:
    kind: str
    start: float
    detail: dict = field(default_factory=dict)
    end: float | None = None  # when everything had settled again
    settled: bool = False

    @property
    def window_end(self) -> float:
        return (self.end if self.end is not None else float("inf")) + WINDOW_TAIL_S


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pvhub-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if any(self.workdir.iterdir()):  # an earlier run's logs would be counted with this one's
            raise SystemExit(f"soak: {self.workdir} is not empty; give a new --workdir")
        tag = uuid.uuid4().hex[:6]
        self.prefixes = [f"soak{tag}a:", f"soak{tag}b:"]
        self.iocs: list[Any] = []
        self.daemon: Any = None
        self.clients: list[ClientProcess] = []
        self.faults: list[Fault] = []
        self.samples: list[dict] = []
        self.started_pids: dict[int, str] = {}  # every pid this run started or saw, and what
        self.rate_signals: list[Any] = []
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.t0 = time.time()
        self.fault_phase: tuple[float, float] | None = None
        self.notes: list[str] = []

    # --- output --------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {message}", flush=True)

    # --- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        from pvhub.testing import DaemonProcess
        from pvhub.testing import SimulatedIOC, merge_ca_env

        # The parent's own client library logs (pv_lost while it puts fast_rate) go to a file.
        handler = logging.FileHandler(self.workdir / "parent-client.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)

        for prefix in self.prefixes:
            ioc = SimulatedIOC("tests.iocs.zoo", prefix=prefix, cwd=REPO_ROOT)
            self.iocs.append(ioc)
            ioc.start()
            self.started_pids[ioc.pid] = f"ioc {prefix}"
        self.say(f"IOCs {self.prefixes} on ports {[ioc.port for ioc in self.iocs]}")
        (self.workdir / "daemon").mkdir(exist_ok=True)
        self.daemon = DaemonProcess(env=merge_ca_env(*self.iocs), directory=self.workdir / "daemon")
        self.daemon.start()
        self.started_pids[self.daemon.pid] = "daemon"
        self.say(f"daemon pid {self.daemon.pid} at {self.daemon.address}, log {self.daemon.log_path}")

        from pvhub.client import EpicsSignal

        for ioc in self.iocs:
            self.rate_signals.append(EpicsSignal(ioc.pv("fast_rate"), name="fast_rate",
                                                 address=self.daemon.address))
        for ioc in self.iocs:
            self.set_fast_rate(ioc, self.args.fast_rate)

        lifetime = self.args.duration + 600.0
        for index in range(self.args.clients):
            pvs = self.client_pvs(index)
            self.clients.append(ClientProcess(index, self.daemon.address, pvs, self.args.report_interval,
                                              lifetime, self.workdir))
            self.started_pids[self.clients[-1].pid] = f"client{index}"
        deadline = time.monotonic() + CLIENT_READY_TIMEOUT_S
        for client in self.clients:
            if not client.ready.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client {client.index} not ready in {CLIENT_READY_TIMEOUT_S} s; "
                                   f"see {client.stderr_path}")
        self.say(f"{len(self.clients)} clients ready, each on {self.args.pvs} PVs")
        self._sampler = threading.Thread(target=self._sample_loop, name="sampler", daemon=True)
        self._sampler.start()

    def client_pvs(self, index: int) -> list[str]:
        counters = [ioc.pv(COUNTER_SUFFIX) for ioc in self.iocs]
        others = [ioc.pv(suffix) for suffix in OTHER_SUFFIXES for ioc in self.iocs]
        count = max(0, self.args.pvs - len(counters))
        start = (2 * index) % len(others)
        chosen = [others[(start + i) % len(others)] for i in range(min(count, len(others)))]
        return counters[: self.args.pvs] + chosen

    def hub(self) -> Any:
        from pvhub.client import get_hub

        return get_hub(self.daemon.address)

    def status(self, timeout: float = 5.0) -> dict:
        from pvhub import protocol as p

        return self.hub().call(lambda rid: p.StatusRequest(id=rid), timeout=timeout).status

    def set_fast_rate(self, ioc: Any, rate: float) -> float:
        """Put ``fast_rate`` through the hub, retrying while the IOC or its actor come back;
        returns how long it took."""
        sig = self.rate_signals[self.iocs.index(ioc)]
        t0 = time.monotonic()
        deadline = t0 + CONTROL_TIMEOUT_S
        while True:
            try:
                sig.set(rate).wait(timeout=5.0)
                return time.monotonic() - t0
            except (PvhubError, TimeoutError) as exc:  # the IOC or the actor is coming back
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not set {ioc.pv('fast_rate')} to {rate}: {exc!r}") from exc
                time.sleep(0.2)

    # --- sampling ------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while not self._stop_sampling.wait(self.args.sample_interval):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 - keep sampling; say what went wrong once
                note = f"sample failed: {exc!r}"
                if note not in self.notes:
                    self.notes.append(note)

    def sample(self) -> dict:
        pid = self.daemon.pid
        children = _children(pid)
        actor_rss = sum(_vm_rss(child) or 0 for child, state in children if state != "Z")
        sample = {
            "t": time.time(),
            "rss_kb": _vm_rss(pid),
            "fds": _fd_count(pid),
            "threads": int(_proc_status(pid).get("Threads", "0")),
            "children": len(children),
            "zombies": sum(1 for _, state in children if state == "Z"),
            "zombie_pids": [child for child, state in children if state == "Z"],
            "actors_rss_kb": actor_rss,
        }
        for child, _ in children:
            self.started_pids.setdefault(child, "actor")
        try:
            status = self.status()
        except (PvhubError, TimeoutError):
            sample["status"] = None
        else:
            sample["pvs_connected"] = sum(1 for pv in status["pvs"] if pv["connected"])
            sample["pvs"] = len(status["pvs"])
            sample["clients"] = len(status["clients"])
            for actor in status["actors"]:
                if actor["pid"]:
                    self.started_pids.setdefault(actor["pid"], "actor")
        return sample

    # --- faults --------------------------------------------------------------------------

    def run_faults(self) -> None:
        args = self.args
        time.sleep(args.warmup)
        start = time.time()
        deadline = time.monotonic() + args.duration
        self.say(f"fault phase: {args.duration:.0f} s")
        kinds = ("actor_kill", "actor_freeze", "ioc_restart")
        while True:
            quiet = self.rng.uniform(args.quiet_min, args.quiet_max)
            kind = self.rng.choice(kinds)
            # A fault needs time to happen and settle before the end of the phase.
            if time.monotonic() + quiet + 20.0 > deadline:
                break
            time.sleep(quiet)
            fault = Fault(kind, time.time())
            self.faults.append(fault)
            try:
                getattr(self, kind)(fault)
            except Exception as exc:  # noqa: BLE001 - a failed fault is reported, the run goes on
                fault.detail["error"] = repr(exc)
                self.say(f"{kind} failed: {exc!r}")
            self.settle(fault)
        time.sleep(max(0.0, deadline - time.monotonic()))
        self.fault_phase = (start, time.time())
        self.say(f"fault phase over: {len(self.faults)} faults")

    def _pick_actor(self) -> dict:
        actors = sorted((a for a in self.status()["actors"] if a["pid"] and a["ready"]),
                        key=lambda a: a["actor"])
        if not actors:
            raise RuntimeError("no ready actor to pick")
        return self.rng.choice(actors)

    def actor_kill(self, fault: Fault) -> None:
        actor = self._pick_actor()
        fault.detail.update(actor=actor["actor"], pid=actor["pid"])
        self.started_pids.setdefault(actor["pid"], "actor")
        os.kill(actor["pid"], signal.SIGKILL)
        self.say(f"SIGKILL actor {actor['actor']} pid {actor['pid']}")

    def actor_freeze(self, fault: Fault) -> None:
        actor = self._pick_actor()
        pid = actor["pid"]
        fault.detail.update(actor=actor["actor"], pid=pid)
        self.started_pids.setdefault(pid, "actor")
        os.kill(pid, signal.SIGSTOP)
        self.say(f"SIGSTOP actor {actor['actor']} pid {pid} for {FREEZE_S:.0f} s")
        time.sleep(FREEZE_S)
        # Before SIGCONT: was the frozen process killed and replaced meanwhile?
        fault.detail["killed_while_frozen"] = not _alive(pid)
        new_pid = next((a["pid"] for a in self.status()["actors"] if a["actor"] == actor["actor"]), None)
        fault.detail["replaced_by"] = new_pid if new_pid != pid else None
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.say(f"SIGCONT pid {pid}: killed while frozen {fault.detail['killed_while_frozen']}, "
                 f"replaced by {fault.detail['replaced_by']}")

    def ioc_restart(self, fault: Fault) -> None:
        ioc = self.rng.choice(self.iocs)
        down = self.rng.uniform(*IOC_DOWN_S)
        fault.detail.update(ioc=ioc.prefix, pid=ioc.pid, down_s=round(down, 1))
        ioc.stop()
        self.say(f"IOC {ioc.prefix} stopped (pid {fault.detail['pid']}); restarting in {down:.1f} s")
        time.sleep(down)
        ioc.start()
        self.started_pids[ioc.pid] = f"ioc {ioc.prefix}"
        fault.detail["new_pid"] = ioc.pid
        # A restarted zoo starts again from its initial values: fast runs at 500 Hz.
        fault.detail["rate_restored_s"] = round(self.set_fast_rate(ioc, self.args.fast_rate), 2)
        self.say(f"IOC {ioc.prefix} back (pid {ioc.pid}); fast_rate restored after "
                 f"{fault.detail['rate_restored_s']} s")

    def settle(self, fault: Fault) -> None:
        """Wait until the daemon has every PV connected and every client every PV."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            check = time.time()
            try:
                status = self.status()
            except (PvhubError, TimeoutError):
                time.sleep(0.5)
                continue
            daemon_ok = all(pv["connected"] for pv in status["pvs"]) and all(
                a["ready"] for a in status["actors"])
            if daemon_ok:
                # The clients' next reports must say so too (reports come every interval).
                client_deadline = time.monotonic() + 3 * self.args.report_interval + 1.0
                while time.monotonic() < client_deadline:
                    if all(c.all_connected_since(check) for c in self.clients):
                        fault.end, fault.settled = time.time(), True
                        self.say(f"{fault.kind} settled after {fault.end - fault.start:.1f} s")
                        return
                    time.sleep(0.2)
            time.sleep(0.5)
        fault.end = time.time()
        self.say(f"{fault.kind} did NOT settle within {SETTLE_TIMEOUT_S:.0f} s")

    # --- the end -------------------------------------------------------------------------

    def final_check(self) -> dict:
        """Pause the counters, then compare each client's last counter with the IOC's."""
        time.sleep(FINAL_QUIET_S)
        for ioc in self.iocs:
            self.set_fast_rate(ioc, 0.0)
        time.sleep(3.0)  # caproto's server may hold updates up to 1 s
        ioc_values = {}
        for ioc in self.iocs:
            ioc_values[ioc.pv(COUNTER_SUFFIX)] = int(ioc.read(COUNTER_SUFFIX, timeout=10.0).data[0])
        for client in self.clients:
            client.ask_final()
        for client in self.clients:
            if not client.final_arrived.wait(20.0):
                self.notes.append(f"client {client.index} sent no final report")
        try:
            status = self.status()
        except (PvhubError, TimeoutError) as exc:
            status = None
            self.notes.append(f"final status failed: {exc!r}")
        return {"ioc_fast": ioc_values, "status": status}

    def stop(self) -> None:
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=30)
        for client in self.clients:
            client.stop()
        from pvhub.client import close_hubs

        close_hubs()
        if self.daemon is not None:
            try:
                self.daemon.stop()
            except TimeoutError as exc:
                self.notes.append(f"daemon stop: {exc!r}")
        for ioc in self.iocs:
            ioc.stop()

    def leftovers(self) -> list[str]:
        # Actors the daemon spawned, from its log, besides those the samples saw.
        for record in self.daemon_log_records()[0]:
            if record.get("event") == "actor_spawned" and record.get("actor_pid"):
                self.started_pids.setdefault(record["actor_pid"], "actor")
        time.sleep(0.5)
        alive = [f"{pid} ({what}: {_cmdline(pid)[:120]})" for pid, what in sorted(self.started_pids.items())
                 if _alive(pid)]
        # Anything else that names this run's PV prefixes, e.g. a caproto-repeater.
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in self.started_pids and int(entry) != os.getpid():
                line = _cmdline(int(entry))
                ours = any(prefix in line for prefix in self.prefixes) or "caproto-repeater" in line
                if ours and _alive(int(entry)):
                    alive.append(f"{entry} (unexpected: {line[:120]})")
        return alive

    def daemon_log_records(self) -> tuple[list[dict], list[str], list[str]]:
        """The JSON records of the daemon's log (its own and its actors'), the lines that are
        not JSON, and the lines that hold more than one record (writes of two processes
        interleaved on the shared stderr)."""
        records, other, merged = [], [], []
        decoder = json.JSONDecoder()
        text = self.daemon.log_text() if self.daemon is not None else ""
        for line in text.splitlines():
            found, position = [], 0
            while position < len(line):
                try:
                    record, position = decoder.raw_decode(line, position)
                except ValueError:
                    break
                found.append(record)
            if not found or position < len(line.rstrip()):
                if line.strip():
                    other.append(line)
                continue
            if len(found) > 1:
                merged.append(line)
            records.extend(r for r in found if isinstance(r, dict))
        return records, other, merged


# --- the report ----------------------------------------------------------------------------------


def in_window(t: float, faults: list[Fault]) -> Fault | None:
    for fault in faults:
        if fault.start <= t <= fault.window_end:
            return fault
    return None


def build_report(soak: Soak, final: dict, leftovers: list[str], wall: float) -> dict:
    faults = soak.faults
    by_kind: dict[str, int] = {}
    for fault in faults:
        by_kind[fault.kind] = by_kind.get(fault.kind, 0) + 1
    records, non_json, merged = soak.daemon_log_records()
    events: dict[str, int] = {}
    for record in records:
        events[record.get("event", "?")] = events.get(record.get("event", "?"), 0) + 1
    errors = [r for r in records if r.get("level") in ("error", "critical", "exception") or "exception" in r]
    error_lines = [json.dumps(r)[:400] for r in errors]
    # Non-JSON lines: stdlib logging (caproto) and anything printed by a dying process.
    suspicious = [line for line in non_json
                  if re.search(r"Traceback|Error|ERROR|Exception|CRITICAL", line)]
    warnings_nonjson = [line for line in non_json if " WARNING " in line]

    status = final.get("status") or {}
    restarts_status = sum(a["restarts"] for a in status.get("actors", []))
    spawned = events.get("actor_spawned", 0)
    expected_restarts = by_kind.get("actor_kill", 0) + by_kind.get("actor_freeze", 0)

    clients = []
    for client in soak.clients:
        rec = client.final or client.latest or {"pvs": {}, "hub_losses": None}
        inside = {"steps": 0, "lost": 0, "repeats": 0, "backwards": 0, "unexplained": 0,
                  "gaps": 0, "stale": 0, "disconnects": 0}
        outside_counts = dict(inside)
        outside: list[dict] = []
        stale_by_fault: dict[str, int] = {}
        for event in client.events:
            if event["kind"] == "reconnect":
                continue
            fault = in_window(event["t"], faults)
            counts = inside if fault is not None else outside_counts
            if fault is None:
                outside.append(event)
            if event["kind"] == "step":
                step = event["new"] - event["old"]
                counts["steps"] += 1
                counts["lost"] += max(0, step - 1)
                counts["repeats"] += step == 0
                counts["backwards"] += step < 0
                counts["unexplained"] += not event["explained"]
            elif event["kind"] == "gap":
                counts["gaps"] += event["gaps"]
            elif event["kind"] == "stale":
                counts["stale"] += 1
                kind = fault.kind if fault is not None else "none"
                stale_by_fault[kind] = stale_by_fault.get(kind, 0) + 1
            elif event["kind"] == "disconnect":
                counts["disconnects"] += 1
        pvs = rec["pvs"]
        final_counters = {}
        for pv, ioc_value in final.get("ioc_fast", {}).items():
            mine = pvs.get(pv, {}).get("last")
            final_counters[pv] = {"client": mine, "ioc": ioc_value,
                                  "diff": None if mine is None else ioc_value - mine}
        clients.append({
            "client": client.index,
            "pid": client.pid,
            "pvs": list(pvs),
            "updates": sum(pv["updates"] for pv in pvs.values()),
            "updates_by_pv": {pv: v["updates"] for pv, v in pvs.items()},
            "outside_windows": outside_counts,
            "inside_windows": inside,
            "first_outside_events": outside[:5],
            "update_gaps": sum(pv["gaps"] for pv in pvs.values()),
            "missed_updates": sum(pv["missed"] for pv in pvs.values()),
            "disconnects": sum(pv["disconnects"] for pv in pvs.values()),
            "stale": sum(pv.get("stale", 0) for pv in pvs.values()),
            "stale_by_fault": stale_by_fault,
            "hub_losses": rec.get("hub_losses"),
            "all_connected_at_end": bool(pvs) and all(pv["connected"] for pv in pvs.values()),
            "not_connected_at_end": [pv for pv, v in pvs.items() if not v["connected"]],
            "final_counters": final_counters,
            "rss_kb": rec.get("rss_kb"),
            "bad_lines": client.bad_lines[:3],
            "client_log_warnings": _count_lines(client.stderr_path, " WARNING "),
            "client_log_errors": _count_lines(client.stderr_path, " ERROR "),
        })

    samples = [s for s in soak.samples if s.get("rss_kb") is not None]

    def series(key: str) -> dict:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            return {}
        return {"start": values[0], "max": max(values), "min": min(values), "end": values[-1],
                "growth": values[-1] - values[0]}

    # Growth over the second half of the run, where start-up allocations are done.
    half = samples[len(samples) // 2:] if samples else []
    return {
        "machine": _machine(),
        "args": vars(soak.args),
        "workdir": str(soak.workdir),
        "wall_s": round(wall, 1),
        "fault_phase_s": round(soak.fault_phase[1] - soak.fault_phase[0], 1) if soak.fault_phase else None,
        "faults": by_kind,
        "faults_detail": [asdict(f) | {"settle_s": round((f.end or f.start) - f.start, 1)} for f in faults],
        "faults_not_settled": sum(1 for f in faults if not f.settled),
        "settle_s_max": round(max(((f.end or f.start) - f.start) for f in faults), 1) if faults else None,
        "actor_restarts": {"status_sum": restarts_status, "expected_at_least": expected_restarts,
                           "actor_spawned": spawned,
                           "actors": len(status.get("actors", [])),
                           "actor_exited": events.get("actor_exited", 0),
                           "actor_hung": events.get("actor_hung", 0)},
        "freezes": [{"killed_while_frozen": f.detail.get("killed_while_frozen"),
                     "replaced_by": f.detail.get("replaced_by")} for f in faults if f.kind == "actor_freeze"],
        "clients": clients,
        "daemon": {
            "rss_kb": series("rss_kb"),
            "rss_kb_second_half": {"start": half[0]["rss_kb"], "end": half[-1]["rss_kb"]} if half else {},
            "fds": series("fds"),
            "threads": series("threads"),
            "children": series("children"),
            "zombies_max": max((s.get("zombies", 0) for s in samples), default=0),
            # An actor that just exited is a zombie until the next tick reaps it (0.2 s); one
            # still a zombie at the next sample (5 s later) was not reaped.
            "zombies_lingering": sorted({pid for a, b in itertools.pairwise(samples)
                                         for pid in set(a.get("zombie_pids", ())) & set(b.get("zombie_pids", ()))}),
            "actors_rss_kb": series("actors_rss_kb"),
            "samples": len(samples),
        },
        "status_end": {
            "pvs": len(status.get("pvs", [])),
            "pvs_connected": sum(1 for pv in status.get("pvs", []) if pv["connected"]),
            "clients": len(status.get("clients", [])),
        },
        "log": {
            "events": dict(sorted(events.items(), key=lambda kv: -kv[1])),
            "errors": len(errors) + len(suspicious),
            "first_errors": (error_lines + suspicious)[:5],
            "non_json_lines": len(non_json),
            "merged_lines": len(merged),
            "first_merged_lines": [line[:400] for line in merged[:2]],
            "non_json_warnings": len(warnings_nonjson),
            "first_non_json_warnings": warnings_nonjson[:3],
        },
        "leftover_processes": leftovers,
        "notes": soak.notes,
    }


def findings(report: dict) -> list[str]:
    """What the run says is wrong, one line each (empty: nothing)."""
    found = []
    for c in report["clients"]:
        o = c["outside_windows"]
        if o["steps"] or o["gaps"] or o["disconnects"] or o["stale"]:
            found.append(f"client {c['client']}: outside fault windows {o['steps']} counter steps "
                         f"({o['lost']} lost), {o['gaps']} gaps, {o['disconnects']} disconnects, "
                         f"{o['stale']} stale values")
        if not c["all_connected_at_end"]:
            found.append(f"client {c['client']}: not connected at the end to {c['not_connected_at_end']}")
        for pv, v in c["final_counters"].items():
            if v["diff"] is None or abs(v["diff"]) > 2:
                found.append(f"client {c['client']}: {pv} ends at {v['client']}, the IOC at {v['ioc']}")
        if c["hub_losses"]:
            found.append(f"client {c['client']}: lost the daemon {c['hub_losses']} times")
    stale_ioc = sum(c["stale_by_fault"].get("ioc_restart", 0) for c in report["clients"])
    if stale_ioc:
        found.append(f"{stale_ioc} stale values in IOC-restart windows: a reading from before the "
                     f"outage delivered again as an update once the PV reconnected")
    r = report["actor_restarts"]
    if r["status_sum"] != r["expected_at_least"]:
        found.append(f"{r['status_sum']} actor restarts for {r['expected_at_least']} actor faults")
    if report["faults_not_settled"]:
        found.append(f"{report['faults_not_settled']} faults did not settle")
    for f in report["freezes"]:
        if not f["killed_while_frozen"]:
            found.append(f"a frozen actor was not killed within {FREEZE_S:.0f} s")
    d = report["daemon"]
    if d["rss_kb"] and d["rss_kb"]["growth"] > 10_000:
        found.append(f"daemon RSS grew by {d['rss_kb']['growth']} kB")
    if d["fds"] and d["fds"]["end"] != d["fds"]["start"]:
        found.append(f"daemon fds {d['fds']['start']} -> {d['fds']['end']}")
    if d["children"] and d["children"]["end"] != d["children"]["start"]:
        found.append(f"daemon children {d['children']['start']} -> {d['children']['end']}")
    if d.get("zombies_lingering"):
        found.append(f"zombie actors not reaped between two samples: {d['zombies_lingering']}")
    lg = report["log"]
    if lg["errors"]:
        found.append(f"{lg['errors']} error/exception lines in the daemon log")
    if lg["merged_lines"]:
        found.append(f"{lg['merged_lines']} daemon log lines hold two JSON records (interleaved writes)")
    if report["leftover_processes"]:
        found.append(f"leftover processes: {report['leftover_processes']}")
    found.extend(report["notes"])
    return found


def _count_lines(path: Path, needle: str) -> int:
    try:
        return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)
    except OSError:
        return 0


def print_report(report: dict) -> None:
    m = report["machine"]
    out = print
    out("\n==== pvhub soak report ====")
    out(f"machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}")
    a = report["args"]
    out(f"run: duration {a['duration']} s (fault phase {report['fault_phase_s']} s, wall {report['wall_s']} s), "
        f"{a['clients']} clients x {a['pvs']} PVs, fast_rate {a['fast_rate']} Hz, seed {a['seed']}")
    out(f"faults: {report['faults']} (not settled: {report['faults_not_settled']}, "
        f"longest settle {report['settle_s_max']} s)")
    r = report["actor_restarts"]
    out(f"actor restarts: {r['status_sum']} in status (faults that should restart one: "
        f"{r['expected_at_least']}); actor_spawned {r['actor_spawned']} for {r['actors']} actors; "
        f"actor_exited {r['actor_exited']}, actor_hung {r['actor_hung']}")
    if report["freezes"]:
        killed = sum(1 for f in report["freezes"] if f["killed_while_frozen"])
        replaced = sum(1 for f in report["freezes"] if f["replaced_by"])
        out(f"freezes: {len(report['freezes'])}, killed while frozen {killed}, replaced within {FREEZE_S:.0f} s {replaced}")
    out("clients:")
    for c in report["clients"]:
        o, i = c["outside_windows"], c["inside_windows"]
        finals = ", ".join(f"{pv.split(':')[0][-1]}:{v['client']}/{v['ioc']}" for pv, v in c["final_counters"].items())
        out(f"  client {c['client']}: {c['updates']} updates on {len(c['pvs'])} PVs; update_gaps {c['update_gaps']}, "
            f"missed_updates {c['missed_updates']}, disconnects {c['disconnects']}, stale {c['stale']} "
            f"{c['stale_by_fault']}, "
            f"hub losses {c['hub_losses']}; all connected at end: {c['all_connected_at_end']}; "
            f"fast client/IOC at end: {finals}")
        for label, k in (("outside windows", o), ("inside windows", i)):
            out(f"      {label}: {k['steps']} counter steps ({k['lost']} updates lost, {k['repeats']} repeats, "
                f"{k['backwards']} backwards, {k['unexplained']} unexplained), {k['gaps']} gaps, "
                f"{k['stale']} stale values, {k['disconnects']} disconnects")
        for event in c["first_outside_events"]:
            out(f"      outside a window: {json.dumps(event)}")
    d = report["daemon"]
    rss = d["rss_kb"]
    if rss:
        out(f"daemon RSS kB: start {rss['start']}, max {rss['max']}, end {rss['end']}, growth {rss['growth']} "
            f"(second half: {d['rss_kb_second_half'].get('start')} -> {d['rss_kb_second_half'].get('end')})")
        out(f"daemon fds: start {d['fds']['start']}, max {d['fds']['max']}, end {d['fds']['end']}; threads "
            f"{d['threads']['start']} -> {d['threads']['end']}; children start {d['children']['start']}, "
            f"max {d['children']['max']}, end {d['children']['end']}; zombies max {d['zombies_max']} "
            f"(not reaped by the next sample: {len(d.get('zombies_lingering', []))}); "
            f"actors' RSS kB {d['actors_rss_kb']['start']} -> {d['actors_rss_kb']['end']} ({d['samples']} samples)")
    s = report["status_end"]
    out(f"status at end: {s['pvs_connected']}/{s['pvs']} PVs connected, {s['clients']} clients")
    lg = report["log"]
    out(f"daemon log: {lg['errors']} error/exception lines; {lg['non_json_lines']} non-JSON lines "
        f"({lg['non_json_warnings']} warnings); {lg['merged_lines']} lines holding two records; "
        f"events {lg['events']}")
    for line in lg["first_errors"]:
        out(f"      {line}")
    for line in lg["first_merged_lines"]:
        out(f"      merged: {line}")
    for line in lg["first_non_json_warnings"]:
        out(f"      {line[:300]}")
    out(f"leftover processes: {report['leftover_processes'] or 'none'}")
    for note in report["notes"]:
        out(f"note: {note}")
    out("findings:" if report["findings"] else "findings: none")
    for line in report["findings"]:
        out(f"  - {line}")
    out(f"details: {report['workdir']}/report.json")


# ================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of fault injection")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pvs", type=int, default=6, help="PVs per client (the 2 counters first)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fast-rate", type=float, default=100.0, help="Hz of each IOC's fast counter")
    parser.add_argument("--quiet-min", type=float, default=8.0, help="least quiet time before a fault")
    parser.add_argument("--quiet-max", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--report-interval", type=float, default=1.0, help="client report period")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="daemon sample period")
    parser.add_argument("--workdir", help="logs and report.json (default: a new temporary directory)")
    # The client process (internal).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=1200.0, help=argparse.SUPPRESS)
    parser.add_argument("pv", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        return run_client(args)
    soak = Soak(args)
    t0 = time.monotonic()
    final: dict = {}
    try:
        soak.start()
        soak.run_faults()
        final = soak.final_check()
    except KeyboardInterrupt:
        soak.notes.append("interrupted")
    except Exception as exc:  # noqa: BLE001 - report what was measured before the failure
        soak.notes.append(f"run failed: {exc!r}")
        soak.say(f"run failed: {traceback.format_exc()}")
    finally:
        soak.say("stopping everything")
        soak.stop()
    leftovers = soak.leftovers()
    report = build_report(soak, final, leftovers, time.monotonic() - t0)
    report["findings"] = findings(report)
    (soak.workdir / "report.json").write_text(json.dumps(
        report | {"samples": soak.samples, "events": {c.index: c.events for c in soak.clients}},
        indent=1, default=str))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
