"""Bad input, from the attacker's side: whatever reaches the daemon's ports, it answers what it
can, drops what it cannot, and goes on serving everyone else.

Rule 1: the attacker needs no pvhub client: bad bytes are sent by a bare ``zmq.DEALER``,
``zmq.XSUB`` or a plain TCP socket built here, and only decoding the answers uses pvhub.
Rule 2: after each kind of abuse the daemon's process is alive and a well-behaved request
gets its answer; at the end no actor has restarted.
Rule 3: the unit tests at the top (the actor's value checks) need no sockets and no IOC.
"""

from __future__ import annotations

import gc
import socket
import time

import msgpack
import numpy as np
import pytest
import zmq
from helpers import log_events, readings_in, wait_until

from pvhub import protocol as p
from pvhub.actors.coercion import coerce_value
from pvhub.client import EpicsSignal
from pvhub.errors import BadValueError, ProtocolError

MANY = 10**7  # elements of a value far too large for any of the zoo's PVs


def md(native: str, count: int = 1, **extra) -> p.PVMetadata:
    return {"native_type": native, "count": count, **extra}


ENUM = md("enum", enum_strs=["Off", "On", "Auto"])


def short_id(value: object) -> str:
    if isinstance(value, int) and abs(value) > 10**30:
        return f"int-of-{len(str(abs(value)))}-digits" if abs(value) < 10**4000 else "int-too-long-to-write"
    return repr(value)[:30]


# --- the actor's value checks, without sockets (Rule 3) ---------------------------------------


@pytest.mark.parametrize(
    ("value", "metadata"),
    [
        ({"x": 1}, md("float")),
        ([[1.0, 2.0]], md("float")),
        ("abc", md("float")),
        ("1e999", md("float")),  # overflows to inf: not what was written
        ("9" * 100_000, md("float")),
        ([], md("float")),
        (float("nan"), md("int")),
        (float("-inf"), md("int")),
        (2**64 - 1, md("int")),
        (10**5000, md("int")),  # more digits than Python writes out
        (10**5000, md("float")),
        (True, ENUM),
        (float("nan"), ENUM),
        (2**63, ENUM),
        ("x" * 100_000, ENUM),
        ({"x": 1}, ENUM),
        ("é" * 20, md("string")),
        (10**5000, md("string")),
        ("\ud800", md("string")),  # a lone surrogate: no bytes for the IOC
        ([1, 2], md("string")),
        ({"x": 1}, md("float", 16)),
        ([[1, 2], [3]], md("float", 16)),
        ([1, [2, [3]]], md("float", 16)),
        (np.array([1 + 2j]), md("float", 16)),
        (np.array([np.nan, 1.0]), md("int", 16)),
        (np.array([2**40]), md("int", 16)),
        (np.array([2**64 - 1], dtype=np.uint64), md("int", 16)),
        (np.array([256]), md("char", 16)),
        ("x" * 41, md("char", 40)),
    ],
    ids=lambda x: short_id(x),
)
def test_values_of_the_wrong_type_are_bad_values(value, metadata):
    with pytest.raises(BadValueError):
        coerce_value(value, metadata)


def test_a_float_for_an_integer_pv_is_truncated_as_channel_access_converts_it():
    assert coerce_value(3.7, md("int")) == 3 and coerce_value(-3.7, md("int")) == -3
    assert coerce_value(np.float32(2.5), md("int")) == 2
    assert coerce_value("4.9", md("int")) == 4  # text that is a number, as caput writes it
    assert coerce_value(np.array([1.5, -2.5, 7.0]), md("int", 16)).tolist() == [1, -2, 7]
    assert coerce_value([1.5, 2.25], md("int", 16)).tolist() == [1, 2]
    with pytest.raises(BadValueError):  # still no wrapping: the truncated value must fit
        coerce_value(40000.5, md("int", native_bits=16))


