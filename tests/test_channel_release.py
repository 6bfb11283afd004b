"""A client's channels live while something uses them (``pvhub.client.hub`` Rule 7): against a
real daemon and a real IOC, a Signal that is collected lets its PV's readings go, and the next
Signal of that PV is served afresh."""

from __future__ import annotations

import gc
import time

import pytest
from helpers import wait_until

from pvhub import protocol as p
from pvhub.client import EpicsSignalRO, Hub
from pvhub.client import hub as hub_module

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]


def followers(client: Hub, pv: str) -> int:
    """How many clients the daemon counts as following ``pv``."""
    status = client.call(lambda rid: p.StatusRequest(id=rid), timeout=5).status  # type: ignore[attr-defined]
    return next((entry["subscribers"] for entry in status["pvs"] if entry["pv"] == pv), 0)


def values_arrive(signal: EpicsSignalRO, count: int = 5, timeout: float = 10.0) -> None:
    got: list[int] = []
    signal.subscribe(lambda value, **kwargs: got.append(value))
    wait_until(lambda: len(got) >= count, timeout, message=lambda: f"{len(got)} values arrived")
    signal.unsubscribe_all()
    steps = {b - a for a, b in zip(got, got[1:])}
    assert steps == {1}, f"the counter's values came with gaps: steps {sorted(steps)[:5]}"


def test_a_collected_signal_lets_its_pv_go_and_a_new_one_gets_it_back(hub, prefix, monkeypatch):
    monkeypatch.setattr(hub_module, "CHANNEL_LINGER_S", 0.5)
    client = Hub(hub.address, name="release-test")
    fast = f"{prefix}fast"  # counts at 500 Hz
    try:
        quiet = EpicsSignalRO(f"{prefix}dt", name="dt", hub=client)  # kept throughout
        first = EpicsSignalRO(fast, name="first", hub=client)
        quiet.wait_for_connection(timeout=15)
        first.wait_for_connection(timeout=15)
        values_arrive(first)
        wait_until(lambda: followers(client, fast) == 1, 10)
        # Two Signals of one PV share its channel; dropping one leaves the other served.
        second = EpicsSignalRO(fast, name="second", hub=client)
        second.wait_for_connection(timeout=15)
        del first
        gc.collect()
        values_arrive(second)
        assert fast in client._channels

        del second
        gc.collect()
        wait_until(lambda: fast not in client._channels, 10, message="the channel was never let go")
        wait_until(lambda: followers(client, fast) == 0, 10, message="the daemon still counts this client")
        # Its readings no longer reach this process's Python: it wakes to ping, not 500 times a second.
        wakeups = client.wakeups
        time.sleep(1.0)
        assert client.wakeups - wakeups < 50
        assert quiet.connected and followers(client, f"{prefix}dt") == 1

        again = EpicsSignalRO(fast, name="again", hub=client)
        again.wait_for_connection(timeout=15)
        values_arrive(again)
        wait_until(lambda: followers(client, fast) == 1, 10)
    finally:
        client.close()


def test_signals_made_and_dropped_in_a_loop_leave_one_working_channel(hub, prefix, monkeypatch):
    # The release runs on the I/O thread while new Signals of the same PV are made on this one.
    monkeypatch.setattr(hub_module, "CHANNEL_LINGER_S", 0.02)
    client = Hub(hub.address, name="release-churn")
    fast = f"{prefix}fast"
    try:
        for i in range(50):
            signal = EpicsSignalRO(fast, name=f"s{i}", hub=client)
            if i % 10 == 0:
                signal.wait_for_connection(timeout=15)
            del signal
            if i % 3 == 0:
                gc.collect()
        gc.collect()
        wait_until(lambda: fast not in client._channels, 10, message="a channel nobody holds was kept")
        last = EpicsSignalRO(fast, name="last", hub=client)
        last.wait_for_connection(timeout=15)
        values_arrive(last)
        assert len(client._channels) == 1
    finally:
        client.close()


def test_a_signal_made_for_each_read_finds_the_channel_its_last_one_left(hub, prefix):
    # A script that makes a Signal per read (the tutorial's style, in a loop) pays for the
    # connection once: a channel nothing uses lingers (CHANNEL_LINGER_S) before it goes.
    client = Hub(hub.address, name="release-linger")
    try:
        first = EpicsSignalRO(f"{prefix}dt", name="dt", hub=client)
        first.wait_for_connection(timeout=15)
        channel = first._read_channel
        del first
        gc.collect()
        wait_until(lambda: not client._released, 5)  # the I/O thread has counted it unused
        for i in range(20):
            signal = EpicsSignalRO(f"{prefix}dt", name=f"dt{i}", hub=client)
            assert signal._read_channel is channel and signal.connected  # no new connection to wait for
            assert signal.get() == 3.0
            del signal
            gc.collect()
        assert client._channels.get(f"{prefix}dt") is channel
    finally:
        client.close()
