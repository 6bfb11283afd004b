"""The client's side of safety: request deadlines, replies the daemon lost, a dead I/O thread,
and CURVE keys.

The deadline, ``Pong.lost`` and CURVE tests talk to a daemon made by hand here (a ROUTER and
an XPUB on loopback that answer hello and pings and do as each test says with the rest):
they test the client's rules, which no real daemon can be made to break on cue. The dead
I/O thread is tested against a real daemon and a real IOC.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from helpers import wait_for_put_in_flight, wait_until
from zmq.auth.thread import ThreadAuthenticator

from pvhub import keys
from pvhub import protocol as p
from pvhub.client import EpicsSignal
from pvhub.client import requests as requests_module
from pvhub.client.hub import Hub
from pvhub.client.registry import get_hub
from pvhub.client.requests import RequestDeadlines
from pvhub.errors import HubUnavailableError, PvhubTimeoutError
from pvhub.keys import KeyFileError

pytestmark = pytest.mark.timeout(60)


class HandMadeDaemon:
    """A ROUTER for requests and an XPUB for readings, on loopback ports of their own.

    Hello and ping are answered; a read of a PV in ``answer`` gets a snapshot, every other
    request is only recorded (in ``requests``, with the sender's ``User-Id``). The next
    pong carries ``lost`` when it is set.
    """

    def __init__(self, *, server_secret: bytes | None = None, clients: Path | None = None) -> None:
        self.ctx = zmq.Context()
        self.authenticator: ThreadAuthenticator | None = None
        if server_secret is not None:
            self.authenticator = ThreadAuthenticator(self.ctx)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=str(clients))
        self.router = self.ctx.socket(zmq.ROUTER)
        self.xpub = self.ctx.socket(zmq.XPUB)
        for sock in (self.router, self.xpub):
            sock.setsockopt(zmq.LINGER, 0)
            if server_secret is not None:
                sock.curve_server = True
                sock.curve_secretkey = server_secret
        self.router.bind("tcp://127.0.0.1:*")
        self.xpub.bind("tcp://127.0.0.1:*")
        self.address = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.readings = self.xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.answer: set[str] = set()
        self.lost: list[int] | None = None
        self.requests: list[tuple[p.Message, str | None]] = []
        self.hellos = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hand-made daemon", daemon=True)

    def __enter__(self) -> HandMadeDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.router.close()
        self.xpub.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()

    def received(self, kind: type[p.Message]) -> list[p.Message]:
        return [message for message, _ in list(self.requests) if isinstance(message, kind)]

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.xpub, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(20))
            if self.xpub in ready:
                self.xpub.recv()  # subscriptions: nothing is published here
            if self.router not in ready:
                continue
            identity, frame = self.router.recv_multipart(copy=False)
            message = p.decode(frame.bytes)
            self.requests.append((message, _user_id(frame)))
            reply: p.Message | None = None
            if isinstance(message, p.HelloRequest):
                reply = p.HelloReply(id=message.id, readings=self.readings, server_version="hand-made",
                                     client=identity.bytes)
                self.hellos.set()
            elif isinstance(message, p.PingRequest):
                lost, self.lost = self.lost, None
                reply = p.Pong(id=message.id, lost=lost)
            elif isinstance(message, p.ReadRequest) and message.pv in self.answer:
                reply = p.Snapshot(id=message.id, pv=message.pv, epoch=1, seq=0, connected=True,
                                   reading=p.Reading(value=1.5, timestamp=time.time()))
            if reply is not None:
                self.router.send_multipart([identity.bytes, p.encode(reply)])


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler (no CURVE): no User-Id
        return None


@pytest.fixture
def hand_made():
    with HandMadeDaemon() as daemon:
        yield daemon


@pytest.fixture
def client(hand_made):
    hub = Hub(hand_made.address, name="deadline test")
    hub.wait_for_hello(10)
    yield hub
    hub.close()


def read(pv: str):
    return lambda rid: p.ReadRequest(id=rid, pv=pv)


# --- deadlines ----------------------------------------------------------------------------------


def test_a_request_unanswered_within_its_timeout_fails_and_its_late_reply_is_ignored(hand_made, client):
    started = time.monotonic()
    future = client.request(read("X:swallowed"), timeout=0.3)
    error = future.exception(5)
    elapsed = time.monotonic() - started
    assert isinstance(error, PvhubTimeoutError) and isinstance(error, TimeoutError)
    assert 0.3 <= elapsed < 1.5
    (request,) = hand_made.received(p.ReadRequest)
    assert str(error) == (f"request {request.id} (read X:swallowed) got no reply from the pvhub daemon at "
                          f"{hand_made.address} within 0.3 s")
    # The request is forgotten: its reply, coming now, reaches no one and breaks nothing.
    hand_made.answer.add("X:late")
    answered = client.request(read("X:late"), timeout=5)
    assert isinstance(answered.result(5), p.Snapshot)
    assert future.exception() is error


def test_reads_get_a_default_deadline_and_sets_none(hand_made, client, monkeypatch):
    monkeypatch.setattr(requests_module, "REQUEST_TIMEOUT", 0.3)
    a_read = client.request(read("X:swallowed"))
    a_set = client.request(lambda rid: p.SetRequest(id=rid, pv="X:motor", value=1.0))
    unbounded = client.request(read("X:swallowed"), timeout=math.inf)
    assert isinstance(a_read.exception(5), PvhubTimeoutError)
    # Both others were sent with the read and so had the same time to expire.
    wait_until(lambda: len(hand_made.received(p.ReadRequest)) == 2 and hand_made.received(p.SetRequest), 5)
    started = time.monotonic()
    while time.monotonic() - started < 0.5:  # well past the read's deadline
        assert not a_set.done() and not unbounded.done()
        time.sleep(0.05)
    client.close()
    assert isinstance(a_set.exception(5), HubUnavailableError)


def test_call_fails_with_a_timeout_naming_the_request(hand_made, client):
    with pytest.raises(PvhubTimeoutError, match=r"request \d+ \(status\) got no reply .* within 0\.\d+ s"):
        client.call(lambda rid: p.StatusRequest(id=rid), timeout=0.4)


def test_a_negative_timeout_is_refused(client):
    with pytest.raises(ValueError, match="timeout"):
        client.request(read("X:any"), timeout=-1)


def test_many_deadlines_expire_in_order_and_answered_ones_cost_nothing(hand_made, client):
    hand_made.answer.add("X:answered")
    answered = [client.request(read("X:answered"), timeout=30) for _ in range(3000)]
    assert all(isinstance(f.result(20), p.Snapshot) for f in answered)
    short = client.request(read("X:swallowed"), timeout=0.2)
    longer = client.request(read("X:swallowed"), timeout=1.0)
    assert isinstance(short.exception(5), PvhubTimeoutError)
    assert not longer.done()
    assert isinstance(longer.exception(5), PvhubTimeoutError)
    assert not any(f.exception() for f in answered)


def test_deadlines_expire_by_time_and_skip_answered_requests_without_a_clock():
    deadlines = RequestDeadlines()
    pending = {1: "read", 2: "status", 3: "read"}
    deadlines.add(1, 5.0, "read A", now=100.0, pending=pending)
    deadlines.add(2, 1.0, "status", now=100.0, pending=pending)
    deadlines.add(3, 2.0, "read B", now=100.0, pending=pending)
    assert deadlines.expired(100.9, pending) == []
    assert deadlines.expired(101.0, pending) == [(2, 1.0, "status")]
    del pending[2], pending[3]  # 3 answered in time: never reported
    assert deadlines.expired(104.0, pending) == []
    assert len(deadlines) == 1
    assert deadlines.expired(200.0, pending) == [(1, 5.0, "read A")]
    assert len(deadlines) == 0


def test_deadlines_of_answered_requests_do_not_pile_up():
    deadlines = RequestDeadlines()
    pending: dict[int, str] = {}
    for request_id in range(50_000):  # each answered before the next is sent
        pending[request_id] = "read"
        deadlines.add(request_id, 60.0, "read", now=0.0, pending=pending)
        del pending[request_id]
    assert len(deadlines) <= 2 * len(pending) + RequestDeadlines.SLACK + 1
    pending[-1] = "read"
    deadlines.add(-1, 60.0, "read", now=0.0, pending=pending)
    assert deadlines.expired(60.0, pending) == [(-1, 60.0, "read")]


# --- replies the daemon could not deliver -------------------------------------------------------


def test_a_pong_naming_lost_replies_fails_exactly_those_requests(hand_made, client):
    first = client.request(read("X:one"), timeout=math.inf)
    second = client.request(read("X:two"), timeout=math.inf)
    wait_until(lambda: len(hand_made.received(p.ReadRequest)) == 2, 5)
    ids = {message.pv: message.id for message in hand_made.received(p.ReadRequest)}
    hand_made.lost = [ids["X:one"], 999_999]  # an id the client never used is ignored
    error = first.exception(2 * p.CLIENT_HEARTBEAT_S + 3)
    assert isinstance(error, HubUnavailableError)
    assert str(error) == (f"the pvhub daemon could not deliver the reply to request {ids['X:one']} (this client "
                          "did not read its replies fast enough); the outcome is unknown")
    wait_until(lambda: hand_made.lost is None, 5)  # that pong went out, and was read
    pings = len(hand_made.received(p.PingRequest))
    wait_until(lambda: len(hand_made.received(p.PingRequest)) > pings, 2 * p.CLIENT_HEARTBEAT_S + 3)
    assert not second.done()


# --- CURVE ------------------------------------------------------------------------------------


@pytest.fixture
def curve_keys(tmp_path):
    clients = tmp_path / "clients"
    clients.mkdir(mode=0o700)
    server_public, server_secret = keys.generate("server", tmp_path / "server")
    client_public, client_secret = keys.generate("beamline_user", tmp_path / "client")
    (clients / "beamline_user.key").write_text(client_public.read_text())
    return {"clients": clients, "server_public": server_public, "server_secret": server_secret,
            "client_public": client_public, "client_secret": client_secret, "home": tmp_path}


def test_a_client_with_keys_gets_in_and_is_known_by_its_key(curve_keys, monkeypatch):
    _, server_secret = keys.load_secret(curve_keys["server_secret"])
    with HandMadeDaemon(server_secret=server_secret, clients=curve_keys["clients"]) as daemon:
        monkeypatch.setenv("PVHUB_CLIENT_KEY", str(curve_keys["client_secret"]))
        monkeypatch.setenv("PVHUB_SERVER_KEY", str(curve_keys["server_public"]))
        hub = get_hub(daemon.address)
        try:
            hub.wait_for_hello(10)
            assert hub.connected and hub.handshake_problem is None
            daemon.answer.add("X:secure")
            snapshot = hub.request(read("X:secure"), timeout=5).result(5)
            assert snapshot.reading.value == 1.5
        finally:
            hub.close()
        client_public = keys.load_public(curve_keys["client_public"]).decode()
        # The ZAP handler let this key in, and says so on every message.
        assert {user for _, user in daemon.requests} == {client_public}


def test_a_client_with_an_unknown_key_or_none_is_not_let_in(curve_keys):
    _, server_secret = keys.load_secret(curve_keys["server_secret"])
    _, stranger_secret = keys.generate("stranger", curve_keys["home"] / "stranger")
    with HandMadeDaemon(server_secret=server_secret, clients=curve_keys["clients"]) as daemon:
        stranger = Hub(daemon.address, client_key=stranger_secret, server_key=curve_keys["server_public"])
        plain = Hub(daemon.address)
        # The client's own key as the server's: the daemon cannot read its hello.
        wrong_server = Hub(daemon.address, client_key=curve_keys["client_secret"],
                           server_key=curve_keys["client_public"])
        expected = {
            stranger: r"the daemon refused this client \(ZAP status 400\): its public key is not in the daemon's clients",
            plain: r"the security handshake failed: this client has no CURVE keys .*; does the daemon require them\?",
            wrong_server: r"the security handshake failed: is the server key \(PVHUB_SERVER_KEY\) the daemon's own public key",
        }
        try:
            for hub, why in expected.items():
                with pytest.raises(HubUnavailableError, match=rf"did not answer within 1\.5 s: {why}"):
                    hub.wait_for_hello(1.5)
        finally:
            for hub in expected:
                hub.close()
        assert daemon.requests == []


def test_half_of_the_key_pair_in_the_environment_is_a_clear_error(curve_keys, monkeypatch):
    monkeypatch.setenv("PVHUB_CLIENT_KEY", str(curve_keys["client_secret"]))
    monkeypatch.delenv("PVHUB_SERVER_KEY", raising=False)
    with pytest.raises(KeyFileError, match="PVHUB_SERVER_KEY or server_key.* is not given: CURVE needs both"):
        Hub("tcp://127.0.0.1:9")
    with pytest.raises(KeyFileError, match="PVHUB_SERVER_KEY"):
        get_hub("tcp://127.0.0.1:9")
    monkeypatch.delenv("PVHUB_CLIENT_KEY")
    monkeypatch.setenv("PVHUB_SERVER_KEY", str(curve_keys["server_public"]))
    with pytest.raises(KeyFileError, match="PVHUB_CLIENT_KEY or client_key.* is not given"):
        Hub("tcp://127.0.0.1:9")


def test_a_secret_key_others_may_read_is_refused(curve_keys):
    curve_keys["client_secret"].chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0644"):
        Hub("tcp://127.0.0.1:9", client_key=curve_keys["client_secret"], server_key=curve_keys["server_public"])


# --- a dead I/O thread ------------------------------------------------------------------------


@pytest.mark.system
def test_a_dead_io_thread_disconnects_everything_and_fails_every_request(hub, prefix, monkeypatch):
    x = EpicsSignal(f"{prefix}x", name="x")
    x.wait_for_connection(timeout=15)
    delay = EpicsSignal(f"{prefix}slow_delay", name="delay")
    delay.wait_for_connection(timeout=15)
    delay.set(3).wait(5)  # long enough to be in flight when the thread dies, short for teardown
    slow = EpicsSignal(f"{prefix}slow", name="slow")
    slow.wait_for_connection(timeout=15)
    metas = []
    x.subscribe(lambda **kwargs: metas.append(kwargs["connected"]), event_type="meta", run=False)
    in_flight = slow.set(1)
    client_hub = get_hub()
    wait_for_put_in_flight(hub, f"{prefix}slow")

    original = Hub._prove_subscriptions
    failed = threading.Event()

    def fail_once(self, now):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected fault")
        return original(self, now)

    monkeypatch.setattr(Hub, "_prove_subscriptions", fail_once)
    assert failed.wait(5)
    wait_until(lambda: not x.connected, 5, message="x still reports connected")
    assert not client_hub.connected
    wait_until(lambda: False in metas, 5, message="no disconnection callback")
    # The put in flight fails; its outcome is unknown.
    with pytest.raises(HubUnavailableError, match="I/O thread .* failed \\(RuntimeError: injected fault\\)"):
        in_flight.wait(5)
    # Every later use fails at once, naming the cause.
    started = time.monotonic()
    with pytest.raises(HubUnavailableError, match="injected fault"):
        x.get()
    with pytest.raises(HubUnavailableError, match="injected fault"):
        x.get(use_monitor=False)
    with pytest.raises(HubUnavailableError, match="injected fault"):
        slow.set(2).wait(5)
    with pytest.raises(HubUnavailableError, match="injected fault"):
        EpicsSignal(f"{prefix}dt", name="new").wait_for_connection(timeout=10)
    with pytest.raises(HubUnavailableError, match="injected fault"):
        client_hub.call(lambda rid: p.StatusRequest(id=rid), timeout=10)
    assert time.monotonic() - started < 2.0


def test_an_address_zeromq_refuses_fails_every_use_at_once_naming_why():
    hub = Hub("bogus://nowhere")
    try:
        started = time.monotonic()
        with pytest.raises(HubUnavailableError, match=r"I/O thread .* failed \(ZMQError: .*\); nothing can be sent"):
            hub.wait_for_hello(10)
        with pytest.raises(HubUnavailableError, match="ZMQError"):
            hub.request(read("X:any")).result(5)
        assert hub.channel("X:any").error is not None
        assert time.monotonic() - started < 2.0
    finally:
        hub.close()


# --- against a real daemon with CURVE ---------------------------------------------------------


@pytest.mark.system
@pytest.mark.timeout(90)
def test_signals_and_the_command_line_reach_a_curve_daemon_with_keys_from_the_environment(
        zoo_ioc, hub_factory, tmp_path, prefix, monkeypatch):
    from pvhub.client import close_hubs
    from pvhub.errors import AccessDeniedError

    keys_dir, clients = tmp_path / "keys", tmp_path / "clients"
    clients.mkdir(mode=0o700)
    _, server_secret = keys.generate("server", keys_dir)
    made = {name: keys.generate(name, keys_dir) for name in ("alice", "bob", "eve")}
    for name in ("alice", "bob"):  # not eve: the daemon does not know her
        (clients / f"{name}.key").write_text(made[name][0].read_text())
    config = tmp_path / "pvhub.toml"
    config.write_text(f'[security]\nserver_key = "{server_secret}"\nclients = "{clients}"\n'
                      f'[access]\ndefault = "read"\n'
                      f'[[access.rule]]\npvs = ["{prefix}*"]\nwho = ["alice"]\naccess = "write"\n')
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    server_public = keys_dir / "server.key"
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    monkeypatch.setenv("PVHUB_CLIENT_KEY", str(made["alice"][1]))
    monkeypatch.setenv("PVHUB_SERVER_KEY", str(server_public))
    try:
        dt = EpicsSignal(f"{prefix}dt", name="dt")
        dt.wait_for_connection(timeout=15)
        seen = []
        dt.subscribe(lambda value, **kwargs: seen.append(value))  # readings come through CURVE too
        dt.set(4.5).wait(5)
        assert dt.get() == 4.5
        wait_until(lambda: 4.5 in seen, 5, message="no update on the readings socket")

        bob = get_hub(daemon.address, client_key=made["bob"][1], server_key=server_public)
        assert bob is not get_hub()  # another identity, another connection
        as_bob = EpicsSignal(f"{prefix}dt", name="dt_bob", hub=bob)
        as_bob.wait_for_connection(timeout=15)
        assert as_bob.get() == 4.5
        with pytest.raises(AccessDeniedError):
            as_bob.set(1.0).wait(5)

        eve = Hub(daemon.address, client_key=made["eve"][1], server_key=server_public)
        try:
            with pytest.raises(HubUnavailableError, match="refused this client .*not in the daemon's clients"):
                eve.wait_for_hello(3)
        finally:
            eve.close()
    finally:
        close_hubs()

    done = subprocess.run([str(Path(sys.executable).with_name("pvhub")), "get", f"{prefix}dt"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"{prefix}dt", "4.5"]
