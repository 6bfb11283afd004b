"""The client's path for readings, made lean: ``readings.decode_reading`` and what follows it.

Rule 1: ``decode_reading`` and ``decode_readings`` are judged against ``decode`` alone: for any
bytes, both return equal messages or both refuse with the same ``ProtocolError`` (a frame of
several messages: message by message). Hypothesis generates the Updates
(arrays, text, None metadata, disconnected) and the ways to spoil them; no sockets.
Rule 2: the system test runs a real daemon and the zoo IOC's fast counter through a
subscribed ``EpicsSignalRO``: every reading arrives, in order, with no seq gap, and every
callback runs on the hub's callback thread.
Rule 3: what the daemon seldom sends (a frame broken part way, a message of several frames,
an ``Updates`` longer than the dispatcher's batch) is sent by a scripted peer on real loopback sockets: a hello, pings and reads of one
PV answered, then frames exactly as the test writes them.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from helpers import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvhub import protocol as p
from pvhub import readings as decoding
from pvhub.arrays import pack_default, unpack_ext
from pvhub.client.channel import Channel
from pvhub.errors import ProtocolError

# --- what the daemon sends -------------------------------------------------------------------

_INT64 = st.integers(-(2**63), 2**63 - 1)
_ARRAY_DTYPES = ("<f8", "<f4", "<i4", "<i8", "<u2", "|u1", "|b1", "<c16", "<U3", "|S4", ">i4")


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_ARRAY_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    count = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    if dtype.kind == "U":  # only code points a str may hold travel (decode refuses the others)
        return np.array(draw(st.lists(st.text(max_size=3), min_size=count, max_size=count)),
                        dtype=dtype).reshape(shape)
    if dtype.kind == "b":
        return np.frombuffer(bytes(b & 1 for b in raw), dtype=dtype).reshape(shape).copy()
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


values = st.one_of(
    st.none(),
    st.booleans(),
    _INT64,
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    arrays(),
    st.lists(st.integers(0, 9) | st.text(max_size=3), max_size=5),
)
readings = st.builds(
    p.Reading,
    value=values,
    timestamp=st.floats(0, 2e9) | st.integers(0, 2**40),
    severity=st.integers(0, 3),
    status=st.integers(0, 21),
)
metadata = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "native_type": st.sampled_from(["float", "int", "enum", "string", "char"]),
            "count": st.integers(0, 10**6),
            "units": st.text(max_size=5),
            "precision": st.none() | st.integers(0, 10),
            "upper_ctrl_limit": st.floats(allow_nan=False),
            "enum_strs": st.none() | st.lists(st.text(max_size=8), max_size=4),
            "write_access": st.booleans(),
        },
    ),
)
updates = st.builds(
    p.Update,
    pv=st.text(min_size=1, max_size=40).filter(lambda pv: "\0" not in pv),
    epoch=_INT64,
    seq=_INT64,
    connected=st.booleans(),
    reading=st.none() | readings,
    metadata=metadata,
    snapshot=st.booleans(),
)


def outcome(decoder: Any, data: bytes) -> tuple[str, Any]:
    """What ``decoder`` made of ``data``, comparable: the message's shape, or its refusal."""
    try:
        message = decoder(data)
    except ProtocolError as exc:
        return "refused", (type(exc), str(exc))
    return "accepted", _shape(message)


def _shape(obj: Any) -> Any:
    """A value whose ``==`` tells apart everything a message holds (arrays by dtype, shape
    and bytes; types exact, so that 1, 1.0 and True differ)."""
    if isinstance(obj, np.ndarray):
        return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, (p.Message, p.Reading)):
        return (type(obj).__name__, tuple((name, _shape(value)) for name, value in sorted(vars(obj).items())))
    if isinstance(obj, dict):
        return ("dict", tuple((key, _shape(value)) for key, value in obj.items()))
    if isinstance(obj, list):
        return ("list", tuple(_shape(item) for item in obj))
    return (type(obj).__name__, repr(obj))


