"""Many client processes on one fast PV: each gets every update, in order, and the IOC sees
one Channel Access monitor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

from pvhub.client import EpicsSignalRO

pytestmark = pytest.mark.system

CLIENT = Path(__file__).with_name("fan_out_client.py")
UPDATES = 600  # at 500 Hz, a little over a second of updates


@pytest.mark.timeout(120)
def test_clients_each_get_every_update_in_order(hub, prefix):
    monitors = EpicsSignalRO(f"{prefix}fast_monitors", name="monitors")
    monitors.wait_for_connection(timeout=15)
    env = {**os.environ, "PVHUB_ADDRESS": hub.address, "PV": f"{prefix}fast", "COUNT": str(UPDATES)}
    clients = [
        subprocess.Popen([sys.executable, str(CLIENT)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        for client in clients:
            assert client.stdout.readline().strip() == "subscribed"
        # Also one Signal in this process: four subscribers in all.
        local = []
        sig = EpicsSignalRO(f"{prefix}fast", name="fast")
        sig.subscribe(lambda value, **kw: local.append(value))
        results = [json.loads(client.communicate(timeout=90)[0].splitlines()[-1]) for client in clients]
        wait_until(lambda: len(local) >= UPDATES, 30, message=lambda: f"local got {len(local)}")
        assert monitors.get() == 1
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    for result in [*results, {"values": local, "finished": True}]:
        values = result["values"]
        assert result["finished"] and len(values) >= UPDATES
        steps = {b - a for a, b in zip(values, values[1:])}
        assert steps == {1}, f"gaps or reordering: steps {sorted(steps)[:10]}"
