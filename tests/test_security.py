"""Who gets in and what they may do, tried against a real daemon and a real IOC with bare
ZeroMQ sockets (the view of an attacker, or of a client that is not pvhub's): loopback by
default, CURVE identities, access rules on requests and on readings, reloads, limits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from helpers import ask_by_hand, log_events, readings_in, wait_until

from pvhub import protocol as p
from pvhub.keys import generate, load_public, load_secret
from pvhub.testing import free_tcp_port

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]


class Peer:
    """A DEALER and a SUB, with CURVE keys or without, speaking the wire protocol by hand."""

    def __init__(self, address: str, keys: Path | None = None, server: Path | None = None) -> None:
        self.ctx = zmq.Context()
        self.keys = keys
        self.server = server
        self.dealer = self._socket(zmq.DEALER)
        self.dealer.connect(address)
        self.sub: zmq.Socket | None = None
        self._ids = iter(range(1, 1_000_000))

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            public, secret = load_secret(self.keys)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = load_public(self.server)
        return sock

    def ask(self, build, timeout: float = 5.0) -> p.Message | None:
        """The final reply to ``build(id)``, or None if none came within ``timeout``."""
        return ask_by_hand(self.dealer, next(self._ids), build, timeout)

    def connect(self, pv: str, timeout: float = 10.0) -> None:
        """Wait until the daemon has ``pv`` connected to its IOC (a set needs that)."""
        wait_until(lambda: getattr(self.ask(lambda i: p.ReadRequest(id=i, pv=pv)), "connected", False),
                   timeout=timeout, interval=0.05, message=f"{pv} connected")

    def hello(self, timeout: float = 5.0) -> p.HelloReply | None:
        return self.ask(lambda i: p.HelloRequest(id=i, client="test"), timeout)  # type: ignore[return-value]

    def subscribe(self, readings: str, *topics: bytes) -> None:
        self.sub = self._socket(zmq.SUB)
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(readings)

    def follow(self, readings: str, pv: str) -> None:
        """Subscribe to ``pv``'s readings and wait until they come (``pv`` changes by itself)."""
        self.subscribe(readings, p.topic(pv))
        assert isinstance(self.ask(lambda i: p.ReadRequest(id=i, pv=pv, publish=True)), p.Snapshot)
        wait_until(lambda: self.updates(0.2), timeout=10, message=f"readings of {pv}")

    def hears_nothing_more(self) -> bool:
        """After what was already on its way (a second's worth), a second of silence."""
        self.updates(1.0)
        return self.updates(1.0) == []

    def updates(self, within: float) -> list[p.Message]:
        """What the SUB received within ``within`` seconds."""
        got = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000)):
                got.extend(readings_in(self.sub.recv_multipart()[1:]))
        return got

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(*args, **kwargs) -> Peer:
        made.append(Peer(*args, **kwargs))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def keyring(tmp_path: Path) -> dict[str, Path]:
    """A server key and client keys; the clients directory holds alice's, bob's, mallory's
    (not eve's: hers is unknown to the daemon)."""
    keys = tmp_path / "keys"
    clients = tmp_path / "clients"
    clients.mkdir(mode=0o755)
    ring = {"server": generate("server", keys)[1], "server.pub": keys / "server.key", "clients": clients}
    for name in ("alice", "bob", "mallory", "eve"):
        public, secret = generate(name, keys)
        ring[name] = secret
        if name != "eve":
            (clients / public.name).write_bytes(public.read_bytes())
    return ring


def write_config(path: Path, keyring: dict[str, Path] | None, extra: str = "") -> Path:
    text = ""
    if keyring is not None:
        text += f'[security]\nserver_key = "{keyring["server"]}"\nclients = "{keyring["clients"]}"\n'
    path.write_text(text + extra)
    return path


RULES = """
[access]
default = "none"
[[access.rule]]
pvs = ["{prefix}*"]
who = ["alice"]
access = "write"
[[access.rule]]
pvs = ["{prefix}*"]
who = ["bob"]
access = "read"
"""


def serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, extra: str = ""):
    config = write_config(tmp_path / "pvhub.toml", keyring, extra)
    return hub_factory(zoo_ioc, args=("--config", str(config))), config


