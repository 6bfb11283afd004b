"""``pvhub get / put / monitor / status / demo`` as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pvhub.cli import parse_value

pytestmark = pytest.mark.system


def pvhub(*args: str, address: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PVHUB_ADDRESS": address}
    return subprocess.run([sys.executable, "-m", "pvhub", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_parse_value():
    assert parse_value(["1"]) == 1
    assert parse_value(["1.5"]) == 1.5
    assert parse_value(["On"]) == "On"
    assert parse_value(["True"]) == "True"
    assert parse_value(["1", "2", "3"]) == [1, 2, 3]


def test_get_put_monitor_status(hub, prefix):
    got = pvhub("get", f"{prefix}dt", f"{prefix}mode", "-S", address=hub.address)
    assert got.returncode == 0, got.stderr
    # -S writes a float at the PV's precision, as caget -S does: dt has PREC 0.
    assert f"{prefix}dt                   3\n" in got.stdout and "Off" in got.stdout

    put = pvhub("put", f"{prefix}dt", "2.5", address=hub.address)
    assert put.returncode == 0, put.stderr
    assert "Old" in put.stdout and "2.5" in put.stdout.splitlines()[-1]

    refused = pvhub("put", f"{prefix}ro", "1", address=hub.address)
    assert refused.returncode == 1 and "write access" in refused.stderr

    wave = pvhub("put", f"{prefix}wave", "1", "2", "3", address=hub.address)
    assert wave.returncode == 0, wave.stderr

    monitor = pvhub("monitor", f"{prefix}fast", "-n", "20", address=hub.address)
    assert monitor.returncode == 0, monitor.stderr
    lines = [line for line in monitor.stdout.splitlines() if line.startswith(f"{prefix}fast")]
    assert len(lines) >= 20

    status = pvhub("status", address=hub.address)
    assert status.returncode == 0, status.stderr
    assert any(line.startswith(f"{prefix}dt ") for line in status.stdout.splitlines())
    assert "CLIENT" in status.stdout


def test_get_of_a_missing_pv_fails_in_time(hub, prefix):
    got = pvhub("get", "--timeout", "1", f"{prefix}nothing", address=hub.address)
    assert got.returncode == 1
    assert "could not connect within 1.0 s" in got.stderr


@pytest.mark.timeout(120)
def test_demo_runs_the_tutorial_and_stops_everything():
    result = subprocess.run([sys.executable, "-m", "pvhub", "demo", "--duration", "1"],
                            capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for step in ("RE(count([time_delta]))", "list_scan", "monitor_x_for", "time_delta.describe()",
                 "Moved to 5.", "Demo finished"):
        assert step in out
    assert "generator count" in out and "generator monitor_x_for" in out
    assert "'source': 'PV:random_walk:dt'" in out


def test_status_json_is_the_status_with_one_record_per_line():
    from pvhub.cli import status_json

    status = {
        "version": "0.1.0",
        "uptime": 12.5,
        "pvs": [{"pv": f"X:{i}", "connected": i % 2 == 0, "rate": 1.0, "quarantined": None} for i in range(3)],
        "actors": [],
        "clients": [{"client": "ab", "name": "n\"ame"}],
    }
    text = status_json(status)
    assert json.loads(text) == status
    lines = text.splitlines()
    assert sum(1 for line in lines if line.strip().startswith('{"pv": ')) == 3
