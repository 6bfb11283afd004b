"""Actors that die or hang are restarted, and their subscribers never notice more than a
disconnection and a new epoch."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers import daemon_status as status
from helpers import alive, children_of, log_events, wait_for_put_in_flight, wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO
from pvhub.errors import ActorDiedError

pytestmark = pytest.mark.system


def pv_status(pv: str) -> dict:
    return next(entry for entry in status()["pvs"] if entry["pv"] == pv)


def actor_pid(pv: str) -> int | None:
    """The pid of the process that owns ``pv`` now, once it is ready."""
    return pv_status(pv)["pid"]


class Recorder:
    """Collects a Signal's value and meta callbacks."""

    def __init__(self, signal) -> None:
        self.values: list = []
        self.metas: list[bool] = []
        self.changed = threading.Event()
        signal.subscribe(self.on_value)
        signal.subscribe(self.on_meta, event_type="meta")

    def on_value(self, value, **kwargs) -> None:
        self.values.append(value)
        self.changed.set()

    def on_meta(self, connected, **kwargs) -> None:
        self.metas.append(connected)


def test_killed_actor_is_restarted_and_subscriptions_go_on(hub, prefix):
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    seen = Recorder(motor)
    wait_until(lambda: seen.values, 5)
    epoch = motor._read_channel.epoch
    old_pid = actor_pid(f"{prefix}motor")

    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    new_pid = wait_until(lambda: (pid := actor_pid(f"{prefix}motor")) not in (None, old_pid) and pid, 5)
    assert time.monotonic() - killed < 3
    spawned = [e for e in log_events(hub, "actor_spawned") if e["actor_pid"] == new_pid]
    exited = [e for e in log_events(hub, "actor_exited") if e["actor_pid"] == old_pid]
    assert spawned and exited

    wait_until(lambda: motor.connected and motor._read_channel.epoch != epoch, 10,
               message="the subscriber never saw the new actor")
    # Callbacks run on the callback thread, after the state they report has changed.
    wait_until(lambda: False in seen.metas and seen.metas[-1:] == [True], 5, message=lambda: f"metas {seen.metas}")
    motor.set(7.25).wait(5)
    wait_until(lambda: 7.25 in seen.values, 5, message=lambda: f"values {seen.values}")
    assert status()["pvs"][[x["pv"] for x in status()["pvs"]].index(f"{prefix}motor")]["restarts"] == 1


def test_restart_happens_within_a_second(hub, prefix):
    dt = EpicsSignalRO(f"{prefix}dt", name="dt")
    dt.wait_for_connection(timeout=15)
    old_pid = actor_pid(f"{prefix}dt")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: actor_pid(f"{prefix}dt") not in (None, old_pid), 5)
    exited = next(e for e in log_events(hub, "actor_exited") if e["actor_pid"] == old_pid)
    spawned = [e for e in log_events(hub, "actor_spawned") if e["actor"] == exited["actor"]][-1]
    gap = _seconds(spawned["timestamp"]) - _seconds(exited["timestamp"])
    assert 0 <= gap < 1.0


def test_hung_actor_is_detected_killed_and_restarted(hub, prefix):
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    seen = Recorder(motor)
    old_pid = actor_pid(f"{prefix}motor")
    os.kill(old_pid, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: log_events(hub, "actor_hung"), 5, message="the hung actor was not detected")
    assert time.monotonic() - stopped < 3.5
    new_pid = wait_until(lambda: (pid := actor_pid(f"{prefix}motor")) not in (None, old_pid) and pid, 10)
    assert new_pid != old_pid
    wait_until(lambda: motor.connected, 10)
    motor.set(3.5).wait(5)
    wait_until(lambda: 3.5 in seen.values, 5)


def test_put_in_flight_to_a_dying_actor_fails_as_unknown_and_is_not_resent(hub, prefix):
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.wait_for_connection(timeout=15)
    delay.set(1.0).wait(5)
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    status_ = slow.set(42)
    wait_for_put_in_flight(hub, f"{prefix}slow")
    os.kill(actor_pid(f"{prefix}slow"), signal.SIGKILL)
    with pytest.raises(ActorDiedError, match="outcome is unknown"):
        status_.wait(5)
    wait_until(lambda: slow.connected, 10)
    # Never re-issued: the new actor got no put (only the one in flight reached the IOC).
    assert len(log_events(hub, "put_requested")) == 2


