"""Large readings (arrays of 64 KiB or more) leave the daemon through a socket of their own,
whose queue per client is short: a client that stops reading an image PV costs the daemon a
few images, not ten thousand (protocol Rule 4, daemon forwarder.py Rule 4)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from helpers import ask_by_hand, readings_in, wait_until

from pvhub import protocol as p
from pvhub.actors.loop import readings_frames
from pvhub.config import DEFAULT_LARGE_READINGS_HWM, ConfigError, default_large_readings_address, parse

BIG_BYTES = 50_000 * 8  # tests/iocs/zoo.py's ``big``: 50,000 float64


# --- the parts, without sockets ---------------------------------------------------------------


def _update(seq: int, value, *, snapshot: bool = False) -> p.Update:
    return p.Update(pv="D:image", epoch=1, seq=seq, connected=True, reading=p.Reading(value, 1.0 + seq),
                    snapshot=snapshot)


def test_a_message_with_a_large_array_goes_on_the_large_topic_and_others_on_the_topic():
    small = np.zeros(16)
    large = np.zeros(p.LARGE_BYTES // 8)
    assert readings_frames("D:image", [_update(1, small)])[0] == p.topic("D:image")
    assert readings_frames("D:image", [_update(1, 3.0), _update(2, 4.0)])[0] == p.topic("D:image")
    frames = readings_frames("D:image", [_update(1, large)])
    assert frames[0] == p.large_topic("D:image") == b"D:image\0L"
    # One large array makes the whole message large, a snapshot too.
    assert readings_frames("D:image", [_update(1, small), _update(2, large)])[0] == p.large_topic("D:image")
    assert readings_frames("D:image", [_update(1, large, snapshot=True)])[0] == p.large_topic("D:image")
    # A subscription to the PV's topic takes the large topic too (ZeroMQ matches prefixes),
    # and no other PV's.
    assert p.large_topic("D:image").startswith(p.topic("D:image"))
    assert not p.large_topic("D:imageX").startswith(p.topic("D:image"))


@pytest.mark.parametrize("readings, large", [
    ("tcp://127.0.0.1:5571", "tcp://127.0.0.1:5572"),
    ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
    ("tcp://[::1]:6000", "tcp://[::1]:6001"),
    ("ipc:///run/pvhub/readings", "ipc:///run/pvhub/readings.large"),
])
def test_large_readings_are_next_to_readings_by_default(readings, large):
    assert default_large_readings_address(readings) == large


def test_the_large_readings_settings_are_read_and_checked():
    config = parse({"daemon": {"large_readings": "tcp://127.0.0.1:7000", "large_readings_hwm": 4}})
    assert config.large_readings == "tcp://127.0.0.1:7000" and config.large_readings_hwm == 4
    assert parse({}).large_readings is None and parse({}).large_readings_hwm == DEFAULT_LARGE_READINGS_HWM
    for bad in (0, -1, True, "16", 1.5):
        with pytest.raises(ConfigError, match="large_readings_hwm"):
            parse({"daemon": {"large_readings_hwm": bad}})
    with pytest.raises(ConfigError, match="large_readings"):
        parse({"daemon": {"large_readings": 5572}})


# --- a daemon, an IOC and raw sockets ---------------------------------------------------------


class RawClient:
    """The daemon's two sockets, spoken to directly: requests on a DEALER, and a SUB per
    readings endpoint, so that a test sees which socket a reading came through."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(address)
        self._ids = itertools.count(1)
        hello = self.ask(lambda i: p.HelloRequest(id=i, client="large-readings-test"))
        assert isinstance(hello, p.HelloReply), hello
        assert hello.large_readings and hello.large_readings != hello.readings
        self.readings, self.large_readings = hello.readings, hello.large_readings

    def ask(self, build, timeout: float = 5.0) -> p.Message | None:
        return ask_by_hand(self.dealer, next(self._ids), build, timeout)

    def sub(self, endpoint: str, *pvs: str, rcvhwm: int = 1000, rcvbuf: int = -1) -> zmq.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, rcvbuf)
        for pv in pvs:
            sock.setsockopt(zmq.SUBSCRIBE, p.topic(pv))
        sock.connect(endpoint)
        return sock

    def publish(self, pv: str) -> None:
        """Have the PV's actor publish its state (and hold the PV)."""
        assert isinstance(self.ask(lambda i: p.ReadRequest(id=i, pv=pv, publish=True), 10), p.Snapshot)

    def set(self, pv: str, value) -> None:
        wait_until(lambda: getattr(self.ask(lambda i: p.ReadRequest(id=i, pv=pv)), "connected", False), 10,
                   interval=0.05, message=f"{pv} connected")
        assert isinstance(self.ask(lambda i: p.SetRequest(id=i, pv=pv, value=value), 10), p.SetDone)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def received(sock: zmq.Socket, within: float) -> list[tuple[bytes, list[p.Message]]]:
    """(topic, messages) of what ``sock`` got within ``within`` seconds."""
    got = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            topic, *payloads = sock.recv_multipart()
            got.append((topic, readings_in(payloads)))
    return got