# --- the fast decode: the same answers as decode (Rule 1) -----------------------------------------


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(updates)
def test_fast_decode_accepts_every_update_as_decode_does(update: p.Update) -> None:
    data = p.encode(update)
    fast = outcome(decoding.decode_reading, data)
    assert fast[0] == "accepted"
    assert fast == outcome(p.decode, data)
    assert _shape(decoding.decode_reading(data)) == _shape(update)


def test_fast_decode_takes_its_fast_path_for_a_plain_update(monkeypatch: pytest.MonkeyPatch) -> None:
    # The path is only worth having if the usual reading takes it: built without decode.
    update = p.Update(pv="X:fast", epoch=1, seq=7, connected=True, reading=p.Reading(7, 1.5))
    data = p.encode(update)
    calls: list[bytes] = []
    real = p.decode
    monkeypatch.setattr(decoding, "decode", lambda payload: calls.append(payload) or real(payload))
    assert decoding.decode_reading(data) == update
    assert calls == []
    assert decoding.decode_reading(p.encode(p.PvLost(pv="X:fast"))) == p.PvLost(pv="X:fast")
    assert len(calls) == 1  # anything else: decode's


def _body(update: p.Update) -> dict[str, Any]:
    return msgpack.unpackb(p.encode(update), raw=False, ext_hook=unpack_ext)


def _pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True, default=pack_default)


_PLAIN = p.Update(pv="X:a", epoch=5, seq=9, connected=True, reading=p.Reading(3.0, 100.0, 1, 2))


def _spoiled() -> list[tuple[str, bytes]]:
    """An Update's bytes spoiled one way at a time: wrong types, missing and extra fields,
    nesting, framing. Some are still valid (an unknown field is ignored, Rule 2 of protocol)."""
    cases: list[tuple[str, bytes]] = []
    wrong = {
        "v": [2, True, "1", None, 1.0],
        "op": ["pv_lost", "nonsense", 5, None],
        "pv": ["", "X\0a", 5, None, b"X:a"],
        "epoch": [True, 1.5, "5", None],
        "seq": [False, 2.0, None, [1]],
        "connected": [1, 0, None, "yes"],
        "snapshot": [1, None, "no"],
        "reading": [[3.0, 100.0], 5, "r", {"value": 1}, {"value": 1, "timestamp": "t", "severity": 0, "status": 0},
                    {"value": 1, "timestamp": 1.0, "severity": 0.5, "status": 0},
                    {"value": 1, "timestamp": 1.0, "severity": 0, "status": True},
                    {"value": 1, "timestamp": 1.0, "severity": 0, "extra": 0},
                    {"value": 1, "timestamp": 1.0, "severity": 0, "status": 0, "extra": 0},
                    {"timestamp": 1.0, "severity": 0, "status": 0}],
        "metadata": [[1, 2], "m", 5, {"units": "mm"}, {1: 2}],
    }
    for field, spoilers in wrong.items():
        for spoiler in spoilers:
            body = _body(_PLAIN)
            body[field] = spoiler
            cases.append((f"{field}={spoiler!r}", _pack(body)))
    for field in ("v", "op", "pv", "epoch", "seq", "connected", "reading", "metadata", "snapshot"):
        body = _body(_PLAIN)
        del body[field]
        cases.append((f"without {field}", _pack(body)))
    body = _body(_PLAIN)
    body["later_field"] = [1, 2]
    cases.append(("an unknown field", _pack(body)))
    body = _body(_PLAIN)
    del body["snapshot"]
    body["later_field"] = 1  # as many keys as an Update, not its keys
    cases.append(("a field swapped for an unknown one", _pack(body)))
    deep: Any = 1
    for _ in range(p.MAX_DEPTH + 2):
        deep = [deep]
    for where in ("value", "metadata"):
        body = _body(_PLAIN)
        if where == "value":
            body["reading"]["value"] = deep
        else:
            body["metadata"] = {"units": deep}
        cases.append((f"{where} nested too deep", _pack(body)))
    shallow: Any = 1
    for _ in range(p.MAX_DEPTH - 4):
        shallow = [shallow]
    body = _body(_PLAIN)
    body["reading"]["value"] = shallow
    cases.append(("value nested deep, within the limit", _pack(body)))
    good = p.encode(_PLAIN)
    cases += [
        ("cut short", good[:-3]),
        ("empty", b""),
        ("not msgpack", b"\xc1\xc1\xc1"),
        ("a list, not a map", _pack([1, 2, 3])),
        ("a number", _pack(5)),
        ("an unknown extension", _pack({**_body(_PLAIN), "reading": {"value": msgpack.ExtType(9, b"x"),
                                                                    "timestamp": 1.0, "severity": 0, "status": 0}})),
        ("an array header that lies", _pack({**_body(_PLAIN), "reading": {
            "value": msgpack.ExtType(1, msgpack.packb(["<f8", [1000]]) + b"\0" * 8),
            "timestamp": 1.0, "severity": 0, "status": 0}})),
        ("a pv_lost", p.encode(p.PvLost(pv="X:a", reason="gone"))),
        ("a hub_stopping", p.encode(p.HubStopping(reason="bye"))),
        ("trailing bytes", good + b"\x00"),
    ]
    return cases