def test_actor_that_keeps_dying_is_restarted_with_backoff(zoo_ioc, hub_factory, prefix, tmp_path, monkeypatch):
    # dt in a process of its own (config), so that its deaths are its process's alone.
    config = tmp_path / "pvhub.toml"
    config.write_text(f'[actors]\nisolate = ["{prefix}dt"]\n')
    hub = hub_factory(zoo_ioc, args=["--config", str(config)])
    monkeypatch.setenv("PVHUB_ADDRESS", hub.address)
    dt = EpicsSignalRO(f"{prefix}dt", name="dt")
    dt.wait_for_connection(timeout=15)
    pids = []
    for _ in range(3):
        pid = wait_until(lambda: actor_pid(f"{prefix}dt"), 10)
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: actor_pid(f"{prefix}dt") != pid, 10)
    wait_until(lambda: actor_pid(f"{prefix}dt") not in (None, *pids), 10)
    spawns = [_seconds(e["timestamp"]) for e in log_events(hub, "actor_spawned") if e["actor"] == f"pv:{prefix}dt"]
    exits = [_seconds(e["timestamp"]) for e in log_events(hub, "actor_exited") if e["actor"] == f"pv:{prefix}dt"]
    delays = [spawn - exit_ for exit_, spawn in zip(exits, spawns[1:])]
    assert delays[0] < 0.5  # the first death: at once
    assert delays[1] >= 0.45  # dying young again: 0.5 s
    assert delays[2] >= 0.95  # and again: 1 s
    wait_until(lambda: dt.connected, 10)


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- retired processes that do not leave (supervisor Rule 4), with real processes ---------------

# It watches its parent process, not the thread that started it (as a parent-death signal
# would): the spawner thread's end must not be what stops it.
STUBBORN = """
import os, signal, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.1)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
signal.pause()
"""


@pytest.fixture
def stubborn_supervisor(monkeypatch):
    """A Supervisor whose actors are processes that ignore SIGTERM, and the ones it started."""
    import subprocess
    import sys

    from pvhub.daemon import supervisor as sup

    started: list[subprocess.Popen] = []

    def start(self, identity: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "ready\n"  # SIGTERM is ignored from here on
        started.append(process)
        return process

    monkeypatch.setattr(sup.Supervisor, "_start", start)
    made = sup.Supervisor("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "console", "warning")
    yield made, started
    made.stop_all(timeout=1.0)
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        process.stdout.close()


@pytest.mark.timeout(30)
def test_a_retired_process_that_ignores_sigterm_is_killed_after_the_grace(stubborn_supervisor, monkeypatch):
    from pvhub.daemon import supervisor as sup

    supervisor, started = stubborn_supervisor
    monkeypatch.setattr(sup, "RETIRE_GRACE_S", 0.3)
    supervisor.spawn("pv:A", "pv:A")
    wait_until(lambda: started, timeout=10)
    wait_until(lambda: supervisor._processes["pv:A"].process is not None, timeout=10)
    retired_at = time.monotonic()
    supervisor.retire("pv:A")
    process = started[0]
    while process.poll() is None:  # the broker's tick calls reap()
        assert supervisor.reap() == []  # quietly: a retired actor's exit is no death
        assert time.monotonic() - retired_at < 10, "the retired process was never killed"
        time.sleep(0.05)
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - retired_at >= 0.3  # its SIGTERM had its grace first


@pytest.mark.timeout(30)
def test_stop_all_reaches_processes_still_retiring(stubborn_supervisor, monkeypatch):
    from pvhub.daemon import supervisor as sup

    supervisor, started = stubborn_supervisor
    monkeypatch.setattr(sup, "RETIRE_GRACE_S", 60.0)  # its grace would outlast the daemon
    supervisor.spawn("pv:A", "pv:A")
    supervisor.spawn("pool:0", "pool:0")
    wait_until(lambda: len(started) == 2, timeout=10)
    wait_until(lambda: all(r.process is not None for r in supervisor._processes.values()), timeout=10)
    supervisor.retire("pv:A")
    supervisor.stop_all(timeout=0.5)
    assert [process.poll() for process in started] == [-signal.SIGKILL, -signal.SIGKILL]


@pytest.mark.timeout(60)
def test_a_stopping_daemon_lets_its_actors_stop_in_order(hub_factory):
    daemon = hub_factory()
    pool = wait_until(lambda: {e["actor"] for e in log_events(daemon, "actor_started")}, timeout=30)
    assert daemon.stop() == 0
    stopped = {event["actor"] for event in log_events(daemon, "actor_stopped")}
    assert pool <= stopped, f"killed, not stopped: {sorted(pool - stopped)}"
    assert not log_events(daemon, "actor_killed")


# --- a daemon whose starter is gone (pvhub.testing.daemon Rule 6) ---------------------------------

HARNESS = """
import signal
from pvhub.testing import DaemonProcess
daemon = DaemonProcess().start()
print(daemon.pid, daemon.log_path, flush=True)
signal.pause()
"""


@pytest.mark.timeout(60)
def test_a_daemon_stops_with_its_actors_when_what_started_it_is_killed():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    harness = subprocess.Popen([sys.executable, "-c", HARNESS], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        pid_text, log_path = harness.stdout.readline().split()
        daemon = int(pid_text)
        actors = wait_until(lambda: children_of(daemon), timeout=20)  # its pool, started before READY
        harness.kill()  # no stop(), no atexit: as a harness killed by the OOM killer or a CI timeout
        harness.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in (daemon, *actors)), 15,
                   message="the daemon or an actor outlived what started it")
        with open(log_path) as log:
            assert '"parent_gone"' in log.read()  # it stopped as it should, not by accident
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(10)
        harness.stdout.close()