# --- safe by default -----------------------------------------------------------------------


def run_serve(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "serve.toml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "pvhub", "serve", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=30)


def test_a_daemon_without_curve_refuses_to_listen_beyond_loopback(tmp_path):
    port = free_tcp_port()
    done = run_serve(tmp_path, f'[daemon]\naddress = "tcp://0.0.0.0:{port}"\n')
    assert done.returncode == 2
    assert "reachable from other hosts" in done.stderr and "insecure = true" in done.stderr
    done = run_serve(tmp_path, "", "--address", f"tcp://127.0.0.1:{port}", "--readings", f"tcp://0.0.0.0:{port + 1}")
    assert done.returncode == 2 and f"0.0.0.0:{port + 1}" in done.stderr


def test_the_default_address_is_loopback():
    from pvhub.config import Config, is_local

    assert is_local(Config().address)


def test_insecure_said_on_purpose_is_warned_about_at_every_start(zoo_ioc, hub_factory, tmp_path):
    config = write_config(tmp_path / "insecure.toml", None, "[daemon]\ninsecure = true\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    (warning,) = log_events(daemon, "insecure")
    assert "anyone" in warning["detail"]


def test_a_secret_key_others_may_read_stops_the_daemon(tmp_path, keyring):
    keyring["server"].chmod(0o644)
    port = free_tcp_port()
    done = run_serve(tmp_path, f'[security]\nserver_key = "{keyring["server"]}"\nclients = "{keyring["clients"]}"\n',
                     "--address", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 2 and "server.key_secret" in done.stderr


# --- identities ----------------------------------------------------------------------------


def test_only_known_curve_keys_get_in_and_refusals_are_logged(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring)
    alice = peers(daemon.address, keyring["alice"], keyring["server.pub"])
    hello = alice.hello()
    assert isinstance(hello, p.HelloReply)
    assert isinstance(alice.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)
    assert peers(daemon.address).hello(timeout=1.0) is None  # no CURVE at all
    assert peers(daemon.address, keyring["eve"], keyring["server.pub"]).hello(timeout=1.0) is None  # unknown key
    refused = wait_until(lambda: {r["kind"] for r in log_events(daemon, "connection_refused")} >= {"unknown_key", "handshake"}
                         and log_events(daemon, "connection_refused"), timeout=10)
    (eve,) = [r for r in refused if r["kind"] == "unknown_key"][:1]
    assert eve["key"] == load_public(keyring["server.pub"].with_name("eve.key")).decode()
    # The readings socket refuses them too: a SUB without CURVE gets nothing of a counting PV.
    stranger = peers(daemon.address)
    stranger.subscribe(hello.readings, b"")
    alice.follow(hello.readings, zoo_ioc.pv("fast"))
    assert not stranger.updates(0.5)


def test_each_write_is_logged_with_the_identity_that_made_it(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring)
    alice = peers(daemon.address, keyring["alice"], keyring["server.pub"])
    alice.connect(zoo_ioc.pv("count"))
    assert isinstance(alice.ask(lambda i: p.SetRequest(id=i, pv=zoo_ioc.pv("count"), value=7)), p.SetDone)
    (put,) = [r for r in log_events(daemon, "put_requested") if r["pv"] == zoo_ioc.pv("count")]
    assert put["identity"] == "alice" and put["value"] == 7


# --- access rules ----------------------------------------------------------------------------


def test_rules_decide_reads_writes_and_which_readings_reach_whom(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, RULES.format(prefix=zoo_ioc.prefix))
    alice, bob, mallory = (peers(daemon.address, keyring[n], keyring["server.pub"]) for n in ("alice", "bob", "mallory"))
    readings = alice.hello().readings
    count = zoo_ioc.pv("count")
    alice.connect(count)
    assert isinstance(alice.ask(lambda i: p.SetRequest(id=i, pv=count, value=3)), p.SetDone)
    refused = bob.ask(lambda i: p.SetRequest(id=i, pv=count, value=4))
    assert isinstance(refused, p.ErrorReply) and refused.code == "access_denied" and "bob" in refused.message
    # Logged once the answer is on its way: wait for the record.
    (logged,) = wait_until(lambda: log_events(daemon, "put_refused"), timeout=10)
    assert (logged["identity"], logged["code"], logged["value"]) == ("bob", "access_denied", 4)
    assert [r["identity"] for r in log_events(daemon, "put_requested")] == ["alice"]
    assert isinstance(bob.ask(lambda i: p.ReadRequest(id=i, pv=count)), p.Snapshot)
    refused = mallory.ask(lambda i: p.ReadRequest(id=i, pv=count))
    assert isinstance(refused, p.ErrorReply) and refused.code == "access_denied"
    refused = mallory.ask(lambda i: p.DescribeRequest(id=i, pv=count))
    assert isinstance(refused, p.ErrorReply) and refused.code == "access_denied"
    status = mallory.ask(lambda i: p.StatusRequest(id=i)).status
    assert status["pvs"] == [] and [c["identity"] for c in status["clients"]] == ["mallory"]

    fast = zoo_ioc.pv("fast")
    mallory.subscribe(readings, b"", p.topic(fast), zoo_ioc.prefix.encode())
    bob.follow(readings, fast)
    assert mallory.updates(1.0) == []
    assert alice.ask(lambda i: p.SetRequest(id=i, pv=count, value=5)) is not None
    assert mallory.updates(0.3) == []


def test_large_readings_are_vetted_and_encrypted_as_readings_are(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, RULES.format(prefix=zoo_ioc.prefix))
    alice, bob, mallory = (peers(daemon.address, keyring[n], keyring["server.pub"]) for n in ("alice", "bob", "mallory"))
    hello = alice.hello()
    assert hello.large_readings and hello.large_readings != hello.readings
    alice.connect(zoo_ioc.pv("big_rate"))
    assert isinstance(alice.ask(lambda i: p.SetRequest(id=i, pv=zoo_ioc.pv("big_rate"), value=10.0)), p.SetDone)
    big = zoo_ioc.pv("big")
    mallory.subscribe(hello.large_readings, b"", p.topic(big), zoo_ioc.prefix.encode())
    bob.follow(hello.large_readings, big)  # over CURVE, as bob
    assert all(getattr(m, "pv", big) == big for m in bob.updates(0.5))
    assert mallory.updates(1.0) == []


def test_a_reload_changes_the_rules_without_dropping_anyone(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    rules = RULES.format(prefix=zoo_ioc.prefix)
    daemon, config = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, rules)
    alice, bob = (peers(daemon.address, keyring[n], keyring["server.pub"]) for n in ("alice", "bob"))
    readings = alice.hello().readings
    fast = zoo_ioc.pv("fast")
    alice.follow(readings, fast)
    # Alice loses her rights, bob may write now.
    write_config(config, keyring, rules.replace('who = ["alice"]', 'who = ["nobody"]').replace(
        'who = ["bob"]\naccess = "read"', 'who = ["bob"]\naccess = "write"'))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "config_reloaded"), timeout=10)
    bob.connect(zoo_ioc.pv("count"))
    assert isinstance(bob.ask(lambda i: p.SetRequest(id=i, pv=zoo_ioc.pv("count"), value=11)), p.SetDone)
    refused = alice.ask(lambda i: p.ReadRequest(id=i, pv=fast))
    assert isinstance(refused, p.ErrorReply) and refused.code == "access_denied"
    # Her subscription is vetted again: after the readings socket is bound anew, nothing.
    wait_until(lambda: log_events(daemon, "readings_rebound"), timeout=10)
    assert alice.hears_nothing_more()
    assert daemon.running()


def test_a_reload_with_a_bad_file_keeps_the_rules_it_had(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, config = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, RULES.format(prefix=zoo_ioc.prefix))
    config.write_text(config.read_text() + "\n[access.bogus\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "config_not_reloaded"), timeout=10)
    alice = peers(daemon.address, keyring["alice"], keyring["server.pub"])
    alice.connect(zoo_ioc.pv("count"))
    assert isinstance(alice.ask(lambda i: p.SetRequest(id=i, pv=zoo_ioc.pv("count"), value=2)), p.SetDone)


def test_a_client_key_added_to_the_directory_gets_in_after_a_reload(zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring)
    assert peers(daemon.address, keyring["eve"], keyring["server.pub"]).hello(timeout=1.0) is None
    eve_public = keyring["eve"].with_name("eve.key")
    (keyring["clients"] / "eve.key").write_bytes(eve_public.read_bytes())
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "config_reloaded"), timeout=10)
    assert isinstance(peers(daemon.address, keyring["eve"], keyring["server.pub"]).hello(), p.HelloReply)