@pytest.mark.parametrize("data", [data for _, data in _spoiled()], ids=[name for name, _ in _spoiled()])
def test_fast_decode_refuses_and_accepts_spoiled_updates_as_decode_does(data: bytes) -> None:
    assert outcome(decoding.decode_reading, data) == outcome(p.decode, data)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(updates, st.randoms(use_true_random=False))
def test_fast_decode_answers_damaged_bytes_as_decode_does(update: p.Update, random: Any) -> None:
    data = bytearray(p.encode(update))
    for _ in range(random.randint(1, 3)):
        choice = random.random()
        if choice < 0.5 and data:
            data[random.randrange(len(data))] = random.randrange(256)
        elif choice < 0.8:
            del data[random.randrange(len(data) + 1):]
        else:
            data.insert(random.randrange(len(data) + 1), random.randrange(256))
    assert outcome(decoding.decode_reading, bytes(data)) == outcome(p.decode, bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fast_decode_of_any_bytes_is_a_message_or_a_protocol_error(data: bytes) -> None:
    assert outcome(decoding.decode_reading, data) == outcome(p.decode, data)


# --- a frame of several messages (protocol Rule 8) ---------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(updates, min_size=1, max_size=6))
def test_a_frame_of_updates_back_to_back_decodes_to_each_as_decode_does(batch: list[p.Update]) -> None:
    pieces = [p.encode(update) for update in batch]
    decoded = list(decoding.decode_readings(b"".join(pieces)))
    assert [_shape(m) for m in decoded] == [outcome(p.decode, piece)[1] for piece in pieces]


def test_a_frame_of_one_update_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    update = p.Update(pv="X:fast", epoch=1, seq=7, connected=True, reading=p.Reading(7, 1.5))
    calls: list[bytes] = []
    real = p.decode
    monkeypatch.setattr(decoding, "decode", lambda payload: calls.append(payload) or real(payload))
    assert list(decoding.decode_readings(p.encode(update) * 3)) == [update] * 3
    assert calls == []
    lost = p.PvLost(pv="X:fast")
    assert list(decoding.decode_readings(p.encode(update) + p.encode(lost))) == [update, lost]
    assert calls == [p.encode(lost)]  # anything else: decode's, given its own bytes only


def _decoded_until_refused(frame: bytes) -> tuple[list[Any], Any]:
    got: list[Any] = []
    try:
        for message in decoding.decode_readings(frame):
            got.append(_shape(message))
    except ProtocolError as exc:
        return got, type(exc)
    return got, None


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(updates, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_a_damaged_frame_gives_the_messages_before_the_damage_then_a_protocol_error(
        batch: list[p.Update], random: Any) -> None:
    pieces = [p.encode(update) for update in batch]
    frame = bytearray(b"".join(pieces))
    at = random.randrange(len(frame))
    choice = random.random()
    if choice < 0.5:
        frame[at] = random.randrange(256)
    elif choice < 0.8:
        del frame[at:]
    else:
        frame.insert(at, random.randrange(256))
    got, error = _decoded_until_refused(bytes(frame))
    # The messages wholly before the damage come out as they went in.
    whole, offset = 0, 0
    for piece in pieces:
        if offset + len(piece) > at:
            break
        offset, whole = offset + len(piece), whole + 1
    assert got[:whole] == [_shape(update) for update in batch[:whole]]
    assert error is None or issubclass(error, ProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_a_frame_of_any_bytes_is_messages_then_perhaps_a_protocol_error(data: bytes) -> None:
    got, error = _decoded_until_refused(data)
    assert error is None or issubclass(error, ProtocolError)
    if not got and error is None:
        assert data == b""


# --- consecutive changes as one Updates message (protocol Rule 8) --------------------------------


@st.composite
def gathered(draw: st.DrawFn) -> p.Updates:
    first = draw(_INT64.filter(lambda seq: seq < 2**63 - 10))
    items = [[first + i, r.value, r.timestamp, r.severity, r.status]
             for i, r in enumerate(draw(st.lists(readings, min_size=1, max_size=5)))]
    pv = draw(st.text(min_size=1, max_size=40).filter(lambda name: "\0" not in name))
    return p.Updates(pv=pv, epoch=draw(_INT64), items=items)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(gathered())
def test_an_updates_message_decodes_on_the_fast_path_as_decode_does(message: p.Updates) -> None:
    data = p.encode(message)
    assert outcome(p.decode, data)[0] == "accepted"
    assert [_shape(m) for m in decoding.decode_readings(data)] == [outcome(p.decode, data)[1]]
    assert _shape(p.decode(data)) == _shape(message)


@pytest.mark.parametrize("items, problem", [
    ([], "one or more"),
    ([[1, 2.0, 1.0, 0]], "each must be"),
    ([[1, 2.0, 1.0, 0, 0], [3, 2.0, 1.0, 0, 0]], "one more than"),
    ([[1, 2.0, "now", 0, 0]], "timestamp"),
    ([[1, 2.0, 1.0, 0, True]], "severity and status"),
    ([[True, 2.0, 1.0, 0, 0]], "seq"),
    (["not a list"], "each must be"),
])
def test_spoiled_updates_are_refused_by_both_decoders_alike(items: list, problem: str) -> None:
    data = _pack({"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": 1, "items": items})
    refused = outcome(p.decode, data)
    assert refused[0] == "refused" and problem in refused[1][1]
    assert outcome(lambda d: list(decoding.decode_readings(d))[0], data) == refused


_GOOD_ITEMS = [[1, 2.0, 1.0, 0, 0]]


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("body", [
    {"v": p.PROTOCOL_VERSION - 1, "op": "updates", "pv": "X:a", "epoch": 1, "items": _GOOD_ITEMS},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "", "epoch": 1, "items": _GOOD_ITEMS},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:\0a", "epoch": 1, "items": _GOOD_ITEMS},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": True, "items": _GOOD_ITEMS},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": 1, "items": "nope"},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": 1, "items": [[1, _deep(40), 1.0, 0, 0]]},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": 1, "items": [[1, _deep(5), 1.0, 0, 0]]},
    {"v": p.PROTOCOL_VERSION, "op": "updates", "pv": "X:a", "epoch": 1, "items": _GOOD_ITEMS, "more": 1},
], ids=["old version", "empty pv", "pv with NUL", "bool epoch", "items not a list", "too deep", "deep enough",
        "a field more"])
