"""An IOC that dies or freezes: clients see the disconnection, reads fail clearly, and
everything resumes by itself when the IOC is back."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import wait_for_put_in_flight, wait_until

from pvhub.client import EpicsSignal

pytestmark = pytest.mark.system


class Watch:
    def __init__(self, sig) -> None:
        self.values: list = []
        self.connected: list[bool] = []
        sig.subscribe(lambda value, **kw: self.values.append(value))
        sig.subscribe(lambda connected, **kw: self.connected.append(connected), event_type="meta")


def test_ioc_that_dies_and_returns(hub, zoo_ioc, prefix):
    motor = EpicsSignal(f"{prefix}motor", name="m", connection_timeout=0.5)
    motor.wait_for_connection(timeout=15)
    watch = Watch(motor)
    wait_until(lambda: watch.connected == [True] and watch.values, 5)

    zoo_ioc.stop()
    wait_until(lambda: not motor.connected, 10, message="the client never saw the IOC go")
    wait_until(lambda: watch.connected[-1:] == [False], 5, message="no meta callback")
    with pytest.raises(ConnectionError) as info:
        motor.read()
    assert isinstance(info.value, TimeoutError)  # and a TimeoutError, as ophyd raises
    assert f"{prefix}motor" in str(info.value)
    with pytest.raises(ConnectionError):
        motor.get()
    with pytest.raises(ConnectionError):
        motor.set(1)

    zoo_ioc.start()
    wait_until(lambda: motor.connected, 20, message="the PV did not come back with its IOC")
    wait_until(lambda: watch.connected[-1:] == [True], 5, message=lambda: f"meta callbacks {watch.connected}")
    motor.set(2.5).wait(5)
    wait_until(lambda: 2.5 in watch.values, 5, message="the subscription did not resume")
    assert motor.read()["m"]["value"] == 2.5


def test_ioc_that_freezes_and_thaws(zoo_ioc, hub_factory, prefix, monkeypatch):
    # Channel Access notices a silent server after EPICS_CA_CONN_TMO (30 s by default).
    daemon = hub_factory(zoo_ioc, env={"EPICS_CA_CONN_TMO": "1"})
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    motor = EpicsSignal(f"{prefix}motor", name="m", connection_timeout=0.5)
    motor.wait_for_connection(timeout=15)
    watch = Watch(motor)
    os.kill(zoo_ioc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not motor.connected, 20, message="a frozen IOC went unnoticed")
        wait_until(lambda: False in watch.connected, 5, message=lambda: f"meta callbacks {watch.connected}")
        with pytest.raises(ConnectionError):
            motor.read()
    finally:
        os.kill(zoo_ioc.pid, signal.SIGCONT)
    wait_until(lambda: motor.connected, 30, message="the PV did not come back after the thaw")
    motor.set(1.5).wait(5)
    wait_until(lambda: 1.5 in watch.values, 5)
    from pvhub.client import close_hubs

    close_hubs()


def test_a_put_in_flight_when_the_ioc_dies_fails_as_unknown(hub, zoo_ioc, prefix):
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.wait_for_connection(timeout=15)
    delay.set(30).wait(5)
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    status = slow.set(1)
    wait_for_put_in_flight(hub, f"{prefix}slow")
    zoo_ioc.stop()
    with pytest.raises(ConnectionError, match="outcome is unknown"):
        status.wait(10)