# --- limits ----------------------------------------------------------------------------------


def test_limits_refuse_one_client_and_never_the_others(zoo_ioc, hub_factory, tmp_path, peers):
    config = write_config(tmp_path / "limits.toml", None,
                          "[limits]\nmax_pvs_per_client = 2\nmax_request_rate = 20\nmax_message_bytes = 65536\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    greedy, polite = peers(daemon.address), peers(daemon.address)
    assert greedy.hello() and polite.hello()
    for name in ("x", "count"):
        assert isinstance(greedy.ask(lambda i, n=name: p.ReadRequest(id=i, pv=zoo_ioc.pv(n))), p.Snapshot)
    refused = greedy.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("text")))
    assert isinstance(refused, p.ErrorReply) and refused.code == "limit" and "PVs" in refused.message
    # A burst past the rate: the excess is refused at once, and the other client sees nothing of it.
    for i in range(1000, 1100):
        greedy.dealer.send(p.encode(p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))))
    codes = []
    while len(codes) < 100 and greedy.dealer.poll(5000):
        codes.append(getattr(p.decode(greedy.dealer.recv()), "code", "ok"))
    assert len(codes) == 100 and 0 < codes.count("limit") < 100
    assert isinstance(polite.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)
    # A message past max_message_bytes: ZeroMQ drops that connection; the daemon goes on.
    greedy.dealer.send(p.encode(p.SetRequest(id=5, pv=zoo_ioc.pv("wave"), value=[0.5] * 20_000)))
    assert greedy.dealer.poll(1000) == 0
    assert isinstance(polite.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)
    assert daemon.running()


