"""The state machine of one PV's owner: what to publish, reply and put, given what happened.

Rule 1: no I/O here. Every input is a method call (a Channel Access event or a decoded
request); every output is a returned list of effects, which the actor loop carries out.
Rule 2: ``seq`` grows by one for each published change (a new reading, or a connection
change), never for a snapshot; a subscriber that sees a jump knows it missed something.
Rule 3: the PV counts as connected for clients only once Channel Access is connected *and*
the control metadata and a first reading have arrived, so that a client that sees
``connected`` can always ``read`` and ``describe``.
Rule 4: a put is sent once. If it cannot be sent (disconnected, no write access, a value the
PV cannot take) the client hears why at once; if the outcome is unknown it hears that too.
Rule 5: readings reach the actor by two paths, the monitor and reads (the read-back after a
put, a fresh read), and the monitor's may come late; a monitor reading older (by its IOC
timestamp) than a read's that is held is dropped, so what is published never goes back in
time. Monitor readings among themselves keep the IOC's order, whatever their timestamps say
(device timestamps need not grow). A reconnection starts afresh.
Rule 6: a put is done when the IOC has completed it and its value has been seen since it was
sent. The read-back (backend.py Rule 4) always shows it, but on EPICS base's server a read
sent behind the put is answered before the completion, so the read-back is a second round
trip. A monitor update that arrives after the put was sent and carries exactly the scalar
value put (number, enum index or string) shows it as well, and usually comes sooner: the put
is done at that update if it comes after the completion, or at the completion if the latest
reading then still carries the value (another writer's update since, or one the IOC posted
before it ran the put, leaves the answer to a read after the completion). A
value the IOC changed (clipped to a drive limit, rounded to a float32) or an array waits for
the read-back, as does a put whose value no update carried (an unchanged value posts none).
That second read is asked for only for a put not yet shown at its completion.
Rule 7: the monitor asks for property changes too (DBE_PROPERTY: a new enum label, units,
precision, limits). Such an event carries the DBR_TIME reading, unchanged, so a monitor
update that repeats the reading held from the monitor means the control structure changed:
it is read again (``StartDescribe``) and the new metadata published. A repeat of a reading
held from a read (a put's read-back, then the monitor's copy of it) means nothing. A record
processed since its last posted value (scanned, its value unchanged: it posts none) sends a
property event with a newer timestamp: a scalar update that repeats the value and alarm
held, newer, may be one, and has the metadata read again at the 1st, 2nd, 4th, 8th... such
update since the metadata last changed, so that a record posting its unchanged value at every
scan costs a few reads in all, not one per scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pvhub import protocol as p
from pvhub.protocol import same_reading
from pvhub.actors.coercion import coerce_value
from pvhub.errors import (
    DisconnectedError,
    PutFailedError,
    PvhubError,
    ReadOnlyError,
    UnknownOperationError,
)



# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Send ``message`` to the client ``client`` (its routing identity)."""

    client: bytes
    message: p.Message


@dataclass(frozen=True)
class Publish:
    """Publish ``update`` on the PV's readings topic."""

    update: p.Update


@dataclass(frozen=True)
class StartPut:
    """Issue a Channel Access put with completion; report back with ``put_completed``."""

    pv: str
    put_id: int
    value: Any


@dataclass(frozen=True)
class StartRead:
    """Issue a Channel Access read of the PV; report back with ``read_completed``."""

    pv: str
    read_id: int


@dataclass(frozen=True)
class StartReadBack:
    """Read a completed put's value back (Rule 6); report back with ``put_completed``."""

    pv: str
    put_id: int


@dataclass(frozen=True)
class StartDescribe:
    """Read the PV's control structure again (Rule 7); it comes back as ``metadata_received``."""

    pv: str


Effect = Reply | Publish | StartPut | StartRead | StartReadBack | StartDescribe


@dataclass
class _PendingPut:
    client: bytes
    request_id: int
    value: Any
    answered: bool = False  # the IOC has completed it; its read-back is on its way (Rule 6)
    seen: bool = False  # a monitor update since it was sent carried its value (Rule 6)


