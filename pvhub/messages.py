"""Every message that crosses a socket, defined once: frozen dataclasses, each named on the
wire by its ``OP``. ``pvhub.protocol`` encodes and decodes them, holds the rules of their
exchange, and is where every peer takes them from (``p.ReadRequest``).

Rule 1: a field is declared here and nowhere else: its annotation is what ``decode`` lets it
hold (``pvhub.message_checks``), and ``encode`` writes every field a class declares.
Rule 2: a message built by ``new_reading``, ``new_update`` or ``built`` skips the frozen
dataclass's ``__setattr__`` per field (a microsecond per reading); only for fields already
checked: an actor's own, or a reading that ``pvhub.readings`` checked as ``decode`` would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, TypedDict

import numpy as np

# 2: readings may carry ``Updates`` (protocol Rule 8), which a version 1 client cannot read:
# it is refused at its hello instead of losing a fast PV's readings unseen, with an error
# written in its own version (``encode(..., version=)``) so that it can read why.
# 3: large readings come from a second readings socket (protocol Rule 4,
# ``HelloReply.large_readings``); a version 2 client would not connect to it and would never
# see an image.
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
    """Put ``value`` with completion; see protocol Rule 3 for the replies."""

    OP: ClassVar[str] = "set"
    id: int
    pv: str
    value: Any
    # Protocol Rule 3: whether the put's acceptance is answered (``SetAccepted``) before its
    # end. A daemon that predates the field answers it whatever this says; clients take it as
    # they take any reply that is not the last.
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
    # Where large readings are published (protocol Rule 4): a client subscribes there too.
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
    """Consecutive changes of one PV's value, gathered (protocol Rule 8): ``items`` holds
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

# What encoding and decoding take from each class's declaration (``pvhub.protocol``,
# ``pvhub.message_checks``, ``pvhub.readings``): the fields that hold a nested dataclass, and
# each class's fields and those without a default.
NESTED = {"reading": Reading}
NESTED_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in NESTED.values()}
FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in MESSAGES.values()}
REQUIRED = {
    cls: {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    for cls in MESSAGES.values()
}


def new_reading(value: Any, timestamp: float, severity: int, status: int) -> Reading:
    """``Reading(value, timestamp, severity, status)`` for fields already checked (an item of
    an ``Updates``), without the frozen dataclass's ``__setattr__`` per field."""
    return built(Reading, {"value": value, "timestamp": timestamp, "severity": severity, "status": status})


def new_update(pv: str, epoch: int, seq: int, connected: bool, reading: Reading | None,
               metadata: PVMetadata | None, snapshot: bool) -> Update:
    """``Update(...)`` for fields an actor made itself, without the frozen dataclass's
    ``__setattr__`` per field (a quarter of the time, per monitor update)."""
    return built(Update, {"pv": pv, "epoch": epoch, "seq": seq, "connected": connected, "reading": reading,
                          "metadata": metadata, "snapshot": snapshot})


def built(cls: type, fields: dict[str, Any]) -> Any:
    """What a frozen dataclass's ``__init__`` does (its fields in the instance's ``__dict__``)
    without its ``object.__setattr__`` per field (Rule 2). ``fields`` must be all of the
    class's fields, checked."""
    instance = object.__new__(cls)
    instance.__dict__.update(fields)
    return instance
