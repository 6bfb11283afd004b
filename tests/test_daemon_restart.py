"""What ``systemctl restart pvhub`` does to clients: they notice, reconnect by themselves,
resync, and their subscriptions go on; what was in flight fails clearly."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from helpers import daemon_status as status
from helpers import log_events, wait_for_put_in_flight, wait_until

from pvhub.client import EpicsSignal, close_hubs, get_hub
from pvhub.errors import PvhubError
from pvhub.testing import DaemonProcess
from pvhub.testing import free_tcp_port

pytestmark = pytest.mark.system


@pytest.fixture
def restartable(zoo_ioc, monkeypatch, tmp_path):
    """A daemon on a fixed address that the test may stop and start again."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    monkeypatch.setenv("PVHUB_ADDRESS", address)
    daemons = []

    def start() -> DaemonProcess:
        directory = tmp_path / f"daemon{len(daemons)}"
        directory.mkdir()
        daemon = DaemonProcess(address=address, env=zoo_ioc.ca_env(), directory=directory)
        daemons.append(daemon)
        return daemon.start()

    yield start
    close_hubs()
    for daemon in daemons:
        daemon.stop()


def watched_motor(prefix: str) -> tuple[EpicsSignal, list, list[bool]]:
    """The zoo's motor, connected, with the values and the ``connected`` of its value and meta
    callbacks collected as they come."""
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    values: list = []
    states: list[bool] = []
    motor.subscribe(lambda value, **kw: values.append(value))
    motor.subscribe(lambda connected, **kw: states.append(connected), event_type="meta")
    return motor, values, states


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_clients_survive_a_daemon_restart(restartable, prefix, how):
    first = restartable()
    motor, values, states = watched_motor(prefix)
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.set(30).wait(10)
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    in_flight = slow.set(1)
    wait_for_put_in_flight(first, f"{prefix}slow")
    losses = get_hub().losses

    stopped = time.monotonic()
    if how == "sigterm":
        assert first.stop() == 0
    else:
        os.kill(first.pid, signal.SIGKILL)
        first.process.wait(5)
    # In-flight work fails clearly, and the client notices within a few seconds.
    with pytest.raises(PvhubError) as info:
        in_flight.wait(10)
    assert isinstance(info.value, ConnectionError)
    assert "unknown" in str(info.value)
    wait_until(lambda: not motor.connected, 5, message="the client did not notice")
    wait_until(lambda: states[-1:] == [False], 5, message=lambda: f"no meta callback: {states}")
    assert time.monotonic() - stopped < 10
    assert get_hub().losses == losses + 1

    restartable()
    wait_until(lambda: motor.connected, 20, message="the client did not reconnect")
    wait_until(lambda: states[-1:] == [True], 5, message=lambda: f"no meta callback: {states}")
    motor.set(8.5).wait(5)
    wait_until(lambda: 8.5 in values, 5, message=lambda: f"no value after the restart: {values}")
    assert motor.read()["m"]["value"] == 8.5


def test_graceful_stop_lets_puts_in_flight_finish(restartable, prefix):
    daemon = restartable()
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.wait_for_connection(timeout=15)
    delay.set(1.5).wait(5)
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    status = slow.set(3)
    done = threading.Event()
    status.add_callback(lambda st: done.set())
    wait_for_put_in_flight(daemon, f"{prefix}slow")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert done.wait(5)
    assert status.success, status.exception()
    log = daemon.log_text()
    assert '"puts_in_flight": 1' in log and "daemon_stopped" in log


def test_a_frozen_daemon_is_left_and_found_again_with_its_actors(restartable, prefix):
    """A daemon stopped for a while (SIGSTOP, a paused VM) and resumed: clients give it up
    after their pings go unanswered, and take it back when it answers again. Its actors,
    which kept running, are not taken for hung: their heartbeats waited in its socket."""
    daemon = restartable()
    motor, values, states = watched_motor(prefix)
    actors = {a["actor"]: a["pid"] for a in status()["actors"]}
    losses = get_hub().losses

    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not motor.connected, 10, message="the client did not give the daemon up")
        wait_until(lambda: states[-1:] == [False], 5, message=lambda: f"no meta callback: {states}")
        assert get_hub().losses == losses + 1
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    wait_until(lambda: motor.connected, 10, message="the client did not take the daemon back")
    wait_until(lambda: states[-1:] == [True], 5, message=lambda: f"no meta callback: {states}")
    motor.set(4.25).wait(5)
    wait_until(lambda: 4.25 in values, 5, message=lambda: f"no value after the freeze: {values}")
    assert {a["actor"]: a["pid"] for a in status()["actors"]} == actors
    assert not log_events(daemon, "actor_hung") and not log_events(daemon, "actor_restarted")
    assert log_events(daemon, "daemon_stalled")  # it knows it was away, and says so