def published_and_seen(client: RawClient, pv: str, sock: zmq.Socket) -> bool:
    client.publish(pv)
    return any(p.pv_from_topic(topic.rstrip(p.LARGE_MARK)) == pv for topic, _ in received(sock, 0.3))


@pytest.fixture
def raw(zoo_ioc, hub_factory):
    daemon = hub_factory(zoo_ioc)
    client = RawClient(daemon.address)
    client.publish(zoo_ioc.pv("big"))
    yield daemon, client
    client.close()


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_pvs_messages_leave_through_the_large_socket_from_its_first_large_one_on(zoo_ioc, raw):
    daemon, client = raw
    big, wave = zoo_ioc.pv("big"), zoo_ioc.pv("wave")
    client.publish(wave)
    normal = client.sub(client.readings, big, wave)
    large = client.sub(client.large_readings, big, wave)
    # The subscriptions reach the daemon when the connections do: published until seen.
    wait_until(lambda: published_and_seen(client, big, large), 10, message="no large reading of big")
    wait_until(lambda: published_and_seen(client, wave, normal), 10, message="no reading of wave")
    received(normal, 0.2), received(large, 0.2)  # what was still on its way
    client.set(wave, [1.0] * 16)
    client.publish(big)
    zoo_ioc.stop()  # big's disconnection is a small message: it must not overtake big's values
    on_large = received(large, 3.0)
    on_normal = received(normal, 0.5)
    assert {topic for topic, _ in on_normal} == {p.topic(wave)}, on_normal
    assert any(m.connected for topic, ms in on_large for m in ms if topic == p.large_topic(big))
    disconnections = [m for topic, ms in on_large for m in ms if not getattr(m, "connected", True)]
    assert {m.pv for m in disconnections} == {big}, on_large
    assert [t for t, _ in on_large if t == p.topic(big)], "no message of big on its plain topic came this way"
    # Seqs through the large socket are in order: nothing overtook anything.
    seqs = [m.seq for _, ms in on_large for m in ms if m.pv == big]
    assert seqs == sorted(seqs)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.system
@pytest.mark.timeout(90)
def test_a_client_that_stops_reading_costs_the_daemon_a_few_images_not_thousands(zoo_ioc, raw):
    """What waits for a stopped client is ``large_readings_hwm`` images at most (16 of
    400 kB here); with the readings' ten thousand it would be every image of the test."""
    daemon, client = raw
    big = zoo_ioc.pv("big")
    healthy = client.sub(client.large_readings, big)
    stopped = client.sub(client.large_readings, big, rcvhwm=1, rcvbuf=4096)
    client.set(zoo_ioc.pv("big_rate"), 20.0)
    # Both are subscribed once each has had an image; from then on ``stopped`` reads nothing.
    wait_until(lambda: stopped.poll(100) and stopped.recv_multipart(), 15, message="stopped got no image")
    wait_until(lambda: received(healthy, 0.2), 15, message="healthy got no image")
    before = _rss_bytes(daemon.pid)
    images = 0
    deadline = time.monotonic() + 40
    while images < 120 and time.monotonic() < deadline:
        images += sum(1 for _, messages in received(healthy, 0.5) for m in messages
                      if isinstance(m, p.Update) and m.reading is not None)
    grown = _rss_bytes(daemon.pid) - before
    assert images >= 120, f"the IOC sent {images} images in 40 s"
    # 120 images are 48 MB: queued for ``stopped`` they would show; 16 are 6.4 MB.
    assert grown < 24 * 2**20, f"the daemon grew {grown / 2**20:.1f} MiB while a client read nothing"
