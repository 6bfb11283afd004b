"""A thousand clients that connect, subscribe and vanish leave the daemon as it was: memory,
file descriptors and processes flat, every client forgotten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq
from helpers import daemon_status, readings_in, wait_until

from pvhub import protocol as p
from pvhub.client import EpicsSignalRO

pytestmark = pytest.mark.system

CYCLES = 1000
# The clients take these PVs in turn: a PV publishes a snapshot at most once per 50 ms
# (``SNAPSHOT_SPACING_S``, actors/loop.py): clients one after another on one PV would each wait.
PVS = ("dt", "motor", "count", "wave", "text", "mode", "ro", "chars")


def resources(pid: int) -> tuple[float, int, int]:
    """(RSS in MB, open file descriptors, child processes) of ``pid``."""
    rss = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = sum(1 for entry in os.listdir("/proc") if entry.isdigit() and _ppid(entry) == pid)
    return rss, fds, children


def _ppid(entry: str) -> int | None:
    try:
        return int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def one_client(ctx: zmq.Context, address: str, pv: str) -> None:
    """Connect, say hello, subscribe, get a snapshot and a published update, vanish."""
    dealer = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    for sock in (dealer, sub):
        sock.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(address)
        dealer.send(p.encode(p.HelloRequest(id=1, client="churn")))
        assert dealer.poll(5000)
        hello = p.decode(dealer.recv())
        sub.setsockopt(zmq.SUBSCRIBE, p.topic(pv))
        sub.connect(hello.readings)
        for attempt in range(50):  # proves the subscription, as the client library does
            dealer.send(p.encode(p.ReadRequest(id=2 + attempt, pv=pv, publish=True)))
            assert dealer.poll(5000)
            assert isinstance(p.decode(dealer.recv()), p.Snapshot)
            if sub.poll(20):
                assert all(isinstance(m, p.Update) for m in readings_in(sub.recv_multipart()[1:]))
                return
        raise AssertionError(f"the subscription to {pv} never delivered")
    finally:
        dealer.close()
        sub.close()


@pytest.mark.timeout(180)
def test_a_thousand_vanishing_clients_leave_nothing_behind(hub, prefix):
    pvs = [f"{prefix}{name}" for name in PVS]
    for pv in pvs:
        EpicsSignalRO(pv, name="pv").wait_for_connection(timeout=15)
    ctx = zmq.Context()
    try:
        for n in range(100):  # warm up: allocator pools, socket tables
            one_client(ctx, hub.address, pvs[n % len(pvs)])
        wait_until(lambda: _clients() == 1, 15, message="warm-up clients not forgotten")
        before = resources(hub.pid)
        for n in range(CYCLES):
            one_client(ctx, hub.address, pvs[n % len(pvs)])
        wait_until(lambda: _clients() == 1, 20, message=lambda: f"{_clients()} clients remembered")
    finally:
        ctx.term()
    after = resources(hub.pid)
    rss_growth = after[0] - before[0]
    assert rss_growth < 8, f"RSS grew {rss_growth:.1f} MB over {CYCLES} clients"
    assert after[1] <= before[1] + 2, f"file descriptors {before[1]} -> {after[1]}"
    assert after[2] == before[2], f"child processes {before[2]} -> {after[2]}"


def _clients() -> int:
    return len(daemon_status()["clients"])
