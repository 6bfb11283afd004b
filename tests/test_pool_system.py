"""Pooled actors with real processes: PVs share processes, a PV that kills its process is
quarantined while the others go on, and no actor ever outlives its daemon."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from helpers import daemon_status as status
from helpers import log_events, wait_until

from pvhub import protocol as p
from pvhub.client import EpicsSignal, EpicsSignalRO
from pvhub.testing import LOOPBACK, free_tcp_port

pytestmark = pytest.mark.system


def test_many_pvs_share_the_pooled_processes(hub, prefix):
    names = ["dt", "x", "motor", "count", "wave", "text", "mode", "ro"]
    signals = [EpicsSignalRO(f"{prefix}{name}", name=name) for name in names]
    for sig in signals:
        sig.wait_for_connection(timeout=15)
    entries = {e["pv"]: e for e in status()["pvs"]}
    owners = {entries[f"{prefix}{name}"]["actor"] for name in names}
    # One device prefix: one pooled process, started with the daemon (no spawn per PV).
    assert len(owners) == 1 and owners.pop().startswith("pool:")
    assert len(log_events(hub, "actor_spawned")) == len([a for a in status()["actors"] if a["kind"] == "pool"])


def test_a_pv_that_kills_its_process_is_quarantined_and_the_others_go_on(zoo_ioc, hub_factory, prefix, monkeypatch):
    bad = f"{prefix}bad:pv"
    hub = hub_factory(zoo_ioc, args=[], env={"PVHUB_FAULT_EXIT_ON_ADOPT": bad})
    monkeypatch.setenv("PVHUB_ADDRESS", hub.address)
    good = [EpicsSignal(f"{prefix}{name}", name=name) for name in ("motor", "count", "dt")]
    held = EpicsSignalRO(bad, name="bad")  # asked for, like any PV (and held: client hub.py Rule 7)
    wait_until(lambda: next((e["quarantined"] for e in status()["pvs"] if e["pv"] == bad), False), 40, interval=0.1,
               message=lambda: f"not quarantined: {status()['actors']}")
    quarantined = [e for e in log_events(hub, "pvs_quarantined") if bad in e["pvs"]]
    assert quarantined and quarantined[-1]["actor"] == f"pv:{bad}"
    for sig in good:
        sig.wait_for_connection(timeout=15)
    good[0].set(1.25).wait(5)
    assert good[0].get() == 1.25
    entries = {e["pv"]: e for e in status()["pvs"]}
    assert not any(entries[sig.pvname]["quarantined"] for sig in good)
    assert all(entries[sig.pvname]["actor"] != f"pv:{bad}" for sig in good)
    assert not held.connected


# --- no orphans ---------------------------------------------------------------------------------


def actors_of(daemon_pid: int) -> list[int]:
    """Living processes started as actors of the daemon ``daemon_pid`` (by their command
    line, which names it: they are found even once they have lost it as their parent)."""
    mark = f"--parent-pid\0{daemon_pid}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if mark in cmdline and state != "Z":
            found.append(int(entry))
    return found


def test_no_actor_outlives_a_daemon_killed_while_it_starts_them(tmp_path, prefix):
    """The daemon is SIGKILLed at a random moment of its start (its pool being spawned) or
    of a burst of new PVs that grows the pool by a process every 2 PVs, many times: every
    actor is gone within a second, whatever it was doing then."""
    config = tmp_path / "pvhub.toml"
    config.write_text("[actors]\npool_size = 2\nmax_pvs_per_actor = 2\n")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "NOTIFY_SOCKET"))}
    env.update(EPICS_CA_AUTO_ADDR_LIST="NO", EPICS_CA_ADDR_LIST=f"{LOOPBACK}:{free_tcp_port()}")
    ctx = zmq.Context()
    try:
        for attempt in range(8):
            address = f"tcp://{LOOPBACK}:{free_tcp_port()}"
            daemon = subprocess.Popen(
                [sys.executable, "-m", "pvhub", "serve", "--address", address, "--readings",
                 f"tcp://{LOOPBACK}:*", "--config", str(config), "--log-level", "warning"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                if attempt % 2:  # during a burst of new PVs, once it answers
                    dealer = ctx.socket(zmq.DEALER)
                    dealer.setsockopt(zmq.LINGER, 0)
                    dealer.connect(address)
                    dealer.send(p.encode(p.HelloRequest(id=0, client="burst")))
                    assert dealer.poll(20_000), "the daemon never answered"
                    dealer.recv()
                    for i in range(40):
                        dealer.send(p.encode(p.ReadRequest(id=i + 1, pv=f"{prefix}burst{attempt}:{i}")))
                    wait_until(lambda: len(actors_of(daemon.pid)) > 2, 10, interval=0.005)
                    time.sleep(rng.uniform(0.0, 0.3))  # the moment of the kill is what varies
                    dealer.close()
                else:  # during its start, while the pool is being spawned
                    wait_until(lambda: actors_of(daemon.pid), 10, interval=0.002)
                    time.sleep(rng.uniform(0.0, 0.2))
                seen = set(actors_of(daemon.pid))
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(5)
                killed = time.monotonic()
                wait_until(lambda: not actors_of(daemon.pid), 1.0, interval=0.01,
                           message=lambda: f"actors outlived their daemon: {actors_of(daemon.pid)} (seen {seen})")
                assert time.monotonic() - killed <= 1.0
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
                for pid in actors_of(daemon.pid):
                    os.kill(pid, signal.SIGKILL)
    finally:
        ctx.term()