def test_a_pv_that_finds_no_ioc_is_released(zoo_ioc, hub_factory, tmp_path, peers):
    config = write_config(tmp_path / "release.toml", None, "[limits]\nrelease_unconnected_s = 1\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    client = peers(daemon.address)
    assert client.hello()
    missing = zoo_ioc.prefix + "no_such_record"
    reply = client.ask(lambda i: p.ReadRequest(id=i, pv=missing))
    assert isinstance(reply, p.Snapshot) and not reply.connected
    assert isinstance(client.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)
    wait_until(lambda: log_events(daemon, "pvs_released"), timeout=10)
    pvs = [entry["pv"] for entry in client.ask(lambda i: p.StatusRequest(id=i)).status["pvs"]]
    assert missing not in pvs and zoo_ioc.pv("x") in pvs
    # Asked for again, it is opened again.
    assert isinstance(client.ask(lambda i: p.ReadRequest(id=i, pv=missing)), p.Snapshot)
    assert missing in [e["pv"] for e in client.ask(lambda i: p.StatusRequest(id=i)).status["pvs"]]


def test_a_released_pv_of_its_own_leaves_no_process_behind(zoo_ioc, hub_factory, tmp_path, peers):
    config = write_config(tmp_path / "isolated.toml", None, "[limits]\nrelease_unconnected_s = 1\n"
                          f'[actors]\nisolate = ["{zoo_ioc.prefix}iso*"]\n')
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    client = peers(daemon.address)
    assert client.hello()
    missing = zoo_ioc.prefix + "iso_no_such_record"
    for round_ in range(1, 4):  # a client that keeps asking for a name no IOC has
        reply = client.ask(lambda i: p.ReadRequest(id=i, pv=missing), timeout=20)
        assert isinstance(reply, p.Snapshot) and not reply.connected
        wait_until(lambda: len(log_events(daemon, "actor_retired")) == round_, timeout=15,
                   message=lambda: f"round {round_}: {log_events(daemon, 'actor_retiring')}")
        actors = client.ask(lambda i: p.StatusRequest(id=i)).status["actors"]
        assert not [a for a in actors if a["kind"] == "own"], actors
    spawned = [e for e in log_events(daemon, "actor_spawned") if e["actor"] == f"pv:{missing}"]
    retired = [e["actor_pid"] for e in log_events(daemon, "actor_retired")]
    assert len(spawned) == 3 and sorted(e["actor_pid"] for e in spawned) == sorted(retired)
    assert not any(Path(f"/proc/{pid}").exists() for pid in retired)  # reaped, not zombies
    assert isinstance(client.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)


def test_subscriptions_to_names_the_daemon_no_longer_holds_do_not_fill_the_forwarder(
        zoo_ioc, hub_factory, tmp_path, peers):
    # max_pvs 3: the forwarder takes 4 topics upstream. Names subscribed once and never held
    # (or released since) are forgotten when room is needed; before, it stayed full for good.
    config = write_config(tmp_path / "topics.toml", None, "[limits]\nmax_pvs = 3\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    filler = peers(daemon.address)
    hello = filler.hello()
    assert hello is not None
    filler.subscribe(hello.readings, *(p.topic(f"{zoo_ioc.prefix}gone{i}") for i in range(5)))
    names = iter(range(5, 1000))

    def pruned() -> bool:  # more names keep coming, as a refused client subscribes again
        if log_events(daemon, "subscriptions_pruned"):
            return True
        filler.sub.setsockopt(zmq.SUBSCRIBE, p.topic(f"{zoo_ioc.prefix}gone{next(names)}"))
        return False

    wait_until(pruned, timeout=15, interval=0.2, message="the forwarder never made room")
    client = peers(daemon.address)
    assert client.hello()
    client.follow(hello.readings, zoo_ioc.pv("fast"))  # a held PV's readings come


# --- holes a review found --------------------------------------------------------------------


def test_a_pv_name_longer_than_channel_access_takes_is_refused_and_a_long_one_gets_its_own_actor(
        zoo_ioc, hub_factory, tmp_path, peers):
    config = write_config(tmp_path / "own.toml", None, "[actors]\npool_size = 0\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    client = peers(daemon.address)
    assert client.hello()
    refused = client.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.prefix + "L" * 60))
    assert isinstance(refused, p.ErrorReply) and refused.code == "pv_not_allowed" and "at most 59" in refused.message
    # The longest name Channel Access takes: its actor's routing id is hashed (ZeroMQ takes 255 bytes).
    record = zoo_ioc.prefix + "L" * (59 - len(zoo_ioc.prefix))
    name = record + "." + "F" * (256 - len(record) - 1)
    reply = client.ask(lambda i: p.ReadRequest(id=i, pv=name), timeout=20)
    assert isinstance(reply, p.Snapshot) and reply.pv == name and not reply.connected
    (actor,) = [a for a in client.ask(lambda i: p.StatusRequest(id=i)).status["actors"] if name in a["pvs"]]
    assert actor["ready"] and actor["restarts"] == 0


def test_garbage_on_the_actors_socket_does_not_end_the_daemon(zoo_ioc, hub_factory, tmp_path, peers):
    run = tmp_path / "run"
    run.mkdir()
    daemon = hub_factory(zoo_ioc, env={"RUNTIME_DIRECTORY": str(run)})
    (socket_path,) = run.glob("pvhub-*/actors")
    intruder = zmq.Context.instance().socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    intruder.connect(f"ipc://{socket_path}")
    try:
        for frames in ([b"\xc1\xff"], [b"", b"\xc1\xff"], [b"a", b"b", b"c"], [b"", p.encode(p.Heartbeat(stats={"x": 1}))],
                       [b"\x00alice", p.encode(p.Snapshot(id=1, pv="x", epoch=1, seq=1, connected=True))],
                       [b"", p.encode(p.ActorReady(actor="pool:0", pid=1))]):
            intruder.send_multipart(frames)
        client = peers(daemon.address)
        assert client.hello()
        assert isinstance(client.ask(lambda i: p.ReadRequest(id=i, pv=zoo_ioc.pv("x"))), p.Snapshot)
        assert daemon.running()
    finally:
        intruder.close()


def test_a_pvhub_client_refuses_a_request_too_big_for_the_daemon_itself(zoo_ioc, hub_factory, tmp_path, monkeypatch):
    import numpy as np

    from pvhub.client import EpicsSignal, close_hubs
    from pvhub.errors import LimitError

    config = write_config(tmp_path / "small.toml", None, "[limits]\nmax_message_bytes = 65536\n")
    daemon = hub_factory(zoo_ioc, args=("--config", str(config)))
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    try:
        wave = EpicsSignal(zoo_ioc.pv("wave"), name="wave")
        wave.wait_for_connection(timeout=10)
        with pytest.raises(LimitError, match="max_message_bytes"):
            wave.put(np.zeros(20_000), wait=True, timeout=5)
        small = np.arange(len(wave.get()), dtype=float)
        wave.put(small, wait=True, timeout=5)
        assert np.array_equal(wave.get(use_monitor=False), small)  # the connection was never dropped
    finally:
        close_hubs()


def test_a_key_removed_from_the_directory_loses_its_live_connections_at_the_reload(
        zoo_ioc, hub_factory, tmp_path, keyring, peers):
    daemon, _ = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring)
    bob, alice = (peers(daemon.address, keyring[n], keyring["server.pub"]) for n in ("bob", "alice"))
    readings = bob.hello().readings
    fast = zoo_ioc.pv("fast")
    bob.follow(readings, fast)
    (keyring["clients"] / "bob.key").unlink()
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "readings_rebound"), timeout=10)
    refused = bob.ask(lambda i: p.ReadRequest(id=i, pv=fast))
    assert isinstance(refused, p.ErrorReply) and refused.code == "access_denied" and "removed" in refused.message
    assert bob.hears_nothing_more()  # its SUB's new handshake is refused
    assert isinstance(alice.ask(lambda i: p.ReadRequest(id=i, pv=fast)), p.Snapshot)


