"""Simulated IOCs (``pvhub.testing``): they start on loopback, answer a real CA client that knows
only their ``ca_env()``, and leave nothing running when stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CAPROTO_CLIENT_ENV, CAPROTO_CLIENT_PREAMBLE, is_gone, wait_until

from pvhub.testing import LOOPBACK, SimulatedIOC, merge_ca_env

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process because caproto's threading client takes its address list from
# os.environ: the environment under test is then exactly ``ca_env()``.
_THREADING_CLIENT_READ = """
import json, sys
from caproto.threading.client import Context

def plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value.item() if hasattr(value, "item") else value

FIELDS = ("units", "precision", "lower_ctrl_limit", "upper_ctrl_limit", "enum_strings")
context = Context()
result = {}
for pv in context.get_pvs(*sys.argv[1:], timeout=5):
    pv.wait_for_connection(timeout=5)
    reading = pv.read(data_type="control", timeout=5)
    result[pv.name] = {
        "value": plain(list(reading.data)),
        "type": pv.channel.native_data_type.name,
        "count": pv.channel.native_data_count,
        "access": pv.access_rights.name,
        **{f: plain(getattr(reading.metadata, f)) for f in FIELDS if hasattr(reading.metadata, f)},
    }
context.disconnect()
print(json.dumps(result))
"""


# Two clients hold identical monitors on ``fast``; the zoo must count both, then one.
_TWO_MONITORS_THEN_ONE = """
import json, sys, time
from caproto.threading.client import Context

fast_name, monitors_name = sys.argv[1:]

def ignore(*args):  # caproto holds callbacks weakly: a lambda would vanish at once
    pass

def wait_for_count(pv, expected):
    deadline = time.monotonic() + 10
    while (count := int(pv.read(timeout=5).data[0])) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count

contexts = [Context(), Context()]
subscriptions = []
for context in contexts:
    fast, = context.get_pvs(fast_name, timeout=5)
    fast.wait_for_connection(timeout=5)
    subscriptions.append(fast.subscribe())
    subscriptions[-1].add_callback(ignore)
