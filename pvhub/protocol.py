"""The wire protocol: every message that crosses a socket, defined once.

Rule 1: nothing else in pvhub builds or parses a wire message; it calls ``encode``/``decode``.
Rule 2: a message is a msgpack map ``{"v": PROTOCOL_VERSION, "op": <op>, ...fields}``. A peer
rejects a message whose major version differs, and ignores fields it does not know (so that a
later minor version can add some).
Rule 3: requests carry a client-chosen ``id``; every reply and error carries the same ``id``.
A ``set`` gets two replies: ``SetAccepted`` (or an ``ErrorReply`` at once), then ``SetDone`` or an
``ErrorReply`` when the IOC's put-completion arrives. A client that waits for the completion
anyway asks for no ``SetAccepted`` (``accepted=False``): one message less each way, on the
path every plan step waits on.
Rule 4: readings are published on topic ``pv.encode() + b"\\0"`` (the NUL makes ZeroMQ's prefix
match exact). A readings message is that topic frame followed by one or more frames of
messages of that PV, in order (Rule 8; an actor batches a fast PV's updates). ``seq`` counts per PV per actor
incarnation; ``epoch`` names the incarnation, so a subscriber detects both gaps and restarts
(the ZeroMQ guide's Clone pattern). A message that carries an array of ``LARGE_BYTES`` or
more goes on ``large_topic(pv)``, the topic with ``LARGE_MARK`` after its NUL: a
subscription to the PV's topic takes it too (a prefix), and the daemon sends the PV's
messages from then on through its socket for large readings, whose queue per client is
short (daemon security.py Rule 6).
Rule 5: arrays travel as raw bytes with dtype and shape (a msgpack ext type, ``pvhub.arrays``),
never element by element; numpy scalars travel as plain numbers. Nothing is ever pickled.
Rule 6: ``decode`` refuses any malformed input with ``ProtocolError`` and allocates nothing
beyond what arrived.
Rule 7: ``decode_reading`` is ``decode`` for the readings socket: what it returns or refuses is
exactly what ``decode`` returns or refuses; it is only quicker for the usual ``Update`` and
``Updates``.
Rule 8: a readings message is a topic frame and one or more frames, each holding one or more
encoded messages back to back (msgpack delimits them): an actor puts the updates of a PV
that it sends together in one frame, so a client reads one frame, not one per update.
``decode_readings`` takes such a frame apart, message by message as ``decode_reading``.
Consecutive value changes go as one ``Updates`` message (an array per change, no map, no
repeated names): what a client decodes per reading is a few list items.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, TypedDict

import msgpack
import numpy as np

from pvhub.arrays import pack_default, unpack_ext
from pvhub.errors import ProtocolError, UnknownOperationError, UnsupportedVersionError

# 2: readings may carry ``Updates`` (Rule 8), which a version 1 client cannot read: it is
# refused at its hello instead of losing a fast PV's readings unseen, with an error written
# in its own version (``encode(..., version=)``) so that it can read why.
# 3: large readings come from a second readings socket (Rule 4, ``HelloReply.large_readings``);
# a version 2 client would not connect to it and would never see an image.
PROTOCOL_VERSION = 3


# --- shared shapes -------------------------------------------------------------------------


class PVMetadata(TypedDict, total=False):
    """What an actor knows about its PV beyond the value (CA's control structure)."""

    native_type: str  # "float", "int", "enum", "string", "char"
    native_bits: int  # of a number: 16 (CA's SHORT), 32 (LONG, FLOAT), 64 (DOUBLE), 8 (CHAR)
    count: int
    units: str
    precision: int | None
    lower_ctrl_limit: float
    upper_ctrl_limit: float
    lower_disp_limit: float
    upper_disp_limit: float
    lower_alarm_limit: float
    upper_alarm_limit: float
    lower_warning_limit: float
    upper_warning_limit: float
    enum_strs: list[str] | None
    read_access: bool
    write_access: bool
    host: str


@dataclass(frozen=True)
class Reading:
    """One value of a PV with its EPICS timestamp and alarm."""

    value: Any
    timestamp: float
    severity: int = 0
    status: int = 0


def same_reading(a: Reading | None, b: Reading | None) -> bool:
    """Whether two readings are the same (arrays compared by value; a NaN is the same as a
    NaN, as a reading repeated is the same reading)."""
    if a is None or b is None:
        return a is b
    if (a.timestamp, a.severity, a.status) != (b.timestamp, b.severity, b.status):
        return False
    x, y = a.value, b.value
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        floats = isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype.kind == y.dtype.kind == "f"
        return bool(np.array_equal(x, y, equal_nan=floats))
    return bool(x == y) or (x != x and y != y)


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Base of every wire message; ``OP`` names it on the wire."""

    OP: ClassVar[str] = ""


# Client -> daemon requests. ``id`` is chosen by the client, unique among its pending ones.


@dataclass(frozen=True)
class HelloRequest(Message):
    """First words of a client: which protocol it speaks and who it is."""

    OP: ClassVar[str] = "hello"
    id: int
    client: str = ""
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class ReadRequest(Message):
    """Ask for a PV's snapshot; ``publish`` also sends it on the readings topic (proves a
    subscription is live: whatever reaches a SUB after it arrives in order)."""

    OP: ClassVar[str] = "read"
    id: int
    pv: str
    publish: bool = False
    # Ask the IOC (a Channel Access read, in order with this actor's puts on its circuit)
    # instead of answering from the actor's copy: ophyd's and pyepics' reads without monitor.
    fresh: bool = False


@dataclass(frozen=True)
class DescribeRequest(Message):
    """Ask for a PV's metadata."""

    OP: ClassVar[str] = "describe"
    id: int
    pv: str


