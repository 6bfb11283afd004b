"""Ports the test harness picks (``pvhub.testing``, Rule 5 of ``ioc.py`` and of
``daemon.py``): one is only free when picked, and another process may bind it before the IOC
or the daemon does. Each test makes that race happen on purpose: the harness's next pick is a
port the test holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import is_gone

from pvhub.testing import LOOPBACK, DaemonProcess, SimulatedIOC
from pvhub.testing import daemon as daemon_harness
from pvhub.testing import ioc as ioc_harness

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parent.parent


def held_tcp() -> socket.socket:
    """A listening TCP socket on a port of the kernel's choice."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    return sock


def pick_first(monkeypatch: pytest.MonkeyPatch, module: object, picker: str, first: object) -> list:
    """Make ``module.picker``'s next pick ``first`` (a port or address the test holds), as if
    another process had bound it between the pick and the bind; later picks are real ones.
    Returns every pick, in order."""
    real, picked = getattr(module, picker), []

    def pick(*args: object) -> object:
        picked.append(first if not picked else real(*args))
        return picked[-1]

    monkeypatch.setattr(module, picker, pick)
    return picked


# --- IOCs -------------------------------------------------------------------------------------


def test_rsrv_finding_its_udp_port_taken_is_started_on_another(prefix, monkeypatch):
    # EPICS base's server cannot bind its UDP search socket beside one bound without
    # SO_REUSEADDR: it prints "CAS: No TCP server started" and suspends, never exiting.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind((LOOPBACK, 0))
        taken = held.getsockname()[1]
        picked = pick_first(monkeypatch, ioc_harness, "_free_ca_server_port", taken)
        ioc = SimulatedIOC("tests.iocs.rsrv", prefix=prefix, ready_pv="motor", cwd=REPO_ROOT)
        with ioc:
            assert picked[0] == taken and len(picked) == 2
            assert ioc.port == picked[1] != taken
            assert ioc.read("motor").data[0] == 0.0
            assert "No TCP server started" not in ioc.log_text()
        assert is_gone(ioc.pid)


def test_caproto_finding_its_tcp_port_taken_is_started_on_another(prefix, monkeypatch):
    # caproto serves on a random TCP port when its own is taken, and says so only in the
    # port its search replies name.
    with held_tcp() as held:
        taken = held.getsockname()[1]
        picked = pick_first(monkeypatch, ioc_harness, "_free_ca_server_port", taken)
        with SimulatedIOC(prefix=prefix) as ioc:
            assert picked[0] == taken and len(picked) == 2
            assert ioc.port == picked[1] != taken
            assert list(ioc.read("dt").data) == [3.0]


def test_caproto_finding_its_udp_port_taken_is_started_on_another(prefix, monkeypatch):
    # A socket bound without SO_REUSEADDR (as the tests' own caproto clients bind theirs,
    # helpers.plain_search_socket) makes caproto's IOC exit: "Address already in use".
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("", 0))
        taken = held.getsockname()[1]
        picked = pick_first(monkeypatch, ioc_harness, "_free_ca_server_port", taken)
        with SimulatedIOC(prefix=prefix) as ioc:
            assert picked[0] == taken and len(picked) == 2
            assert ioc.port == picked[1] != taken
            assert list(ioc.read("dt").data) == [3.0]


def test_a_restart_on_a_taken_port_fails_rather_than_move(prefix):
    # Clients know the first address (ca_env); an IOC that moved would be one they never find.
    ioc = SimulatedIOC(prefix=prefix).start()
    port = ioc.port
    ioc.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind((LOOPBACK, port))
        held.listen()
        with pytest.raises(RuntimeError, match="did another process take the port"):
            ioc.start()
    assert is_gone(ioc.pid)
    assert ioc.port == port


# --- daemons -----------------------------------------------------------------------------------


def test_a_daemon_finding_its_picked_address_taken_is_started_on_another(monkeypatch, tmp_path):
    with held_tcp() as held:
        taken = f"tcp://{LOOPBACK}:{held.getsockname()[1]}"
        picked = pick_first(monkeypatch, daemon_harness, "_picked_address", taken)
        with DaemonProcess(directory=tmp_path) as daemon:
            assert picked[0] == taken and len(picked) == 2
            assert daemon.address == picked[1] != taken
            assert daemon.running()
            # The first attempt's refusal is in the log, for whoever wonders about the gap.
            assert f"cannot bind {taken}: Address already in use" in daemon.log_text()
        assert is_gone(daemon.pid)


def test_a_daemon_given_a_taken_address_fails_rather_than_move(tmp_path):
    with held_tcp() as held:
        taken = f"tcp://{LOOPBACK}:{held.getsockname()[1]}"
        daemon = DaemonProcess(address=taken, directory=tmp_path)
        with pytest.raises(RuntimeError, match="Address already in use"):
            daemon.start()
        assert daemon.address == taken
        assert is_gone(daemon.pid)