def test_updates_on_the_fast_path_are_judged_as_decode_judges_them(body: dict) -> None:
    data = _pack(body)
    assert outcome(lambda d: list(decoding.decode_readings(d))[0], data) == outcome(p.decode, data)


def test_a_frame_of_one_message_is_decoded_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # A big array's frame holds it alone: msgpack's Unpacker would copy it once more.
    update = p.Update(pv="X:big", epoch=1, seq=1, connected=True, reading=p.Reading(np.arange(300_000.0), 1.0))
    frame = p.encode(update)

    def several(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a frame of one message taken apart as one of several")

    monkeypatch.setattr(decoding, "_each_reading", several)
    (decoded,) = decoding.decode_readings(frame)
    assert _shape(decoded) == _shape(update)


def test_an_updates_item_stands_for_the_update_it_replaces() -> None:
    message = p.Updates(pv="X:a", epoch=3, items=[[7, 1.5, 10.0, 1, 2], [8, 2.5, 11.0, 0, 0]])
    assert list(message.each()) == [
        p.Update(pv="X:a", epoch=3, seq=7, connected=True, reading=p.Reading(1.5, 10.0, 1, 2)),
        p.Update(pv="X:a", epoch=3, seq=8, connected=True, reading=p.Reading(2.5, 11.0, 0, 0)),
    ]


def test_the_actor_gathers_runs_of_value_changes_and_sends_the_rest_as_they_are() -> None:
    from pvhub.actors.loop import JOIN_LIMIT, readings_frames

    def change(seq: int, value: Any = None, **fields: Any) -> p.Update:
        return p.Update(pv="X:a", epoch=1, seq=seq, connected=True,
                        reading=p.Reading(seq if value is None else value, 100.0 + seq), **fields)

    snapshot = change(3, snapshot=True)
    meta = change(6, metadata={"units": "mm"})
    updates = [change(1), change(2), snapshot, change(4), change(5), meta, change(7), change(9)]
    topic, frame = readings_frames("X:a", updates)
    assert topic == p.topic("X:a")
    sent = list(decoding.decode_readings(frame))
    assert [type(m).__name__ for m in sent] == ["Updates", "Update", "Updates", "Update", "Update", "Update"]
    assert [m.items for m in sent if isinstance(m, p.Updates)] == [
        [[1, 1, 101.0, 0, 0], [2, 2, 102.0, 0, 0]], [[4, 4, 104.0, 0, 0], [5, 5, 105.0, 0, 0]]]
    # What a reader makes of it is the updates as they were, in order.
    expanded = [u for m in sent for u in (m.each() if isinstance(m, p.Updates) else [m])]
    assert expanded == updates
    # A big array is never copied into a joined frame: each message goes as its own frame.
    big = np.zeros(JOIN_LIMIT // 8 + 1)
    frames = readings_frames("X:a", [change(1), change(2), change(3, big)])
    assert len(frames) == 3 and [type(m).__name__ for m in decoding.decode_readings(frames[1])] == ["Updates"]
    assert list(decoding.decode_readings(frames[2]))[0].reading.value.shape == big.shape
    assert readings_frames("X:a", [change(1)])[1] == p.encode(change(1))
    # Disconnected, without a reading, or of another epoch (a new actor): never in a run.
    gone = p.Update(pv="X:a", epoch=1, seq=3, connected=False, reading=None)
    newer = p.Update(pv="X:a", epoch=2, seq=4, connected=True, reading=p.Reading(4, 104.0))
    updates = [change(1), change(2), gone, newer, p.Update(pv="X:a", epoch=2, seq=5, connected=True,
                                                        reading=p.Reading(5, 105.0))]
    sent = list(decoding.decode_readings(readings_frames("X:a", updates)[1]))
    assert [type(m).__name__ for m in sent] == ["Updates", "Update", "Updates"]
    assert [u for m in sent for u in (m.each() if isinstance(m, p.Updates) else [m])] == updates


class _Listener:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []

    def on_channel(self, kind: str, channel: Channel, old: Any) -> None:
        self.seen.append((kind, old, channel.version))


def _events(channel: Channel) -> list[tuple[str, Any, int]]:
    listener = _Listener()
    channel.add_listener(listener.on_channel)
    channel.keep = listener  # type: ignore[attr-defined]  # held weakly by the channel
    return listener.seen


class _CountingHub:
    def __init__(self) -> None:
        self.resyncs = 0

    def resync(self, channel: Channel) -> None:
        self.resyncs += 1


def _prepared(how: str) -> Channel:
    channel = Channel(_CountingHub(), "X:a")  # type: ignore[arg-type]
    if how in ("attached", "gap", "new epoch"):
        channel.apply(1, 0, True, p.Reading(4, 9.0), {"units": ""}, from_stream=False)
    elif how == "lost":
        channel.apply(1, 0, True, p.Reading(4, 9.0), {"units": ""}, from_stream=False)
        channel.lose("the actor died")
    return channel  # "new": nothing applied yet, not attached


@pytest.mark.parametrize("how, epoch, first", [
    ("attached", 1, 1), ("gap", 1, 3), ("new epoch", 2, 1), ("lost", 2, 1), ("new", 1, 5)])
def test_an_updates_message_changes_any_channel_as_its_updates_one_by_one_would(how: str, epoch: int,
                                                                                 first: int) -> None:
    message = p.Updates(pv="X:a", epoch=epoch, items=[[first, 5, 10.0, 0, 0], [first + 1, 5, 10.0, 0, 0],
                                                      [first + 2, 6, 11.0, 0, 0], [first + 3, 7, 12.0, 1, 0]])
    (gathered, gathered_events), (single, single_events) = [
        (channel, _events(channel)) for channel in (_prepared(how), _prepared(how))]
    gathered.apply_updates(message.epoch, message.items)
    for update in message.each():
        single.apply(update.epoch, update.seq, update.connected, update.reading, update.metadata, from_stream=True)
    assert gathered_events == single_events
    for name in ("seq", "epoch", "reading", "connected", "attached", "version", "value_version", "previous",
                 "missed", "gaps"):
        assert getattr(gathered, name) == getattr(single, name), name
    assert gathered.hub.resyncs == single.hub.resyncs


def test_an_updates_message_changes_a_channel_as_its_updates_one_by_one_would() -> None:
    message = p.Updates(pv="X:a", epoch=1, items=[[1, 5, 10.0, 0, 0], [2, 5, 10.0, 0, 0], [3, 6, 11.0, 0, 0],
                                                 [4, 7, 12.0, 1, 0]])
    channels = []
    for _ in range(2):
        channel = Channel(_StubHub(), "X:a")  # type: ignore[arg-type]
        channel.live = True  # its subscription proven: this is about the stream, not its start
        channel.apply(1, 0, True, p.Reading(4, 9.0), {"units": ""}, from_stream=False)
        channels.append((channel, _events(channel)))
    (gathered_channel, gathered_events), (single_channel, single_events) = channels
    gathered_channel.apply_updates(message.epoch, message.items)
    for update in message.each():
        single_channel.apply(update.epoch, update.seq, update.connected, update.reading, update.metadata,
                             from_stream=True)
    assert gathered_events == single_events and len(gathered_events) == 3  # 5 twice is one change
    for name in ("seq", "epoch", "reading", "version", "value_version", "previous", "missed", "gaps"):
        assert getattr(gathered_channel, name) == getattr(single_channel, name), name


# --- the channel wakes its waiters, and only them -----------------------------------------------


class _StubHub:
    def resync(self, channel: Channel) -> None:
        pass


@pytest.mark.timeout(10)
def test_a_waiter_is_woken_by_the_reading_it_waits_for() -> None:
    channel = Channel(_StubHub(), "X:a")  # type: ignore[arg-type]
    channel.live = True  # its subscription proven: the snapshot is what makes it ready
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(channel.wait(lambda: channel.ready, 5.0)))
    waiting.start()
    wait_until(lambda: channel._waiters == 1, 5.0, message="the waiter never waited")
    channel.apply(1, 0, True, p.Reading(1.0, 1.0), {"units": ""}, from_stream=False)
    waiting.join(5.0)
    assert result == [True]
    assert channel._waiters == 0


# --- a real stream (Rule 2) ------------------------------------------------------------------------

@pytest.mark.system
@pytest.mark.timeout(90)
def test_a_fast_counter_arrives_in_order_without_gaps_on_the_callback_thread(hub, prefix):
    from pvhub.client import EpicsSignal, EpicsSignalRO

    rate = EpicsSignal(f"{prefix}fast_rate", name="rate")
    fast = EpicsSignalRO(f"{prefix}fast", name="fast")
    meta = EpicsSignalRO(f"{prefix}fast", name="fast_meta")
    for signal in (rate, fast, meta):
        signal.wait_for_connection(timeout=15)
    seen: list[tuple[int, str]] = []  # (value, thread name)
    connections: list[bool] = []
    fast.subscribe(lambda value, **kwargs: seen.append((value, threading.current_thread().name)))
    meta.subscribe(lambda connected, **kwargs: connections.append(connected), event_type="meta")
    start = len(seen)
    try:
        rate.set(1000.0).wait(10)
        wait_until(lambda: len(seen) - start >= 3000, 60.0,
                   message=lambda: f"{len(seen) - start} readings arrived")
    finally:
        rate.set(0.0).wait(10)

    assert {name for _, name in seen} == {"pvhub-callbacks"}, "a callback ran off the callback thread"
    values = [value for value, _ in seen]
    assert all(a < b for a, b in zip(values, values[1:])), "readings out of order"
    assert fast.missed_updates == 0 and fast.update_gaps == 0
    assert connections and connections[0] is True
    # The channel's latest value is the last one its callback got, once the stream is still.
    wait_until(lambda: fast.read()["fast"]["value"] == seen[-1][0], 10.0,
               message=lambda: f"read {fast.read()['fast']['value']}, last callback {seen[-1][0]}")


# --- a readings message of several updates -----------------------------------------------------


class ScriptedDaemon:
    """The daemon's two sockets and nothing behind them: it answers hello, pings and reads
    of one PV, and publishes what the test hands it, frame by frame, as it is told. Real
    ZeroMQ sockets on loopback; one thread owns them."""

    def __init__(self, pv: str) -> None:
        self.pv = pv
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self._router.bind_to_random_port('tcp://127.0.0.1')}"
        self._readings = f"tcp://127.0.0.1:{self._pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.outbox: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-daemon", daemon=True)
        self._thread.start()

    def update(self, seq: int, value: int) -> bytes:
        return p.encode(p.Update(pv=self.pv, epoch=1, seq=seq, connected=True, reading=p.Reading(value, 1.0 + seq)))

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._router.poll(10):
                    client, payload = self._router.recv_multipart()
                    self._answer(client, p.decode(payload))
                while not self.outbox.empty():
                    self._pub.send_multipart(self.outbox.get())
        finally:
            self._router.close()
            self._pub.close()
            self._ctx.term()

    def _answer(self, client: bytes, request: p.Message) -> None:
        if isinstance(request, p.HelloRequest):
            reply: p.Message = p.HelloReply(id=request.id, readings=self._readings, server_version="scripted")
        elif isinstance(request, p.PingRequest):
            reply = p.Pong(id=request.id)
        elif isinstance(request, p.ReadRequest) and request.pv == self.pv:
            reply = p.Snapshot(id=request.id, pv=self.pv, epoch=1, seq=0, connected=True,
                               reading=p.Reading(0, 1.0), metadata={"native_type": "int", "units": ""})
            if request.publish:  # proves the subscription (hub.py, Rule 4)
                self._pub.send_multipart([p.topic(self.pv), self.update(0, 0)])
        else:
            reply = p.ErrorReply(id=getattr(request, "id", 0), code="bad_message", message="not scripted")
        self._router.send_multipart([client, p.encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.timeout(30)
def test_a_pv_whose_readings_never_arrive_is_not_connected_and_says_where_it_waited() -> None:
    # The daemon answers, but its readings address cannot be reached from here (a firewall,
    # a wrong interface): a snapshot alone does not make the Signal connected (channel.py
    # Rule 2), and the error names the address to look at.
    from pvhub.client import ConnectionTimeoutError, EpicsSignalRO
    from pvhub.client.hub import Hub
    from pvhub.testing import free_tcp_port

    daemon = ScriptedDaemon("S:counter")
    daemon._readings = f"tcp://127.0.0.1:{free_tcp_port()}"  # nobody publishes there
    hub = Hub(daemon.address, name="unreachable-readings")
    try:
        signal = EpicsSignalRO("S:counter", name="counter", hub=hub)
        with pytest.raises(ConnectionTimeoutError, match="none of its readings arrived from tcp://127.0.0.1:"):
            signal.wait_for_connection(timeout=1.0)
        channel = hub.channel("S:counter")
        assert channel.attached and channel.connected and not channel.live and not signal.connected
    finally:
        hub.close()
        daemon.close()


@pytest.mark.timeout(30)
def test_a_readings_message_of_several_updates_is_applied_in_full_and_in_order() -> None:
    from pvhub.client import EpicsSignalRO
    from pvhub.client.hub import Hub

    daemon = ScriptedDaemon("S:counter")
    hub = Hub(daemon.address, name="fast-path-test")
    try:
        signal = EpicsSignalRO("S:counter", name="counter", hub=hub)
        signal.wait_for_connection(timeout=10)
        channel = hub.channel("S:counter")
        wait_until(lambda: channel.live, 10, message="the subscription was never proven")
        seen: list[tuple[int, str]] = []
        signal.subscribe(lambda value, **kwargs: seen.append((value, threading.current_thread().name)))
        topic = p.topic("S:counter")
        daemon.outbox.put([topic, daemon.update(1, 1), daemon.update(2, 2), daemon.update(3, 3)])
        daemon.outbox.put([topic, daemon.update(4, 4)])
        # A spoiled frame among good ones costs that frame only.
        daemon.outbox.put([topic, b"\xc1 not msgpack", daemon.update(5, 5)])
        daemon.outbox.put([topic])  # a topic alone: nothing
        daemon.outbox.put([topic, daemon.update(6, 6)])
        # Updates back to back in one frame (protocol Rule 8), as an actor sends them, and a
        # joined frame next to frames of their own in one message.
        daemon.outbox.put([topic, daemon.update(7, 7) + daemon.update(8, 8) + daemon.update(9, 9)])
        daemon.outbox.put([topic, daemon.update(10, 10) + daemon.update(11, 11), daemon.update(12, 12)])
        # A frame broken part way: what comes before the break counts, the frame after it too.
        daemon.outbox.put([topic, daemon.update(13, 13) + b"\xc1 broken", daemon.update(14, 14)])
        # Consecutive changes as one Updates, longer than the dispatcher's batch, then an Update.
        run = [[seq, seq, 1.0 + seq, 0, 0] for seq in range(15, 15 + 300)]
        daemon.outbox.put([topic, p.encode(p.Updates(pv="S:counter", epoch=1, items=run)) + daemon.update(315, 315)])
        wait_until(lambda: len(seen) >= 316, 10, message=lambda: f"callbacks got {len(seen)}, from {seen[:1]}")
        assert [value for value, _ in seen] == list(range(316))
        assert {name for _, name in seen} == {"pvhub-callbacks"}
        assert signal.missed_updates == 0
        assert signal.get() == 315
    finally:
        hub.close()
        daemon.close()


@pytest.mark.timeout(30)
def test_a_subscription_gets_every_change_after_subscribe_while_the_callback_thread_is_busy() -> None:
    """ophyd's subscribe runs the callback with the current value before it returns, and every
    change after it reaches the callback: the state is taken in ``subscribe``, not when the
    callback thread comes to the first call (subscriptions.py, Rule 1)."""
    from pvhub.client import EpicsSignalRO
    from pvhub.client.hub import Hub

    daemon = ScriptedDaemon("S:counter")
    hub = Hub(daemon.address, name="subscribe-test")
    release = threading.Event()
    try:
        signal = EpicsSignalRO("S:counter", name="counter", hub=hub)
        signal.wait_for_connection(timeout=10)
        channel = hub.channel("S:counter")
        wait_until(lambda: channel.live, 10, message="the subscription was never proven")
        blocking = threading.Event()

        def block(**kwargs: object) -> None:
            blocking.set()
            release.wait(20)

        signal.subscribe(block)  # its first call holds the callback thread
        assert blocking.wait(10)
        seen: list[int] = []
        signal.subscribe(lambda value, **kwargs: seen.append(value))
        topic = p.topic("S:counter")
        for seq in (1, 2, 3):
            daemon.outbox.put([topic, daemon.update(seq, seq)])
        wait_until(lambda: channel.reading is not None and channel.reading.value == 3, 10,
                   message="the I/O thread never applied the changes")
        assert seen == []  # the callback thread is still held
        release.set()
        wait_until(lambda: len(seen) >= 4, 10, message=lambda: f"callbacks got {seen}")
        assert seen == [0, 1, 2, 3]
    finally:
        release.set()
        hub.close()
        daemon.close()
