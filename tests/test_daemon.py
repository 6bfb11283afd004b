"""The daemon as a process: hello, groups, bad input, clean stops, no orphans."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import zmq
from helpers import alive, children_of, wait_for_put_in_flight, wait_until

from pvhub import protocol as p
from pvhub.client import EpicsSignal, EpicsSignalRO

pytestmark = pytest.mark.system


class RawClient:
    """A bare DEALER speaking the wire protocol by hand, for what a Signal never sends."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, payload: bytes | list[bytes]) -> None:
        if isinstance(payload, list):
            self.sock.send_multipart(payload)
        else:
            self.sock.send(payload)

    def receive(self, timeout: float = 5.0) -> p.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return p.decode(self.sock.recv())

    def ask(self, message: p.Message, timeout: float = 5.0) -> p.Message:
        self.send(p.encode(message))
        return self.receive(timeout)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def pooled_hub(zoo_ioc, hub_factory, monkeypatch):
    """A daemon with the default pool (two processes at least), unlike ``hub``'s one."""
    daemon = hub_factory(zoo_ioc)
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    yield daemon
    from pvhub.client import close_hubs

    close_hubs()


@pytest.fixture
def raw(hub):
    client = RawClient(hub.address)
    yield client
    client.close()


def test_hello_names_the_readings_endpoint(raw):
    reply = raw.ask(p.HelloRequest(id=1, client="test"))
    assert isinstance(reply, p.HelloReply)
    assert reply.id == 1 and reply.protocol == p.PROTOCOL_VERSION
    assert reply.readings.startswith("tcp://127.0.0.1:")
    assert reply.large_readings.startswith("tcp://127.0.0.1:") and reply.large_readings != reply.readings
    assert reply.server_version


def test_bad_messages_get_errors_and_the_daemon_goes_on(raw, prefix):
    raw.send(b"\xc1 not msgpack")
    assert raw.receive().code == "bad_message"
    raw.send(msgpack.packb({"v": 99, "op": "read", "id": 5, "pv": "x"}))
    reply = raw.receive()
    assert (reply.code, reply.id) == ("unsupported_version", 5)
    raw.send(msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "launch", "id": 6}))
    assert raw.receive().id == 6
    raw.send(msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "read", "id": 7}))
    reply = raw.receive()
    assert reply.id == 7 and "pv" in reply.message
    raw.send([b"two", b"frames"])  # an envelope the broker does not expect: dropped, logged
    reply = raw.ask(p.ReadRequest(id=8, pv="has space"))
    assert (reply.code, reply.id) == ("pv_not_allowed", 8)
    reply = raw.ask(p.Snapshot(id=9, pv="x", epoch=1, seq=1, connected=True))
    assert (reply.code, reply.id) == ("unknown_operation", 9)
    # Still serving, and a real request still works.
    reply = raw.ask(p.ReadRequest(id=10, pv=f"{prefix}dt"), timeout=10)
    assert isinstance(reply, p.Snapshot) and reply.id == 10


def test_a_client_of_an_older_protocol_is_told_why_in_its_own_version(raw):
    # A version 1 client cannot read readings in ``Updates``: it is refused at its hello, in
    # a reply it can decode (same fields, its version), not in one it would drop unread.
    old = p.PROTOCOL_VERSION - 1
    raw.send(msgpack.packb({"v": old, "op": "hello", "id": 3, "client": "old"}))
    assert raw.sock.poll(5000), "no reply"
    body = msgpack.unpackb(raw.sock.recv())
    assert (body["v"], body["op"], body["id"], body["code"]) == (old, "error", 3, "unsupported_version")
    assert f"protocol version {old} is not supported" in body["message"]
    # A version from the future gets ours: we cannot know its shapes.
    raw.send(msgpack.packb({"v": p.PROTOCOL_VERSION + 5, "op": "hello", "id": 4}))
    reply = raw.receive()
    assert (reply.code, reply.id) == ("unsupported_version", 4)