class PvState:
    """Everything the actor knows of one PV, and the rules for changing it."""

    def __init__(self, pv: str, epoch: int) -> None:
        self.pv = pv
        self.epoch = epoch
        self.seq = 0
        self.ca_connected = False
        self.reading: p.Reading | None = None
        self.control: p.PVMetadata | None = None  # from the control (CTRL) read
        self.access: p.PVMetadata = {}  # read/write access, which arrives on its own
        self._published_connected = False
        self._pending_puts: dict[int, _PendingPut] = {}
        self._pending_reads: dict[int, tuple[bytes, int]] = {}  # read id -> (client, request id)
        self._held_from_read = False  # Rule 5
        self._restamped = 0  # Rule 7: updates repeating value and alarm, newer, since a metadata change
        self._next_put_id = 1
        self.updates_published = 0
        self.last_timestamp: float | None = None  # of the last reading, kept while disconnected
        self.puts_started = 0

    # --- derived -------------------------------------------------------------------------

    @property
    def metadata(self) -> p.PVMetadata | None:
        if self.control is None:
            return None
        return {**self.control, **self.access}

    @property
    def connected(self) -> bool:
        return self.ca_connected and self.control is not None and self.reading is not None

    @property
    def pending_puts(self) -> int:
        return len(self._pending_puts)

    def update(self, *, snapshot: bool = False, with_metadata: bool = False) -> p.Update:
        return p.new_update(self.pv, self.epoch, self.seq, self.connected, self.reading,
                            self.metadata if (with_metadata or snapshot) else None, snapshot)

    def snapshot(self, request_id: int) -> p.Snapshot:
        return p.Snapshot(
            id=request_id,
            pv=self.pv,
            epoch=self.epoch,
            seq=self.seq,
            connected=self.connected,
            reading=self.reading,
            metadata=self.metadata,
        )

    # --- Channel Access events ------------------------------------------------------------

    def connection_changed(self, connected: bool) -> list[Effect]:
        self.ca_connected = connected
        if not connected:
            # Metadata is read again on reconnection: the IOC may have changed. The reading
            # goes too, so that a reconnection is announced with a fresh value, never with
            # the one from before the outage (clients keep their copy of it meanwhile).
            self.control = None
            self.reading = None
            # caproto never calls a put's callback once its circuit is gone: answer now
            # (Rule 4), and ignore the completion should a new circuit ever bring one.
            lost = DisconnectedError(f"{self.pv} lost its IOC while a put was in flight; the put's outcome is unknown")
            reads = [Reply(client, _error(request_id, DisconnectedError(f"{self.pv} lost its IOC during a read"), self.pv))
                     for client, request_id in self._pending_reads.values()]
            self._pending_reads.clear()
            return self.fail_all_puts(lost) + reads + self._publish_if_changed(metadata_changed=False)
        return self._publish_if_changed(metadata_changed=False)

    def metadata_received(self, metadata: p.PVMetadata) -> list[Effect]:
        merged: p.PVMetadata = {**(self.control or {}), **metadata}
        changed = merged != self.control
        self.control = merged
        if changed:
            self._restamped = 0  # Rule 7: such updates are property events again
        return self._publish_if_changed(metadata_changed=changed)

    def access_changed(self, read_access: bool, write_access: bool) -> list[Effect]:
        access: p.PVMetadata = {"read_access": read_access, "write_access": write_access}
        changed = access != self.access
        self.access = access
        return self._publish_if_changed(metadata_changed=changed)

    def reading_received(self, reading: p.Reading, *, read: bool = False) -> list[Effect]:
        """A new reading: from the monitor, or (``read``) from a read the actor asked for."""
        if same_reading(reading, self.reading):
            if read:
                return []
            if self._held_from_read:
                self._held_from_read = False  # the monitor's copy of it: the monitor caught up
                return []
            return [StartDescribe(self.pv)] if self.control is not None else []  # Rule 7
        if not read and self._held_from_read and self.reading is not None and reading.timestamp < self.reading.timestamp:
            # Older than the read we hold (Rule 5): a monitor update that arrives after the
            # read-back of a later put. Published, it would send clients back in time.
            return []
        describe = not read and self._restamp(reading)
        self._held_from_read = read
        self.reading = reading
        self.last_timestamp = reading.timestamp
        effects = self._publish_if_changed(metadata_changed=False, reading_changed=True)
        if describe:
            effects.append(StartDescribe(self.pv))
        if self._pending_puts and not read:
            effects += self._seen(reading.value)
        return effects

    def _restamp(self, reading: p.Reading) -> bool:
        """Whether a monitor ``reading`` that repeats the held scalar value and alarm with a
        newer timestamp should have the metadata read again (Rule 7)."""
        held = self.reading
        if (held is None or self.control is None or self._held_from_read
                or reading.severity != held.severity or reading.status != held.status
                or isinstance(reading.value, np.ndarray) or isinstance(held.value, np.ndarray)
                or not _same_value(reading.value, held.value)):
            return False
        self._restamped += 1
        return self._restamped & (self._restamped - 1) == 0  # 1, 2, 4, 8, ...

    def _seen(self, value: Any) -> list[Effect]:
        """Rule 6: a monitor update carried ``value``; the puts that put it and were completed
        are done."""
        effects: list[Effect] = []
        for put_id, put in list(self._pending_puts.items()):
            if put.seen or not _same_scalar(put.value, value):
                continue
            if put.answered:
                effects += self._put_done(put_id)
            else:
                put.seen = True
        return effects

    def _publish_if_changed(
        self, *, metadata_changed: bool, reading_changed: bool = False
    ) -> list[Effect]:
        connected = self.connected
        connection_changed = connected != self._published_connected
        if not connection_changed and not (connected and (metadata_changed or reading_changed)):
            return []
        self._published_connected = connected
        self.seq += 1
        self.updates_published += 1
        return [Publish(self.update(with_metadata=connected and (connection_changed or metadata_changed)))]

    def put_answered(self, put_id: int, read_back_pending: bool) -> list[Effect]:
        """The IOC completed a put; done now if a monitor update has shown its value, else at
        the update that does or at the read-back, which is asked for unless the read sent
        behind the put is still to answer (Rule 6)."""
        pending = self._pending_puts.get(put_id)
        if pending is None:
            return []
        if pending.seen and self.reading is not None and _same_scalar(pending.value, self.reading.value):
            return self._put_done(put_id)
        # Not seen, or another value came since (another writer's, or one the IOC posted
        # before it ran this put): only a read after the completion says what the PV holds.
        pending.answered = True
        return [] if read_back_pending else [StartReadBack(self.pv, put_id)]

    def put_completed(self, put_id: int, error: str | None = None) -> list[Effect]:
        """The IOC answered a put (``error`` is None on success) and its read-back, if any,
        was applied; nothing if the put was done already (Rule 6)."""
        if error is not None:
            pending = self._pending_puts.pop(put_id, None)
            if pending is None:
                return []
            return [Reply(pending.client, _error(pending.request_id, PutFailedError(error), self.pv))]
        return self._put_done(put_id)

    def _put_done(self, put_id: int) -> list[Effect]:
        pending = self._pending_puts.pop(put_id, None)
        if pending is None:
            return []
        done = p.SetDone(
            id=pending.request_id, pv=self.pv, epoch=self.epoch, seq=self.seq, reading=self.reading
        )
        return [Reply(pending.client, done)]

    def fail_all_puts(self, reason: PvhubError) -> list[Effect]:
        """Fail every put in flight (the actor is going away): never leave a client waiting."""
        effects: list[Effect] = [
            Reply(put.client, _error(put.request_id, reason, self.pv))
            for put in self._pending_puts.values()
        ]
        self._pending_puts.clear()
        return effects

    # --- requests -------------------------------------------------------------------------

    def read_completed(self, read_id: int, reading: p.Reading | None) -> list[Effect]:
        """A fresh read (``ReadRequest.fresh``) answered: the reading counts as any other,
        and the client gets the snapshot that holds it (or why there is none)."""
        pending = self._pending_reads.pop(read_id, None)
        effects = self.reading_received(reading, read=True) if reading is not None else []
        if pending is None:
            return effects
        client, request_id = pending
        if reading is None or not self.connected:
            return effects + [Reply(client, _error(request_id, DisconnectedError(f"{self.pv} could not be read"), self.pv))]
        return effects + [Reply(client, self.snapshot(request_id))]

    def handle(self, client: bytes, request: p.Message) -> list[Effect]:
        if isinstance(request, p.ReadRequest) and request.fresh and self.connected:
            read_id = self._next_put_id  # one counter for both: ids only need to be unique
            self._next_put_id += 1
            self._pending_reads[read_id] = (client, request.id)
            return [StartRead(self.pv, read_id)]
        if isinstance(request, p.ReadRequest):
            effects: list[Effect] = [Reply(client, self.snapshot(request.id))]
            if request.publish:
                effects.append(Publish(self.update(snapshot=True)))
            return effects
        if isinstance(request, p.DescribeRequest):
            return [
                Reply(
                    client,
                    p.DescribeReply(
                        id=request.id, pv=self.pv, connected=self.connected, metadata=self.metadata
                    ),
                )
            ]
        if isinstance(request, p.SetRequest):
            return self._start_put(client, request)
        request_id = getattr(request, "id", 0)
        return [
            Reply(client, _error(request_id, UnknownOperationError(f"an actor does not handle {request.OP!r}"), self.pv))
        ]

    def _start_put(self, client: bytes, request: p.SetRequest) -> list[Effect]:
        try:
            if not self.connected:
                raise DisconnectedError(f"{self.pv} is not connected")
            metadata = self.metadata or {}
            if not metadata.get("write_access", False):
                raise ReadOnlyError(f"{self.pv} does not grant write access")
            value = coerce_value(request.value, metadata)
        except PvhubError as exc:
            return [Reply(client, _error(request.id, exc, self.pv))]
        put_id = self._next_put_id
        self._next_put_id += 1
        self._pending_puts[put_id] = _PendingPut(client, request.id, value)
        self.puts_started += 1
        if not request.accepted:  # the client waits for the end anyway (protocol Rule 3)
            return [StartPut(self.pv, put_id, value)]
        return [
            StartPut(self.pv, put_id, value),
            Reply(client, p.SetAccepted(id=request.id, pv=self.pv)),
        ]


def _same_value(a: Any, b: Any) -> bool:
    """Two values, neither an array, are the same (a NaN as a NaN; a list of strings as one)."""
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _same_scalar(put: Any, seen: Any) -> bool:
    """Whether a monitor's scalar ``seen`` is exactly the coerced ``put`` (Rule 6). Arrays
    never match: they wait for the read-back."""
    return not isinstance(put, np.ndarray) and not isinstance(seen, np.ndarray) and put == seen


def _error(request_id: int, exc: PvhubError, pv: str = "") -> p.ErrorReply:
    return p.ErrorReply(id=request_id, code=exc.code, message=str(exc), pv=pv)