@pytest.mark.parametrize(
    ("make", "metadata"),
    [
        (lambda: list(range(MANY)), md("float")),
        (lambda: list(range(MANY)), md("float", 16)),
        (lambda: list(range(MANY)), md("int", 16)),
        (lambda: [list(range(MANY))], md("float", 16)),  # nested: leaves are counted, not lists
        (lambda: tuple(range(MANY)), md("float", 16)),
        (lambda: np.zeros(MANY), md("float", 16)),
        (lambda: np.zeros(MANY), md("float")),
        (lambda: list(range(MANY)), ENUM),
        (lambda: list(range(MANY)), md("string")),
        (lambda: "x" * MANY, md("string")),
        (lambda: "x" * MANY, md("char", 40)),
        (lambda: "1" * MANY, md("int")),
    ],
    ids=["list-scalar", "list-wave", "list-int-wave", "nested-list", "tuple", "ndarray-wave",
         "ndarray-scalar", "list-enum", "list-string", "text-string", "text-char", "digits-int"],
)
def test_a_huge_value_is_refused_by_its_size_without_converting_it(make, metadata):
    value = make()  # built here, not at collection: each takes hundreds of MB
    # The garbage collector stays out of both timings: a collection that starts while the new
    # list is young walks all of its elements, at whatever allocation it happens to fall on.
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        with pytest.raises(BadValueError):
            coerce_value(value, metadata)
        refused_in = time.perf_counter() - started
        # Against one walk over the elements, on the same machine at the same moment (so that
        # a loaded machine slows both): a length check takes a tiny part of it, a conversion more.
        started = time.perf_counter()
        outer = value.flat if isinstance(value, np.ndarray) else value
        for item in outer:
            for _ in (item if isinstance(item, list) else ()):  # a nested list's leaves
                pass
        walked_in = time.perf_counter() - started
    finally:
        gc.enable()
    assert refused_in < walked_in / 10, (refused_in, walked_in)


@pytest.mark.parametrize(
    ("value", "metadata", "expected"),
    [
        (float("nan"), md("float"), "nan"),  # a float PV holds NaN and infinities
        ("-inf", md("float"), "-inf"),
        (np.arange(16, dtype=np.uint8), md("float", 16), np.arange(16.0)),
        (np.arange(4, dtype=">i2"), md("int", 16), np.arange(4)),
        (np.array([1.0, 2.0]), md("int", 4), np.array([1, 2])),
        (np.array([True, False]), md("int", 4), np.array([1, 0])),
        (np.zeros((2, 3)), md("float", 6), np.zeros(6)),
        ([[1, 2], [3, 4]], md("float", 4), np.array([1.0, 2.0, 3.0, 4.0])),
        ([[5.0]], md("float"), 5.0),
        (np.array([[7]]), md("int"), 7),
    ],
    ids=repr,
)
def test_values_a_pv_can_take_still_pass(value, metadata, expected):
    result = coerce_value(value, metadata)
    if isinstance(expected, str):
        assert repr(result) == expected
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(result, expected)
        assert result.dtype == (np.int64 if metadata["native_type"] in ("int", "char") else np.float64)
    else:
        assert result == expected and type(result) is type(expected)


# --- the daemon ---------------------------------------------------------------------------------