def test_client_vanishing_mid_request_harms_nobody(hub, prefix):
    quitter = RawClient(hub.address)
    quitter.send(p.encode(p.SetRequest(id=1, pv=f"{prefix}slow", value=1.0)))
    quitter.close()
    motor = EpicsSignal(f"{prefix}motor", name="m")
    motor.wait_for_connection(timeout=15)
    motor.set(2).wait(5)
    assert motor.get() == 2.0


def test_group_config_puts_pvs_in_one_process(zoo_ioc, hub_factory, prefix, tmp_path, monkeypatch):
    config = tmp_path / "pvhub.toml"
    config.write_text(
        f'[pvs]\nallow = ["{prefix}*"]\nstart = ["{prefix}dt"]\n'
        f'[actors]\npool_size = 1\n'
        f'[groups.motion]\npvs = ["{prefix}motor", "{prefix}count"]\n'
    )
    daemon = hub_factory(zoo_ioc, args=["--config", str(config)])
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    raw = RawClient(daemon.address)
    try:
        status = raw.ask(p.StatusRequest(id=1)).status
        actors = {a["actor"]: a for a in status["actors"]}
        # READY came after the configured actors were up: the pool, and the group.
        assert set(actors) == {"pool:0", "group:motion"}
        assert all(a["ready"] and a["pid"] for a in actors.values())
        assert actors["group:motion"]["pvs"] == [f"{prefix}count", f"{prefix}motor"]
        assert actors["pool:0"]["pvs"] == [f"{prefix}dt"]
        refused = raw.ask(p.ReadRequest(id=2, pv="elsewhere:pv"))
        assert refused.code == "pv_not_allowed"
    finally:
        raw.close()
    motor = EpicsSignal(f"{prefix}motor", name="m")
    count = EpicsSignal(f"{prefix}count", name="c")
    motor.wait_for_connection(timeout=15)
    count.wait_for_connection(timeout=15)
    motor.set(3).wait(5)
    count.set(4).wait(5)
    assert (motor.get(), count.get()) == (3.0, 4)
    assert len(children_of(daemon.pid)) == 2


def test_sigterm_stops_everything_and_exits_0(pooled_hub, prefix):
    hub = pooled_hub
    for name in ("dt", "motor", "x"):
        EpicsSignalRO(f"{prefix}{name}", name=name).wait_for_connection(timeout=15)
    actors = children_of(hub.pid)
    assert len(actors) >= 2  # the pool, started with the daemon
    started = time.monotonic()
    assert hub.stop() == 0
    assert time.monotonic() - started < 10
    wait_until(lambda: not any(alive(pid) for pid in actors), 5, message="actors outlived the daemon")
    assert "daemon_stopped" in hub.log_text()
    assert "STOPPING=1" in hub.notifications


def test_sigint_stops_it_like_sigterm(hub, prefix):
    EpicsSignalRO(f"{prefix}dt", name="dt").wait_for_connection(timeout=15)
    actors = children_of(hub.pid)
    os.kill(hub.pid, signal.SIGINT)
    assert hub.process.wait(10) == 0
    wait_until(lambda: not any(alive(pid) for pid in actors), 5, message="actors outlived the daemon")


def test_actors_exit_when_the_daemon_is_killed(pooled_hub, prefix):
    hub = pooled_hub
    for name in ("dt", "motor"):
        EpicsSignalRO(f"{prefix}{name}", name=name).wait_for_connection(timeout=15)
    actors = children_of(hub.pid)
    assert len(actors) >= 2
    os.kill(hub.pid, signal.SIGKILL)
    hub.process.wait(5)
    wait_until(lambda: not any(alive(pid) for pid in actors), 5, message="orphaned actors")


def test_requests_to_a_dead_actor_fail_clearly(hub, prefix):
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.wait_for_connection(timeout=15)
    delay.set(30).wait(5)
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    status = slow.set(1)
    wait_for_put_in_flight(hub, f"{prefix}slow")
    raw = RawClient(hub.address)
    try:
        pids = {pv["pv"]: pv["pid"] for pv in raw.ask(p.StatusRequest(id=1)).status["pvs"]}
    finally:
        raw.close()
    os.kill(pids[f"{prefix}slow"], signal.SIGKILL)
    with pytest.raises(ConnectionError, match="outcome is unknown"):
        status.wait(5)