@dataclass(frozen=True)
class SetRequest(Message):
    """Put ``value`` with completion; see Rule 3 for the replies."""

    OP: ClassVar[str] = "set"
    id: int
    pv: str
    value: Any
    # Rule 3: whether the put's acceptance is answered (``SetAccepted``) before its end. A
    # daemon that predates the field answers it whatever this says; clients take it as they
    # take any reply that is not the last.
    accepted: bool = True


@dataclass(frozen=True)
class StatusRequest(Message):
    """Ask the daemon for its PVs, actors and clients."""

    OP: ClassVar[str] = "status"
    id: int


@dataclass(frozen=True)
class PingRequest(Message):
    """Heartbeat from a client; answered by ``Pong``. ``pvs``, when not None, is the full
    list of PVs the client follows now (sent when it changed), for ``pvhub status``."""

    OP: ClassVar[str] = "ping"
    id: int
    pvs: list | None = None


# Replies.


@dataclass(frozen=True)
class HelloReply(Message):
    """Where readings are published, and what the daemon runs."""

    OP: ClassVar[str] = "hello_reply"
    id: int
    readings: str
    server_version: str
    protocol: int = PROTOCOL_VERSION
    client: bytes = b""
    # The largest message the daemon takes (bigger ones drop the connection): a client
    # refuses a bigger request itself, with a clear error. 0: not said.
    max_message_bytes: int = 0
    # The identity the daemon knows this client by (its CURVE key's name, or "anonymous").
    identity: str = ""
    # Where large readings are published (Rule 4): a client subscribes there too.
    large_readings: str = ""


@dataclass(frozen=True)
class Snapshot(Message):
    """All a subscriber needs to start: the latest state of a PV with its ``seq``."""

    OP: ClassVar[str] = "snapshot"
    id: int
    pv: str
    epoch: int
    seq: int
    connected: bool
    reading: Reading | None = None
    metadata: PVMetadata | None = None


@dataclass(frozen=True)
class DescribeReply(Message):
    """A PV's metadata."""

    OP: ClassVar[str] = "describe_reply"
    id: int
    pv: str
    connected: bool
    metadata: PVMetadata | None = None


@dataclass(frozen=True)
class SetAccepted(Message):
    """The put was sent to the IOC; ``SetDone`` or an error follows."""

    OP: ClassVar[str] = "set_accepted"
    id: int
    pv: str


@dataclass(frozen=True)
class SetDone(Message):
    """The IOC reported the put complete; ``reading`` is the value read back after it."""

    OP: ClassVar[str] = "set_done"
    id: int
    pv: str
    epoch: int = 0
    seq: int = 0
    reading: Reading | None = None


