"""What an operator sees: ``pvhub status``, the log's events, clients that vanish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import daemon_status as status
from helpers import log_events as events
from helpers import wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO

pytestmark = pytest.mark.system

CLIENT = Path(__file__).with_name("fan_out_client.py")


def test_status_shows_pvs_rates_subscribers_and_clients(hub, prefix):
    fast = EpicsSignalRO(f"{prefix}fast", name="fast")
    fast.wait_for_connection(timeout=15)
    fast.subscribe(lambda **kw: None)
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)

    def fast_row():
        rows = {row["pv"]: row for row in status()["pvs"]}
        row = rows.get(f"{prefix}fast")
        return row if row and row["rate"] > 100 and row["subscribers"] == 1 else None

    row = wait_until(fast_row, 10, message="no rate or subscriber for fast")
    assert row["connected"] and row["pid"] and row["restarts"] == 0 and row["last_update"]
    clients = status()["clients"]
    assert len(clients) == 1 and clients[0]["pvs"] == 2

    env = {**os.environ, "PVHUB_ADDRESS": hub.address}
    shown = subprocess.run([sys.executable, "-m", "pvhub", "status"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    header, *lines = shown.stdout.splitlines()
    assert header.startswith("pvhub ")
    table = "\n".join(lines)
    for column in ("PV", "CONNECTED", "RATE/S", "SUBSCRIBERS", "LAST UPDATE", "ACTOR PID", "RESTARTS", "CLIENT"):
        assert column in table
    fast_line = next(line for line in lines if line.startswith(f"{prefix}fast "))
    assert " yes " in fast_line and str(row["pid"]) in fast_line


def test_log_events_for_actors_pvs_clients_and_puts(hub, prefix):
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    motor.set(1.25).wait(5)
    ro = EpicsSignal(f"{prefix}ro", name="ro")
    ro.wait_for_connection(timeout=15)
    with pytest.raises(PermissionError):
        ro.set(2).wait(5)
    wait_until(lambda: len([e for e in events(hub) if e["event"] == "put_finished"]) == 2, 5)
    log = events(hub)
    names = {e["event"] for e in log}
    assert {"daemon_ready", "actor_spawned", "actor_started", "actor_ready", "pv_connected",
            "client_connected", "put_requested", "put_finished"} <= names
    requested = [e for e in log if e["event"] == "put_requested"]
    assert requested[0]["pv"] == f"{prefix}motor" and requested[0]["value"] == 1.25
    assert requested[0]["name"].endswith(f"[{os.getpid()}]")  # who
    outcomes = {e["pv"]: e["outcome"] for e in log if e["event"] == "put_finished"}
    assert outcomes == {f"{prefix}motor": "done", f"{prefix}ro": "read_only"}
    assert all("timestamp" in e and "level" in e for e in log)


def test_a_killed_client_is_forgotten(hub, prefix):
    EpicsSignalRO(f"{prefix}dt", name="dt").wait_for_connection(timeout=15)
    env = {**os.environ, "PVHUB_ADDRESS": hub.address, "PV": f"{prefix}fast", "COUNT": "1000000"}
    client = subprocess.Popen([sys.executable, str(CLIENT)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "subscribed"
        wait_until(lambda: len(status()["clients"]) == 2, 10, interval=0.1)
        client.send_signal(signal.SIGKILL)
        client.wait(5)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    # Forgotten within the heartbeat window (3 beats of 1 s, plus a margin).
    wait_until(lambda: len(status()["clients"]) == 1, 10, interval=0.1, message="the dead client was not forgotten")
    assert any(e["event"] == "client_disconnected" for e in events(hub))


def test_a_frozen_client_is_forgotten_and_known_again_when_it_wakes(hub, prefix):
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    motor.set(1.0).wait(5)
    env = {**os.environ, "PVHUB_ADDRESS": hub.address, "PV": f"{prefix}motor", "COUNT": "2"}
    client = subprocess.Popen([sys.executable, str(CLIENT)], env=env, stdout=subprocess.PIPE, text=True)

    def motor_subscribers() -> int:
        return next((row["subscribers"] for row in status()["pvs"] if row["pv"] == f"{prefix}motor"), 0)

    try:
        assert client.stdout.readline().strip() == "subscribed"
        wait_until(lambda: motor_subscribers() == 2, 10)
        client.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: len(status()["clients"]) == 1, 15, interval=0.1, message="the frozen client was not forgotten")
            assert motor_subscribers() == 1
        finally:
            client.send_signal(signal.SIGCONT)
        # Awake, it speaks again and is known again, with the PVs it follows.
        wait_until(lambda: motor_subscribers() == 2, 10, interval=0.1, message=lambda: f"the woken client's PVs are not known again: {status()}")
        motor.set(7.75).wait(5)
        out, _ = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert json.loads(out.splitlines()[-1]) == {"values": [1.0, 7.75], "finished": True}