def test_a_signal_is_told_its_pv_is_refused_and_asks_again_after_a_reload(
        zoo_ioc, hub_factory, tmp_path, keyring, monkeypatch):
    from pvhub.client import EpicsSignal, close_hubs
    from pvhub.errors import AccessDeniedError

    rules = RULES.format(prefix=zoo_ioc.prefix)
    daemon, config = serve_secure(hub_factory, zoo_ioc, tmp_path, keyring, rules)
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    monkeypatch.setenv("PVHUB_CLIENT_KEY", str(keyring["mallory"]))
    monkeypatch.setenv("PVHUB_SERVER_KEY", str(keyring["server.pub"]))
    try:
        with pytest.raises(AccessDeniedError, match="mallory"):
            EpicsSignal(zoo_ioc.pv("x"), name="x").wait_for_connection(timeout=10)
        write_config(config, keyring, rules.replace('who = ["bob"]', 'who = ["bob", "mallory"]'))
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: log_events(daemon, "config_reloaded"), timeout=10)
        signal_again = EpicsSignal(zoo_ioc.pv("x"), name="x")
        signal_again.wait_for_connection(timeout=10)
        assert isinstance(signal_again.get(), float)
    finally:
        close_hubs()


# --- a put's read-back ---------------------------------------------------------------------


@pytest.mark.parametrize("name, delay", [("count", None), ("slow", 0.3)])
def test_a_sets_answer_carries_the_value_read_after_its_completion(zoo_ioc, hub_factory, peers, name, delay):
    """The read-back travels right behind the put: for a put the IOC completes at once its
    answer is the read-back; for one that completes later (``slow``) it came too early, and
    the value is read again after the completion."""
    daemon = hub_factory(zoo_ioc)
    client = peers(daemon.address)
    assert client.hello()
    pv = zoo_ioc.pv(name)
    if delay is not None:
        client.connect(zoo_ioc.pv("slow_delay"))
        assert isinstance(client.ask(lambda i: p.SetRequest(id=i, pv=zoo_ioc.pv("slow_delay"), value=delay)), p.SetDone)
    client.connect(pv)
    for value in (3, 4, 5):
        done = client.ask(lambda i, v=value: p.SetRequest(id=i, pv=pv, value=v), timeout=10)
        assert isinstance(done, p.SetDone) and done.reading is not None and done.reading.value == value