@dataclass(frozen=True)
class StatusReply(Message):
    """The daemon's view of itself (``pvhub status``)."""

    OP: ClassVar[str] = "status_reply"
    id: int
    status: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pong(Message):
    """Answer to ``PingRequest``. ``pvs_wanted``: the daemon does not know which PVs this
    client follows (it forgot the client, or never heard): the next ping should say."""

    OP: ClassVar[str] = "pong"
    id: int
    pvs_wanted: bool = False
    # Ids of this client's requests whose final reply the daemon could not deliver (its
    # queue for this client was full): they will never be answered otherwise.
    lost: list | None = None


@dataclass(frozen=True)
class ErrorReply(Message):
    """A request failed; ``code`` is one of ``pvhub.errors``' codes."""

    OP: ClassVar[str] = "error"
    id: int
    code: str
    message: str
    pv: str = ""


# Published on the readings sockets.


@dataclass(frozen=True)
class Update(Message):
    """One change of a PV: a new reading, a connection change, or a snapshot (same ``seq``
    as the last change, sent so that a new subscriber knows its subscription is live)."""

    OP: ClassVar[str] = "update"
    pv: str
    epoch: int
    seq: int
    connected: bool
    reading: Reading | None = None
    metadata: PVMetadata | None = None
    snapshot: bool = False


@dataclass(frozen=True)
class Updates(Message):
    """Consecutive changes of one PV's value, gathered (Rule 8): ``items`` holds
    ``[seq, value, timestamp, severity, status]`` for each, ``seq`` rising by one. Each item
    says what ``Update(pv, epoch, seq, connected=True, reading=Reading(value, timestamp,
    severity, status))`` would, in a fifth of the bytes and of the decoding."""

    OP: ClassVar[str] = "updates"
    pv: str
    epoch: int
    items: list

    def each(self) -> Iterator[Update]:
        """The items as the ``Update`` messages they stand for."""
        for seq, value, timestamp, severity, status in self.items:
            yield Update(pv=self.pv, epoch=self.epoch, seq=seq, connected=True,
                         reading=Reading(value, timestamp, severity, status))


@dataclass(frozen=True)
class PvLost(Message):
    """Published by the daemon on a PV's topic when the actor owning it died: the PV is
    disconnected until its new actor (a new ``epoch``) publishes."""

    OP: ClassVar[str] = "pv_lost"
    pv: str
    reason: str = ""


@dataclass(frozen=True)
class HubStopping(Message):
    """Published on ``HUB_TOPIC`` when the daemon is about to stop: clients reconnect."""

    OP: ClassVar[str] = "hub_stopping"
    reason: str = ""


# Actor <-> broker.


@dataclass(frozen=True)
class ActorReady(Message):
    """An actor process is up and owns ``pvs``."""

    OP: ClassVar[str] = "actor_ready"
    actor: str
    pid: int
    pvs: list = field(default_factory=list)


@dataclass(frozen=True)
class AdoptPvs(Message):
    """Broker -> actor: own these PVs from now on. Sent before any request for them (one
    socket keeps the order), after ``ActorReady`` for the PVs an incarnation starts with."""

    OP: ClassVar[str] = "adopt"
    pvs: list = field(default_factory=list)


@dataclass(frozen=True)
class ReleasePvs(Message):
    """Broker -> actor: these PVs are no longer yours (they found no IOC for too long):
    close their channels and forget them. A later request adopts them again."""

    OP: ClassVar[str] = "release"
    pvs: list = field(default_factory=list)


@dataclass(frozen=True)
class Heartbeat(Message):
    """Liveness of an actor, sent by its loop every ``ACTOR_HEARTBEAT_S``; ``stats`` maps each
    of its PVs whose state changed since the last heartbeat (and each PV it adopted since) to
    ``{connected, updates, last_update}`` for ``pvhub status``: an idle PV costs nothing."""

    OP: ClassVar[str] = "heartbeat"
    sender: str = ""
    stats: dict = field(default_factory=dict)