class Attacker:
    """A bare DEALER (Rule 1): sends any frames, reads the answers."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: bytes | list[bytes]) -> None:
        self.sock.send_multipart(frames if isinstance(frames, list) else [frames])

    def receive(self, timeout: float = 10.0) -> p.Message:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return p.decode(self.sock.recv())

    def silent(self, timeout: float = 0.0) -> bool:
        return not self.sock.poll(int(timeout * 1000))

    def ask(self, message: p.Message, timeout: float = 10.0) -> p.Message:
        self.send(p.encode(message))
        return self.receive(timeout)


@pytest.fixture
def zmq_context():
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)  # every socket made from it: nothing waits at close
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def attacker(hub, zmq_context):
    return Attacker(zmq_context, hub.address)


V = p.PROTOCOL_VERSION  # what every well-formed message says


def body(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def array_ext(dtype, shape, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb([dtype, shape]) + data)


def nested(depth: int, value: object = 1) -> bytes:
    """A set request whose value nests ``depth`` levels in all, built by hand (msgpack's own
    packer stops at 512 levels)."""
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "op": "set", "id": 23, "pv": "X:a", "value": "VALUE"})
    return head.replace(msgpack.packb("VALUE"), b"\x91" * (depth - 1) + msgpack.packb(value))


def decodes(payload: bytes) -> bool:
    try:
        p.decode(payload)
    except ProtocolError:
        return False
    return True


def assert_serving(hub, attacker: Attacker, prefix: str, request_id: int = 10_000) -> None:
    """Rule 2: alive, and a good request gets its own answer (nothing stale before it)."""
    assert hub.process.poll() is None, "the daemon died"
    reply = attacker.ask(p.ReadRequest(id=request_id, pv=f"{prefix}dt"), timeout=15)
    assert isinstance(reply, p.Snapshot) and reply.id == request_id, reply


def wait_connected(attacker: Attacker, pv: str) -> None:
    ids = iter(range(90_000, 100_000))

    def connected() -> bool:
        reply = attacker.ask(p.ReadRequest(id=next(ids), pv=pv), timeout=10)
        return isinstance(reply, p.Snapshot) and reply.connected

    wait_until(connected, timeout=20, interval=0.05, message=f"{pv} did not connect")


def no_actor_restarted(attacker: Attacker) -> None:
    status = attacker.ask(p.StatusRequest(id=99_999)).status
    assert status["actors"] and all(a["restarts"] == 0 for a in status["actors"]), status["actors"]


BAD_MESSAGES = [
    # (what, payload, code, id the answer carries: the request's when it could be read)
    ("not msgpack", b"\xc1 not msgpack", "bad_message", 0),
    ("empty frame", b"", "bad_message", 0),
    ("truncated", body(v=V, op="read", id=3, pv="X:a")[:-3], "bad_message", 0),
    ("not a map", msgpack.packb([1, 2, 3]), "bad_message", 0),
    ("no v", body(op="read", id=4, pv="X:a"), "bad_message", 4),
    ("v is text", body(v="1", op="read", id=5, pv="X:a"), "bad_message", 5),
    ("v is bool", body(v=True, op="read", id=6, pv="X:a"), "bad_message", 6),
    ("wrong v", body(v=p.PROTOCOL_VERSION + 1, op="read", id=7, pv="X:a"), "unsupported_version", 7),
    ("unknown op", body(v=V, op="launch", id=8), "unknown_operation", 8),
    ("a reply's op", body(v=V, op="snapshot", id=9, pv="X:a", epoch=1, seq=1, connected=True),
     "unknown_operation", 9),
    ("no op", body(v=V, id=11), "bad_message", 11),
    ("op is a number", body(v=V, op=3, id=12), "bad_message", 12),
    ("no pv", body(v=V, op="read", id=13), "bad_message", 13),
    ("no value", body(v=V, op="set", id=14, pv="X:a"), "bad_message", 14),
    ("no id", body(v=V, op="read", pv="X:a"), "bad_message", 0),
    ("id is text", body(v=V, op="read", id="15", pv="X:a"), "bad_message", 0),
    ("pv is a number", body(v=V, op="read", id=16, pv=5), "bad_message", 16),
    ("pv is empty", body(v=V, op="describe", id=17, pv=""), "bad_message", 17),
    ("pv holds a NUL", body(v=V, op="read", id=18, pv="X:a\0b"), "bad_message", 18),
    ("publish is text", body(v=V, op="read", id=19, pv="X:a", publish="yes"), "bad_message", 19),
    ("pvs is text", body(v=V, op="ping", id=20, pvs="X:a"), "bad_message", 20),
    ("pvs holds maps", body(v=V, op="ping", id=21, pvs=[{"a": 1}]), "bad_message", 21),
    ("client is a list", body(v=V, op="hello", id=22, client=[1]), "bad_message", 22),
    ("33 levels", nested(33), "bad_message", 23),
    ("1000 levels", nested(1000), "bad_message", 23),
    ("100000 levels", nested(100_000), "bad_message", 0),  # past msgpack's stack: no id
    ("huge claimed array", b"\x85\xa1v\x01\xdd\xff\xff\xff\xff", "bad_message", 0),
    ("huge claimed str", body(v=V, op="read", id=24)[:-1] + b"\xdb\xff\xff\xff\xff", "bad_message", 0),
    ("unknown ext", body(v=V, op="set", id=25, pv="X:a", value=msgpack.ExtType(42, b"x")), "bad_message", 25),
    ("object dtype", body(v=V, op="set", id=26, pv="X:a", value=array_ext("|O", [1], b"\0" * 8)), "bad_message", 26),
    ("datetime dtype", body(v=V, op="set", id=27, pv="X:a", value=array_ext("<M8[s]", [1], b"\0" * 8)),
     "bad_message", 27),
    ("structured dtype", body(v=V, op="set", id=28, pv="X:a", value=array_ext("f8,i4", [1], b"\0" * 12)),
     "bad_message", 28),
    ("void dtype", body(v=V, op="set", id=29, pv="X:a", value=array_ext("|V8", [1], b"\0" * 8)), "bad_message", 29),
    ("shape too big", body(v=V, op="set", id=30, pv="X:a", value=array_ext("<f8", [2**62, 2**62], b"")),
     "bad_message", 30),
    ("negative dim", body(v=V, op="set", id=31, pv="X:a", value=array_ext("<f8", [-1], b"")), "bad_message", 31),
    ("short data", body(v=V, op="set", id=32, pv="X:a", value=array_ext("<f8", [3], b"\0" * 16)), "bad_message", 32),
    ("header not a list", body(v=V, op="set", id=33, pv="X:a", value=msgpack.ExtType(1, msgpack.packb("<f8"))),
     "bad_message", 33),
    ("not a character", body(v=V, op="set", id=34, pv="X:a",
                             value=array_ext("<U1", [1], b"\xff\xff\xff\xff")), "bad_message", 34),
]


@pytest.mark.system
@pytest.mark.timeout(120)
def test_each_bad_message_gets_its_error_code_with_the_request_id(hub, attacker, prefix):
    wrong = []
    for what, payload, code, request_id in BAD_MESSAGES:
        attacker.send(payload)
        reply = attacker.receive()
        if not (isinstance(reply, p.ErrorReply) and (reply.code, reply.id) == (code, request_id)):
            wrong.append((what, reply))
        assert hub.process.poll() is None, f"the daemon died of {what!r}"
    assert wrong == []
    assert_serving(hub, attacker, prefix)
    # Each that does not decode was logged, and never with the whole of what came.
    refused = log_events(hub, "bad_message")
    assert len(refused) == sum(1 for _, payload, _, _ in BAD_MESSAGES if not decodes(payload))
    assert max(len(str(event)) for event in refused) < 2000
    no_actor_restarted(attacker)


@pytest.mark.system
@pytest.mark.timeout(60)
def test_an_actors_op_from_a_client_is_answered_with_its_id(hub, attacker):
    attacker.send(body(v=V, op="adopt", id=10, pvs=["X:a"]))
    reply = attacker.receive()
    assert (reply.code, reply.id) == ("unknown_operation", 10)


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_pv_name_longer_than_channel_access_allows_harms_no_other_pv(hub, attacker, prefix):
    attacker.ask(p.ReadRequest(id=1, pv=prefix + "a" * 60))  # refused or never connected: either
    motor = EpicsSignal(f"{prefix}motor", name="motor")  # placed with it (same device prefix)
    motor.wait_for_connection(timeout=10)


# A value no PV of that kind can take: bad_value, with the request's id and the PV.
BAD_VALUES = [
    ("motor", {"x": 1.0}),
    ("motor", "abc"),
    ("motor", [[1.0, 2.0]]),
    ("motor", list(range(10**6))),  # a scalar: refused by its length
    ("motor", None),
    ("motor", "1e999"),
    ("motor", np.arange(3.0)),
    ("count", float("nan")),
    ("count", float("inf")),
    ("count", 2**40),
    ("count", 2**64 - 1),
    ("count", -(2**63)),
    ("mode", True),
    ("mode", 7),
    ("mode", "Bogus"),
    ("mode", float("nan")),
    ("text", "x" * 100),
    ("text", [1, 2]),
    ("text", {"a": "b"}),
    ("wave", list(range(17))),
    ("wave", list(range(10**6))),
    ("wave", [[1.0, 2.0], [3.0]]),
    ("wave", np.zeros(17)),
    ("wave", np.array([1 + 1j, 2j])),
    ("wave", {"x": [1, 2]}),
    ("chars", "x" * 41),
    ("chars", [300]),
]


@pytest.mark.system
@pytest.mark.timeout(120)
def test_put_values_of_the_wrong_type_are_bad_values(hub, attacker, prefix):
    for name in sorted({name for name, _ in BAD_VALUES}):
        wait_connected(attacker, f"{prefix}{name}")
    wrong = []
    for request_id, (name, value) in enumerate(BAD_VALUES, start=100):
        reply = attacker.ask(p.SetRequest(id=request_id, pv=f"{prefix}{name}", value=value), timeout=30)
        if not (isinstance(reply, p.ErrorReply) and (reply.code, reply.id, reply.pv)
                == ("bad_value", request_id, f"{prefix}{name}")):
            wrong.append((name, repr(value)[:40], reply))
    assert wrong == []
    # Nothing was put: the PVs hold what they held.
    motor = attacker.ask(p.ReadRequest(id=1, pv=f"{prefix}motor"))
    assert motor.reading.value == 0.0
    assert_serving(hub, attacker, prefix)
    good = attacker.ask(p.SetRequest(id=2, pv=f"{prefix}motor", value=[1.5]))  # one element: fine
    assert isinstance(good, p.SetAccepted)
    assert isinstance(attacker.receive(), p.SetDone)
    no_actor_restarted(attacker)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_garbage_envelopes_are_dropped_and_the_daemon_goes_on(hub, attacker, prefix):
    good = p.encode(p.ReadRequest(id=1, pv=f"{prefix}dt"))
    envelopes = [
        [b"", b""],
        [b"a", b"b", b"c"],
        [good, good],  # a good message in a bad envelope is not answered either
        [b"\x00"] * 100,
        [b"\xc1", good, b"x" * 100_000],
        [b""] * 1000,
    ]
    before = len(log_events(hub, "malformed_envelope"))
    for frames in envelopes:
        attacker.send(frames)
    # Answered in order: the first reply after the garbage is the good request's own.
    assert_serving(hub, attacker, prefix, request_id=2)
    assert attacker.silent(0.2)
    wait_until(lambda: len(log_events(hub, "malformed_envelope")) - before >= len(envelopes), timeout=5)
    no_actor_restarted(attacker)


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: pvhub\r\n\r\n",
    b"\xff" * 4096,
    bytes(range(256)) * 64,
    # A ZMTP 3 greeting that goes on with nonsense: a mechanism nobody knows, then noise.
    b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"BOGUS".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    + b"\x04\xffgarbage" * 50,
    # A NULL handshake that claims to be a socket type that does not exist, then frames.
    b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    + b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x05NOPE!" + b"\x00\x05hello" * 100,
    # A frame that claims 2**62 bytes.
    b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    + b"\x02\x40\x00\x00\x00\x00\x00\x00\x00",
]


def spray(port: int, payload: bytes) -> None:
    """Connect, send ``payload``, read until the peer closes or goes quiet, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        try:
            conn.sendall(payload)
            conn.settimeout(0.5)
            while conn.recv(65536):
                pass
        except (ConnectionError, TimeoutError, socket.timeout):
            pass


