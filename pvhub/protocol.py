"""The wire protocol: the rules every message that crosses a socket keeps, and ``encode`` and
``decode``. Every peer takes the protocol's names from here (``from pvhub import protocol as
p``), the messages too: they are defined in ``pvhub.messages``.

Rule 1: nothing else in pvhub builds or parses a wire message; it calls ``encode``/``decode``
(or, for the readings socket, ``pvhub.readings``: Rule 7).
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
short (daemon forwarder.py Rule 4).
Rule 5: arrays travel as raw bytes with dtype and shape (a msgpack ext type, ``pvhub.arrays``),
never element by element; numpy scalars travel as plain numbers. Nothing is ever pickled.
Rule 6: ``decode`` refuses any malformed input with ``ProtocolError`` and allocates nothing
beyond what arrived; what it checks of a message's fields is ``pvhub.message_checks``'.
Rule 7: what the readings socket carries is decoded by ``pvhub.readings``, which returns and
refuses exactly what ``decode`` does (its Rule 1).
Rule 8: a readings message is a topic frame and one or more frames, each holding one or more
encoded messages back to back (msgpack delimits them): an actor puts the updates of a PV
that it sends together in one frame, so a client reads one frame, not one per update
(``pvhub.readings`` takes one apart). Consecutive value changes go as one ``Updates`` message
(an array per change, no map, no repeated names): what a client decodes per reading is a
few list items.
"""

from __future__ import annotations

from typing import Any

import msgpack

from pvhub.arrays import pack_default, unpack_ext
from pvhub.errors import ProtocolError, UnknownOperationError, UnsupportedVersionError
from pvhub.message_checks import MAX_DEPTH, check_field_types, check_types, deeper_than, may_nest_deeper
from pvhub.messages import (
    FIELDS,
    FINAL_REPLIES,
    MESSAGES,
    NESTED,
    NESTED_FIELDS,
    PROTOCOL_VERSION,
    PV_REQUESTS,
    REQUESTS,
    REQUIRED,
    ActorReady,
    AdoptPvs,
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    Heartbeat,
    HelloReply,
    HelloRequest,
    HubStopping,
    Message,
    PingRequest,
    Pong,
    PvLost,
    PVMetadata,
    Reading,
    ReadRequest,
    ReleasePvs,
    SetAccepted,
    SetDone,
    SetRequest,
    Snapshot,
    StatusReply,
    StatusRequest,
    Update,
    Updates,
    new_reading,
    new_update,
    same_reading,
)

# What every peer takes from here: the messages (``pvhub.messages``) and the protocol's own.
__all__ = [
    "PROTOCOL_VERSION", "MESSAGES", "REQUESTS", "PV_REQUESTS", "FINAL_REPLIES",
    "PVMetadata", "Reading", "same_reading", "new_reading", "new_update",
    "Message", "HelloRequest", "ReadRequest", "DescribeRequest", "SetRequest", "StatusRequest", "PingRequest",
    "HelloReply", "Snapshot", "DescribeReply", "SetAccepted", "SetDone", "StatusReply", "Pong", "ErrorReply",
    "Update", "Updates", "PvLost", "HubStopping", "ActorReady", "AdoptPvs", "ReleasePvs", "Heartbeat",
    "encode", "decode", "MAX_DEPTH",
    "HUB_TOPIC", "topic", "LARGE_BYTES", "LARGE_MARK", "large_topic", "pv_from_topic",
    "ACTOR_HEARTBEAT_S", "ACTOR_STATS_INTERVAL_S", "ACTOR_QUEUE_HWM", "CLIENT_QUEUE_HWM",
    "SUBSCRIPTION_QUEUE_HWM", "CLIENT_HEARTBEAT_S", "LIVENESS",
    "salvage_version", "salvage_id",
]


def encode(message: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """The bytes of ``message``; raises ``ProtocolError`` for a value that cannot travel.
    ``version`` other than ours is only for an ``ErrorReply`` to a peer of an older version,
    whose error replies had the same fields (``salvage_version``)."""
    body: dict[str, Any] = {"v": version, "op": message.OP}
    for name in FIELDS[type(message)]:
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
    if may_nest_deeper(data) and deeper_than(body, MAX_DEPTH):
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
    fields = {k: v for k, v in body.items() if k in FIELDS[cls]}
    missing = REQUIRED[cls] - fields.keys()
    if missing:
        raise ProtocolError(f"{op} lacks {', '.join(sorted(missing))}")
    for name, nested in NESTED.items():
        value = fields.get(name)
        if type(value) is dict:
            known = NESTED_FIELDS[nested]
            values = {k: v for k, v in value.items() if k in known}
            check_field_types(nested, f"{op}.{name}", values)
            try:
                fields[name] = nested(**values)
            except TypeError as exc:
                raise ProtocolError(f"{op}.{name} is malformed: {exc}") from exc
    check_types(cls, fields)
    return cls(**fields)


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