MESSAGES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        HelloRequest,
        ReadRequest,
        DescribeRequest,
        SetRequest,
        StatusRequest,
        PingRequest,
        HelloReply,
        Snapshot,
        DescribeReply,
        SetAccepted,
        SetDone,
        StatusReply,
        Pong,
        ErrorReply,
        Update,
        Updates,
        PvLost,
        HubStopping,
        ActorReady,
        AdoptPvs,
        ReleasePvs,
        Heartbeat,
    )
}

REQUESTS = (HelloRequest, ReadRequest, DescribeRequest, SetRequest, StatusRequest, PingRequest)
# Requests that name a PV and are answered by its actor.
PV_REQUESTS = (ReadRequest, DescribeRequest, SetRequest)
# Replies after which nothing more comes for that request id.
FINAL_REPLIES = (HelloReply, Snapshot, DescribeReply, SetDone, StatusReply, Pong, ErrorReply)

_NESTED = {"reading": Reading}
_NESTED_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in _NESTED.values()}
_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in MESSAGES.values()}
_REQUIRED = {
    cls: {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    for cls in MESSAGES.values()
}


def encode(message: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """The bytes of ``message``; raises ``ProtocolError`` for a value that cannot travel.
    ``version`` other than ours is only for an ``ErrorReply`` to a peer of an older version,
    whose error replies had the same fields (``salvage_version``)."""
    body: dict[str, Any] = {"v": version, "op": message.OP}
    for name in _FIELDS[type(message)]:
        value = getattr(message, name)
        if isinstance(value, Reading):  # by hand: dataclasses.asdict deep-copies, per reading
            value = {"value": value.value, "timestamp": value.timestamp,
                     "severity": value.severity, "status": value.status}
        body[name] = value
    try:
        return msgpack.packb(body, default=pack_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {message.OP}: {exc}") from exc


def decode(data: bytes) -> Message:
    """The message in ``data``; any malformed input raises ``ProtocolError`` (Rule 6)."""
    try:
        # unpackb bounds every length a message claims by the bytes it holds: a forged
        # header cannot make msgpack allocate more.
        body = msgpack.unpackb(data, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"undecodable message: {exc}") from exc
    if type(body) is not dict:
        raise ProtocolError("a message must be a map")
    if _may_nest_deeper(data) and _deeper_than(body, MAX_DEPTH):
        raise ProtocolError(f"a message nests at most {MAX_DEPTH} levels")
    version = body.get("v")
    if type(version) is not int:
        raise ProtocolError("message has no protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    op = body.get("op")
    if type(op) is not str:
        raise ProtocolError("message has no operation 'op'")
    cls = MESSAGES.get(op)
    if cls is None:
        raise UnknownOperationError(f"unknown operation {op[:64]!r}")
    fields = {k: v for k, v in body.items() if k in _FIELDS[cls]}
    missing = _REQUIRED[cls] - fields.keys()
    if missing:
        raise ProtocolError(f"{op} lacks {', '.join(sorted(missing))}")
    for name, nested in _NESTED.items():
        value = fields.get(name)
        if type(value) is dict:
            known = _NESTED_FIELDS[nested]
            values = {k: v for k, v in value.items() if k in known}
            _check_field_types(nested, f"{op}.{name}", values)
            try:
                fields[name] = nested(**values)
            except TypeError as exc:
                raise ProtocolError(f"{op}.{name} is malformed: {exc}") from exc
    _check_types(cls, fields)
    return cls(**fields)


# Deeper than any message pvhub sends (a status reply nests five levels); shallow enough that
# code walking a value by recursion (repr, a log line) never meets Python's recursion limit.
MAX_DEPTH = 32


def _may_nest_deeper(data: bytes) -> bool:
    """False when ``data`` holds too few maps and arrays to nest past ``MAX_DEPTH``, which
    spares the walk. Each starts with one of a few bytes (other bytes may be those too), so
    their count bounds the containers; counted in C, faster than a walk for a short
    message. A long one (a waveform's bytes) is walked: its containers are few, its bytes many."""
    if len(data) > _SCAN_AT_MOST:
        return True
    try:
        return data.translate(_CONTAINER_HEADS).count(1) > MAX_DEPTH
    except (AttributeError, TypeError):  # a buffer without translate: walk
        return True


_SCAN_AT_MOST = 512  # bytes; a scan costs about 3 ns a byte, a walk about 1 us a message


# 1 for the first byte of a fixmap, fixarray, map 16/32 or array 16/32; 0 for any other.
_CONTAINER_HEADS = bytes(int(0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF) for b in range(256))


def _deeper_than(root: dict, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels in ``root``; by a loop, not by
    recursion, over the containers only."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node
        if _CONTAINERS.isdisjoint(map(type, children)):
            continue  # in C: a list of a million numbers costs no Python loop
        for child in children:
            if type(child) in _CONTAINERS:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


_CONTAINERS = frozenset((dict, list))


def _check_types(cls: type[Message], fields: dict[str, Any]) -> None:
    # Each known field has the type its class declares (values declared ``Any`` are checked by
    # whoever uses them: an actor checks a put value against its PV's type). What routing and
    # dispatch rely on beyond types is checked here too.
    _check_field_types(cls, cls.OP, fields)
    pv = fields.get("pv")
    if pv is not None:
        if "pv" in _REQUIRED[cls] and not pv:
            raise ProtocolError(f"{cls.OP}.pv must not be empty")
        if "\0" in pv:  # Rule 4: the NUL ends a topic
            raise ProtocolError(f"{cls.OP}.pv must not hold a NUL")
    pvs = fields.get("pvs")
    if pvs is not None and not all(type(name) is str for name in pvs):
        raise ProtocolError(f"{cls.OP}.pvs must hold PV names")
    if cls is Updates:
        problem = _items_problem(fields["items"])
        if problem:
            raise ProtocolError(f"updates.items: {problem}")


def _items_problem(items: list) -> str | None:
    """What is wrong with an ``Updates`` message's items, or None (Rule 8)."""
    if not items:
        return "there must be one or more"
    last = None
    for item in items:
        if type(item) is not list or len(item) != 5:
            return "each must be [seq, value, timestamp, severity, status]"
        seq, _, timestamp, severity, status = item
        if type(seq) is not int or (last is not None and seq != last + 1):
            return "each seq must be an int, one more than the one before"
        if type(timestamp) not in _NUMBER or type(severity) is not int or type(status) is not int:
            return "timestamp must be a number, severity and status ints"
        last = seq
    return None


def _check_field_types(cls: type, where: str, fields: dict[str, Any]) -> None:
    for name, allowed in _FIELD_TYPES[cls]:
        if name in fields and type(fields[name]) not in allowed:
            raise ProtocolError(f"{where}.{name} must be {_TYPE_WORDS[allowed]}, not {type(fields[name]).__name__}")


# What msgpack gives for each annotation (exact types: a bool is not an int on the wire).
# An annotation missing here fails at import, so a new field cannot go unchecked by accident.
_ANNOTATION_TYPES: dict[str, frozenset[type]] = {
    "int": frozenset((int,)),
    "float": frozenset((float, int)),
    "str": frozenset((str,)),
    "bool": frozenset((bool,)),
    "bytes": frozenset((bytes,)),
    "list": frozenset((list,)),
    "list | None": frozenset((list, type(None))),
    "dict": frozenset((dict,)),
    "PVMetadata | None": frozenset((dict, type(None))),
    "Reading | None": frozenset((Reading, type(None))),
}
_TYPE_WORDS = {
    allowed: " or ".join(sorted("None" if t is type(None) else t.__name__ for t in allowed))
    for allowed in _ANNOTATION_TYPES.values()
}
_FIELD_TYPES: dict[type, tuple[tuple[str, frozenset[type]], ...]] = {
    cls: tuple(
        (f.name, _ANNOTATION_TYPES[f.type]) for f in dataclasses.fields(cls) if f.type != "Any"
    )
    for cls in (*MESSAGES.values(), *_NESTED.values())
}


# --- readings, the fast way -------------------------------------------------------------------

# Every field of an ``Update``, as ``encode`` writes it: the one shape the fast path takes.
_UPDATE_SIZE = len(_FIELDS[Update]) + 2  # and "v", "op"
_READING_SIZE = len(_NESTED_FIELDS[Reading])
_NUMBER = _ANNOTATION_TYPES["float"]


def decode_reading(data: bytes) -> Message:
    """``decode(data)``, sooner for what the readings socket carries most (Rule 7).

    An ``Update`` with exactly the fields ``encode`` writes is checked field by field here
    and built without ``decode``'s general walk; anything else, valid or not, goes to
    ``decode``, which accepts it or refuses it with ``ProtocolError`` as always."""
    try:
        body = msgpack.unpackb(data, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except Exception:  # malformed: let decode say why, in its words
        return decode(data)
    return _reading_of(body, data)


def decode_readings(frame: bytes) -> Iterator[Message]:
    """The messages of one readings frame, in order (Rule 8): for each, what ``decode_reading``
    returns for its bytes. A frame broken part way yields the messages before the break, then
    raises ``ProtocolError``; an empty frame is refused as ``decode`` refuses it."""
    try:  # one message, the usual frame and every big array's: no Unpacker, which copies
        body = msgpack.unpackb(frame, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except msgpack.ExtraData:
        yield from _each_reading(frame)
        return
    except Exception:  # malformed: let decode say why, in its words
        yield decode(frame)
        return
    yield _reading_of(body, frame)


def _each_reading(frame: bytes) -> Iterator[Message]:
    """``decode_readings`` for a frame of several messages."""
    size = len(frame)
    unpacker = msgpack.Unpacker(raw=False, ext_hook=unpack_ext, strict_map_key=False, max_buffer_size=size)
    unpacker.feed(frame)
    start = 0
    while start < size:
        try:
            body = unpacker.unpack()
        except Exception:  # broken or cut short from here on: decode says why, in its words
            decode(frame[start:])
            raise ProtocolError("undecodable message") from None
        end = unpacker.tell()
        yield _reading_of(body, frame[start:end])
        start = end


def _reading_of(body: Any, data: bytes) -> Message:
    """The message ``body`` (unpacked from ``data``) is: an ``Update`` or ``Updates`` in the
    exact shape ``encode`` writes, checked here; anything else as ``decode`` judges ``data``."""
    message = _update_of(body, data) or _updates_of(body, data)
    return decode(data) if message is None else message


def _update_of(body: Any, data: bytes) -> Update | None:
    """The ``Update`` that ``body`` (unpacked from ``data``) is, when it has exactly the shape
    ``encode`` writes and passes decode's checks; None for anything else, for ``decode``."""
    if type(body) is not dict or len(body) != _UPDATE_SIZE:
        return None
    try:  # as many keys as an Update has, and each of them: exactly its keys
        version, op, pv, reading, metadata = body["v"], body["op"], body["pv"], body["reading"], body["metadata"]
        epoch, seq, connected, snapshot = body["epoch"], body["seq"], body["connected"], body["snapshot"]
    except KeyError:
        return None
    if (
        type(version) is not int or version != PROTOCOL_VERSION or op != "update"
        or type(pv) is not str or not pv or "\0" in pv
        or type(epoch) is not int or type(seq) is not int
        or type(connected) is not bool or type(snapshot) is not bool
        or (metadata is not None and type(metadata) is not dict)
    ):
        return None
    if reading is not None:
        if type(reading) is not dict or len(reading) != _READING_SIZE:
            return None
        try:
            value, timestamp, severity, status = (reading["value"], reading["timestamp"], reading["severity"],
                                                  reading["status"])
        except KeyError:
            return None
        if type(timestamp) not in _NUMBER or type(severity) is not int or type(status) is not int:
            return None
        # Only containers nest: a plain value and no metadata is two levels deep.
        if (metadata is not None or type(value) in _CONTAINERS) and _may_nest_deeper(data) \
                and _deeper_than(body, MAX_DEPTH):
            return None
        body["reading"] = _built(Reading, reading)
    elif metadata is not None and _may_nest_deeper(data) and _deeper_than(body, MAX_DEPTH):
        return None
    del body["v"], body["op"]
    return _built(Update, body)


_UPDATES_SIZE = len(_FIELDS[Updates]) + 2  # and "v", "op"


def _updates_of(body: Any, data: bytes) -> Updates | None:
    """The ``Updates`` that ``body`` is, checked as ``decode`` checks it; None for anything
    else, for ``decode`` (Rule 7)."""
    if type(body) is not dict or len(body) != _UPDATES_SIZE:
        return None
    try:
        version, op, pv, epoch, items = body["v"], body["op"], body["pv"], body["epoch"], body["items"]
    except KeyError:
        return None
    if (type(version) is not int or version != PROTOCOL_VERSION or op != "updates"
            or type(pv) is not str or not pv or "\0" in pv or type(epoch) is not int
            or type(items) is not list or _items_problem(items)):
        return None
    if any(type(item[1]) in _CONTAINERS for item in items) and _may_nest_deeper(data) \
            and _deeper_than(body, MAX_DEPTH):
        return None
    del body["v"], body["op"]
    return _built(Updates, body)


def new_reading(value: Any, timestamp: float, severity: int, status: int) -> Reading:
    """``Reading(value, timestamp, severity, status)`` for fields already checked (an item of
    an ``Updates``), without the frozen dataclass's ``__setattr__`` per field."""
    return _built(Reading, {"value": value, "timestamp": timestamp, "severity": severity, "status": status})


def new_update(pv: str, epoch: int, seq: int, connected: bool, reading: Reading | None,
               metadata: PVMetadata | None, snapshot: bool) -> Update:
    """``Update(...)`` for fields an actor made itself, without the frozen dataclass's
    ``__setattr__`` per field (a quarter of the time, per monitor update)."""
    return _built(Update, {"pv": pv, "epoch": epoch, "seq": seq, "connected": connected, "reading": reading,
                           "metadata": metadata, "snapshot": snapshot})


def _built(cls: type, fields: dict[str, Any]) -> Any:
    # What a frozen dataclass's __init__ does (its fields in the instance's __dict__) without
    # its object.__setattr__ per field: a microsecond per reading. ``fields`` must be all of
    # the class's fields, checked.
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance


# The daemon's own announcements (``HubStopping``): every client subscribes to it. No PV name
# starts with NUL, so it never collides with a PV's topic.
HUB_TOPIC = b"\0hub"

# Liveness (the ZeroMQ guide's Paranoid Pirate): a peer silent for ``LIVENESS`` beats is dead.
ACTOR_HEARTBEAT_S = 0.5
# An actor's heartbeats name a PV whose update count changed at most this often.
ACTOR_STATS_INTERVAL_S = 2.0
# Messages that may wait between the broker and one actor process, each way. ZeroMQ drops
# what passes its high-water mark, silently: a burst of thousands of new PVs (an adoption and
# a request each) must never reach it. Requests are bounded per client; adoptions by PVs.
ACTOR_QUEUE_HWM = 1_000_000
# The same for the replies waiting for one client, and for subscriptions on their way to the
# actors (a client with ten thousand Signals subscribes to ten thousand topics at once; a new
# actor process is sent every subscription there is).
CLIENT_QUEUE_HWM = 100_000
SUBSCRIPTION_QUEUE_HWM = 1_000_000
CLIENT_HEARTBEAT_S = 1.0
LIVENESS = 3


def topic(pv: str) -> bytes:
    """The readings topic of ``pv`` (Rule 4)."""
    return pv.encode() + b"\0"


# Rule 4: an array of this many bytes or more makes its message a large reading.
LARGE_BYTES = 65_536
LARGE_MARK = b"L"


def large_topic(pv: str) -> bytes:
    """The topic of ``pv``'s messages that carry a large array (Rule 4)."""
    return pv.encode() + b"\0" + LARGE_MARK


def pv_from_topic(frame: bytes) -> str:
    return frame[:-1].decode()


def _salvaged(payload: bytes, name: str) -> Any:
    """Field ``name`` of a message that failed to decode, when it can still be read; else None."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return None
    return body.get(name) if isinstance(body, dict) else None


def salvage_version(payload: bytes) -> int:
    """The version to answer a message that failed to decode in: its own, if it is an older
    one this side can still write an ``ErrorReply`` in (1 and up), else ours."""
    version = _salvaged(payload, "v")
    return version if type(version) is int and 1 <= version < PROTOCOL_VERSION else PROTOCOL_VERSION


def salvage_id(payload: bytes) -> int:
    """The request id of a message that failed to decode, when it can still be read (so the
    client's pending request fails at once instead of timing out)."""
    request_id = _salvaged(payload, "id")
    return request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else 0