def assert_updates_of(frames: list[bytes], pv: str) -> None:
    """``frames`` are a readings message of ``pv``: its topic, then one or more updates."""
    topic, *payloads = frames
    assert topic == p.topic(pv) and payloads
    assert all(isinstance(update, p.Update) for update in readings_in(payloads))


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.mark.system
@pytest.mark.timeout(120)
def test_raw_garbage_on_the_request_and_readings_ports_harms_nobody(hub, attacker, prefix, zmq_context):
    hello = attacker.ask(p.HelloRequest(id=1, client="attacker"))
    subscriber = zmq_context.socket(zmq.SUB)
    subscriber.connect(hello.readings)
    subscriber.setsockopt(zmq.SUBSCRIBE, p.topic(f"{prefix}fast"))
    wait_connected(attacker, f"{prefix}fast")
    # Held open, never a word: neither port waits for it.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5)
            for port in (port_of(hub.address), port_of(hello.readings))]
    try:
        for port in (port_of(hub.address), port_of(hello.readings)):
            for payload in GARBAGE:
                spray(port, payload)
                assert hub.process.poll() is None
        assert_serving(hub, attacker, prefix)
        # Readings still flow to a subscriber that was there all along.
        assert subscriber.poll(10_000), "no readings after the garbage"
        assert_updates_of(subscriber.recv_multipart(), f"{prefix}fast")
    finally:
        for conn in idle:
            conn.close()
        subscriber.close()
    no_actor_restarted(attacker)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_garbage_subscription_frames_on_the_readings_socket_harm_nobody(hub, attacker, prefix, zmq_context):
    hello = attacker.ask(p.HelloRequest(id=1, client="attacker"))
    wait_connected(attacker, f"{prefix}fast")
    # An XSUB may send anything upstream; only frames starting 0x00 or 0x01 are (un)subscriptions.
    rogue = zmq_context.socket(zmq.XSUB)
    rogue.connect(hello.readings)
    # A peer of a type the XPUB does not pair with: its handshake fails.
    wrong_type = zmq_context.socket(zmq.PUB)
    wrong_type.connect(hello.readings)
    for frame in [b"", b"\x02junk", b"no prefix", b"\xff" * 1000, b"\x01" + b"x" * 100_000, b"\x00never subscribed"]:
        rogue.send(frame)
    for _ in range(2000):
        rogue.send(b"\x03" + b"garbage" * 10)
    rogue.send_multipart([b"\x01" + p.topic(f"{prefix}fast"), b"a second frame"])
    wrong_type.send_multipart([p.topic(f"{prefix}fast"), b"a fake reading"])
    # A well-behaved subscriber still gets real readings, and only real ones.
    good = zmq_context.socket(zmq.SUB)
    good.connect(hello.readings)
    good.setsockopt(zmq.SUBSCRIBE, p.topic(f"{prefix}fast"))
    try:
        seen = 0
        deadline = time.monotonic() + 15
        while seen < 5 and time.monotonic() < deadline:
            if good.poll(1000):
                assert_updates_of(good.recv_multipart(), f"{prefix}fast")
                seen += 1
        assert seen == 5, "readings stopped after the garbage subscriptions"
        assert_serving(hub, attacker, prefix)
    finally:
        good.close()
        rogue.close()
        wrong_type.close()
    no_actor_restarted(attacker)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_a_client_that_never_reads_does_not_stop_another(hub, attacker, prefix, zmq_context):
    wait_connected(attacker, f"{prefix}dt")
    hoarder = zmq_context.socket(zmq.DEALER)
    hoarder.setsockopt(zmq.RCVHWM, 10)  # its answers pile up in the daemon, not here
    hoarder.setsockopt(zmq.SNDTIMEO, 10_000)
    hoarder.connect(hub.address)
    sent = 0
    for request_id in range(20_000):
        try:
            hoarder.send(p.encode(p.ReadRequest(id=request_id, pv=f"{prefix}dt")))
        except zmq.Again:  # our own queue is full: the daemon stopped reading us; fine
            break
        sent += 1
    assert sent > 1000
    # Meanwhile a well-behaved client reads, sets and round-trips.
    motor = EpicsSignal(f"{prefix}motor", name="motor")
    motor.wait_for_connection(timeout=20)
    for target in (1.0, -2.5, 3.25):
        motor.set(target).wait(10)
        assert motor.get() == target
    assert_serving(hub, attacker, prefix)
    hoarder.close()
    no_actor_restarted(attacker)
