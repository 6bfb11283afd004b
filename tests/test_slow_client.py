"""A client that stops reading slows nobody: the daemon's queue for it is bounded, it learns
what it missed (a counter on the Signal), and it resyncs to the latest value."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO

pytestmark = pytest.mark.system

CLIENT = Path(__file__).with_name("slow_client.py")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(120)
def test_slow_client_misses_updates_others_do_not(zoo_ioc, hub_factory, prefix, monkeypatch):
    daemon = hub_factory(zoo_ioc, args=["--readings-hwm", "20"])
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    big = EpicsSignalRO(f"{prefix}big", name="big")
    big.wait_for_connection(timeout=15)
    counts: list[float] = []
    big.subscribe(lambda value, **kw: counts.append(float(value[0])))
    env = {**os.environ, "PVHUB_ADDRESS": daemon.address, "PV": f"{prefix}big"}
    slow = subprocess.Popen([sys.executable, str(CLIENT)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout.readline().strip() == "subscribed"
        EpicsSignal(f"{prefix}big_rate", name="rate").set(25).wait(5)  # 25 x 400 kB per second
        wait_until(lambda: len(counts) > 10, 10)
        before = rss_mb(daemon.pid)
        slow.send_signal(signal.SIGSTOP)
        stopped_at = len(counts)
        try:
            # Long enough for ~100 updates: far past what the socket buffers and the
            # daemon's 20-reading queue for this client can hold.
            wait_until(lambda: len(counts) > stopped_at + 100, 20)
            grown = rss_mb(daemon.pid) - before
        finally:
            slow.send_signal(signal.SIGCONT)
        assert grown < 60, f"the daemon grew {grown:.0f} MB for one stalled client"

        def caught_up():
            line = slow.stdout.readline()
            report = json.loads(line) if line.startswith("{") else None
            return report if report and report["missed"] > 0 and report["last"] is not None \
                and report["last"] >= counts[-1] - 5 else None

        report = wait_until(caught_up, 30, interval=0, message="the slow client never caught up")
        assert report["gaps"] >= 1
    finally:
        slow.kill()
        slow.wait()
        EpicsSignal(f"{prefix}big_rate", name="rate").set(0).wait(5)
    # The client that kept reading got every update, in order.
    steps = {b - a for a, b in zip(counts, counts[1:])}
    assert steps == {1.0}, [(i, a, b) for i, (a, b) in enumerate(zip(counts, counts[1:])) if b - a != 1][:5]
    assert big.missed_updates == 0