monitors, = contexts[0].get_pvs(monitors_name, timeout=5)
monitors.wait_for_connection(timeout=5)
two = wait_for_count(monitors, 2)
contexts[1].disconnect()
one = wait_for_count(monitors, 1)
contexts[0].disconnect()
print(json.dumps([two, one]))
"""


def run_ca_client(script: str, ca_env: dict[str, str], *args: str) -> object:
    """Run ``script`` in a fresh Python that sees only ``ca_env`` of EPICS's variables, and
    return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")} | ca_env | CAPROTO_CLIENT_ENV
    done = subprocess.run(
        [sys.executable, "-c", CAPROTO_CLIENT_PREAMBLE + script, *args],
        env=env, capture_output=True, text=True, timeout=40,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def read_with_threading_client(ca_env: dict[str, str], *pvs: str) -> dict[str, dict]:
    """The view caproto's threading client has of each of ``pvs``, by name."""
    return run_ca_client(_THREADING_CLIENT_READ, ca_env, *pvs)


def repeater_pids() -> set[int]:
    """Processes running a caproto repeater (which a careless CA client would spawn)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            continue
        if b"caproto-repeater" in command or b"caproto.commandline.repeater" in command:
            pids.add(int(entry.name))
    return pids


def accepts_tcp(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def test_random_walk_starts_and_reads(prefix):
    with SimulatedIOC(prefix=prefix) as ioc:
        assert ioc.prefix == prefix
        assert list(ioc.read("dt").data) == [3.0]
        assert accepts_tcp(ioc.port)


def test_zoo_through_caproto_threading_client(zoo_ioc):
    names = ["dt", "motor", "count", "wave", "text", "mode", "ro", "chars", "fast"]
    seen = read_with_threading_client(zoo_ioc.ca_env(), *map(zoo_ioc.pv, names))
    by_name = {name: seen[zoo_ioc.pv(name)] for name in names}

    assert by_name["dt"]["value"] == [3.0]
    assert by_name["motor"] | {"value": None} == {
        "value": None, "type": "DOUBLE", "count": 1, "access": "READ|WRITE",
        "units": "mm", "precision": 3, "lower_ctrl_limit": -10.0, "upper_ctrl_limit": 10.0,
    }  # fmt: skip
    assert (by_name["count"]["type"], by_name["count"]["value"]) == ("LONG", [0])
    assert by_name["wave"]["value"] == [float(i) for i in range(16)]
    assert (by_name["text"]["type"], by_name["text"]["value"]) == ("STRING", ["hello"])
    assert by_name["mode"]["type"] == "ENUM"
    assert by_name["mode"]["enum_strings"] == ["Off", "On", "Auto"]
    assert by_name["mode"]["value"] == [0]
    assert by_name["ro"]["access"] == "READ"
    assert (by_name["chars"]["type"], by_name["chars"]["count"]) == ("CHAR", 40)
    assert bytes(by_name["chars"]["value"]) == b"abc"
    assert by_name["fast"]["value"][0] > 0  # it counts from startup on


def test_zoo_counts_every_client_monitor_on_fast(zoo_ioc):
    pvs = [zoo_ioc.pv("fast"), zoo_ioc.pv("fast_monitors")]
    assert run_ca_client(_TWO_MONITORS_THEN_ONE, zoo_ioc.ca_env(), *pvs) == [2, 1]
    wait_until(lambda: zoo_ioc.read("fast_monitors").data[0] == 0, 5)


def test_zoo_fast_counts_at_its_rate(zoo_ioc):
    start, started = zoo_ioc.read("fast").data[0], time.monotonic()
    wait_until(lambda: zoo_ioc.read("fast").data[0] - start >= 500, 10)
    rate = (zoo_ioc.read("fast").data[0] - start) / (time.monotonic() - started)
    assert 400 < rate < 560


def test_clients_spawn_no_repeater(zoo_ioc):
    before = repeater_pids()
    read_with_threading_client(zoo_ioc.ca_env(), zoo_ioc.pv("dt"))
    zoo_ioc.read("dt")
    assert repeater_pids() <= before


def test_stop_leaves_no_process(prefix):
    ioc = SimulatedIOC(prefix=prefix).start()
    pid, port = ioc.pid, ioc.port
    returncode = ioc.stop()
    assert returncode is not None
    assert is_gone(pid)
    assert not accepts_tcp(port)
    assert ioc.stop() == returncode  # idempotent


def test_stop_after_the_ioc_died_on_its_own(prefix):
    with SimulatedIOC(prefix=prefix) as ioc:
        ioc.process.kill()
        ioc.process.wait()
    assert is_gone(ioc.pid)


def test_stop_without_start_is_harmless():
    assert SimulatedIOC().stop() is None


def test_two_iocs_at_once_get_their_own_ports(prefix):
    with (
        SimulatedIOC(prefix=f"{prefix}a:") as first,
        SimulatedIOC(prefix=f"{prefix}b:") as second,
    ):
        assert first.port != second.port
        assert first.repeater_port != second.repeater_port
        assert first.ca_env()["EPICS_CA_ADDR_LIST"] != second.ca_env()["EPICS_CA_ADDR_LIST"]
        both = (first.pv("dt"), second.pv("dt"))
        assert set(read_with_threading_client(merge_ca_env(first, second), *both)) == set(both)


def test_ca_env_names_only_this_ioc(prefix):
    with SimulatedIOC(prefix=prefix) as ioc:
        assert ioc.ca_env() == {
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": f"127.0.0.1:{ioc.port}",
            "EPICS_CA_REPEATER_PORT": str(ioc.repeater_port),
        }


def test_an_ioc_that_cannot_start_raises_with_its_log(prefix):
    ioc = SimulatedIOC("tests.iocs.no_such_ioc", prefix=prefix, cwd=REPO_ROOT)
    with pytest.raises(RuntimeError, match="No module named"):
        ioc.start()
    assert ioc.process.poll() is not None


def test_an_ioc_that_never_serves_the_ready_pv_times_out_and_is_stopped(prefix):
    ioc = SimulatedIOC(prefix=prefix, ready_pv="no_such_pv", startup_timeout=1.0)
    with pytest.raises(TimeoutError, match="not ready"):
        ioc.start()
    assert is_gone(ioc.pid)


def test_restart_keeps_the_address_clients_know(prefix):
    with SimulatedIOC(prefix=prefix) as ioc:
        env, first_pid = ioc.ca_env(), ioc.pid
        ioc.stop()
        assert not accepts_tcp(ioc.port)
        ioc.start()
        assert ioc.ca_env() == env
        assert ioc.pid != first_pid
        assert list(ioc.read("dt").data) == [3.0]
    assert is_gone(ioc.pid)


def test_starting_a_running_ioc_is_refused(prefix):
    with SimulatedIOC(prefix=prefix) as ioc:
        with pytest.raises(RuntimeError, match="already running"):
            ioc.start()

