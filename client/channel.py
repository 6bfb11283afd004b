"""A PV as one client process sees it: its latest state, kept by the Clone pattern's rules.

Rule 1 (the Clone pattern): a channel keeps the highest ``seq`` it has applied and drops
anything not newer; a jump in ``seq`` is a gap: counted, logged, and answered with a fresh
snapshot. A jump at the first message of a subscription (``live`` still false) is no loss: what
came between the snapshot and it was published before the subscription reached the actor,
as a Channel Access monitor starts from the value current when it is made. It is answered with
a snapshot too, but not counted. A new ``epoch`` means a new actor: its sequence starts over, and the channel asks
for a snapshot, since what the actor published before the subscription reached it is lost.
Rule 2: only a snapshot (an answer to the channel's own request) makes a channel attached;
``ready`` needs that, a connection, a reading, and the subscription live, so a Signal that
is ready can read and describe at once, and what it is told from then on is the stream
itself, without a hole. A snapshot answered before the subscription reached the daemon's
readings socket is followed by a stream that starts some updates later: those between were
published to others only. So until the first message of the subscription arrives, a new
value is held, not told (listeners get ``value`` events only on a live channel), and that
first message tells the value it brings (or the one held): a subscriber's first value is
the first of an unbroken run.
Rule 3: state is written only by the hub's I/O thread and read by any thread under ``cond``;
listeners run under ``cond`` too and only queue work for the callback thread. A thread that
waits for a change waits through ``wait``: a reading wakes only channels someone waits on
(a thousand readings a second, each otherwise paying for a ``notify_all``). A reading and
the metadata are replaced, never changed in place: a listener may keep them without a copy.
Rule 4: every change that tells listeners anything gets the next ``version``, a number of the
channel's own that only grows. A subscriber remembers the version of the last change it
delivered and so skips what its first call already showed. ``(epoch, seq)`` cannot serve: a
lost PV forgets its ``seq`` and may come back at the same or a lower one.
Rule 5: ``ProofSchedule`` is the hub's rule for asking (hub.py, Rule 4), kept here without
I/O: it holds only channels not yet live and attached, by when they are due.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Callable

from pvhub import protocol as p
from pvhub.logs import library_logger

if TYPE_CHECKING:
    from pvhub.client.hub import Hub

log = library_logger("pvhub.client")


class Channel:
    """The client's copy of one PV's state, fed by snapshots and published updates.

    Written only by the I/O thread; read by any thread under ``cond``.
    """

    def __init__(self, hub: Hub, pv: str) -> None:
        self.hub = hub
        self.pv = pv
        # ``_lock`` is ``cond``'s own lock, held directly on the hot path (its C enter and
        # exit, not the Condition's Python ones): holding one is holding the other.
        self._lock = threading.RLock()
        self.cond = threading.Condition(self._lock)
        self._waiters = 0  # threads in ``wait`` (Rule 3)
        self.epoch = 0
        self.seq = -1
        self.connected = False
        self.reading: p.Reading | None = None
        self.metadata: p.PVMetadata = {}
        self.attached = False  # a snapshot has been applied
        self.live = False  # something arrived on the subscription
        self.gaps = 0
        self.missed = 0
        self.error: BaseException | None = None  # the daemon refused this PV
        self.last_refusal = ""  # the last passing refusal (a limit), asked again since
        self.limited = 0  # the daemon's limit refusals in a row (ProofSchedule.answered)
        self.version = 0  # Rule 4: the last change listeners were told of
        self.value_version = 0  # the last change that was a new value (0: none yet)
        self.previous: p.Reading | None = None  # the reading that new value replaced
        self.users = 0  # the hub's count of what holds this channel (hub.py Rule 7)
        self.kept = False  # asked for without an owner: kept for the process's life (hub.py Rule 7)
        self.unused_since = 0.0  # when its last user went (hub.py Rule 7)
        self.told: p.Reading | None = None  # the reading of the last ``value`` event (Rule 2)
        # The hub's bookkeeping for proving the subscription (hub.py, Rule 4): the snapshot
        # request outstanding, if any, and when the hub looks at this channel next.
        self.proof_request: int | None = None
        self.proof_asked = 0.0  # when proof_request was sent
        self.proof_due: float | None = None
        # listener(kind, channel, old_reading) with kind "value" or "meta"; run on the I/O
        # thread, so listeners only hand work to the dispatcher. Each is a bound method, held
        # as (a weak reference to its object, its function): a Signal the user dropped is
        # not kept alive (or called) by its channel, and calling one makes no new bound
        # method (as a WeakMethod would, per reading). A tuple, replaced whole.
        self._listeners: tuple[tuple[weakref.ref, Callable[..., None]], ...] = ()

    def add_listener(self, listener: Callable[[str, Channel, p.Reading | None], None]) -> None:
        owner, function = listener.__self__, listener.__func__  # type: ignore[attr-defined]
        with self.cond:
            self._listeners += ((weakref.ref(owner), function),)

    def remove_listener(self, listener: Callable[[str, Channel, p.Reading | None], None]) -> None:
        owner, function = listener.__self__, listener.__func__  # type: ignore[attr-defined]
        with self.cond:
            self._listeners = tuple((ref, f) for ref, f in self._listeners
                                    if ref() is not None and not (ref() is owner and f is function))

    def _tell(self, events: list[tuple[str, p.Reading | None]]) -> None:
        """With ``cond`` held: tell every listener still alive of ``events``; forget those
        that are not."""
        dropped = False
        for ref, function in self._listeners:
            owner = ref()
            if owner is None:
                dropped = True
                continue
            for kind, old in events:
                function(owner, kind, self, old)
        if dropped:
            self._listeners = tuple((ref, f) for ref, f in self._listeners if ref() is not None)

    @property
    def ready(self) -> bool:
        return self.attached and self.live and self.connected and self.reading is not None

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self.cond:
            self._waiters += 1
            try:
                return self.cond.wait_for(predicate, timeout)
            finally:
                self._waiters -= 1

    def _notify(self) -> None:
        """With ``cond`` held: wake whoever waits (Rule 3)."""
        if self._waiters:
            self.cond.notify_all()

    # --- called on the I/O thread ---------------------------------------------------------

    def apply(
        self,
        epoch: int,
        seq: int,
        connected: bool,
        reading: p.Reading | None,
        metadata: p.PVMetadata | None,
        *,
        from_stream: bool,
    ) -> None:
        with self._lock:
            self._changed(self._apply(epoch, seq, connected, reading, metadata, from_stream))

    def apply_updates(self, epoch: int, items: list[list]) -> None:
        """The items of an ``Updates`` message, each as ``apply`` of the ``Update`` it stands
        for, under one hold of the lock."""
        with self._lock:
            for seq, value, timestamp, severity, status in items:
                self._changed(self._apply(epoch, seq, True, p.new_reading(value, timestamp, severity, status), None,
                                          True))

    def _changed(self, events: list[tuple[str, p.Reading | None]]) -> None:
        """With the lock held: what ``_apply`` changed gets the next version (Rule 4) and is
        told. Listeners only queue work for the callback thread, so they run under the lock:
        a user thread that sees the new state (say, ready) also finds its events queued ahead
        of anything it queues next (a new subscription's first call)."""
        if not events:
            return
        self.version += 1
        for kind, old in events:
            if kind == "value":
                self.value_version, self.previous, self.told = self.version, old, self.reading
        self._tell(events)

    def apply_reply(self, message: p.Snapshot | p.SetDone) -> None:
        """A snapshot's state, or the reading a put's ``SetDone`` carries, applied on the I/O
        thread before the request's waiter hears of it (read-your-writes)."""
        if isinstance(message, p.Snapshot):
            self.apply(message.epoch, message.seq, message.connected, message.reading, message.metadata,
                       from_stream=False)
        elif message.reading is not None:
            self.apply(message.epoch, message.seq, True, message.reading, None, from_stream=False)

    def _apply(
        self,
        epoch: int,
        seq: int,
        connected: bool,
        reading: p.Reading | None,
        metadata: p.PVMetadata | None,
        from_stream: bool,
    ) -> list[tuple[str, p.Reading | None]]:
        """Rule 3, with ``cond`` held; returns the listener events it caused."""
        old = self.reading
        if (from_stream and seq == self.seq + 1 and epoch == self.epoch and metadata is None and connected
                and self.connected and self.attached and self.live and reading is not None and old is not None):
            # The usual reading, the next of a stream that is live, attached and connected,
            # with nothing else changed: what the rules below decide for it, in short.
            self.seq = seq
            self.reading = reading
            self._notify()
            return [] if p.same_reading(reading, old) else [("value", old)]
        if epoch < self.epoch:
            return []  # a late word from an actor that has since been replaced
        was_ready, old_metadata = self.ready, self.metadata
        first = from_stream and not self.live  # the subscription's first message (Rule 2)
        if epoch == self.epoch and seq <= self.seq:
            if from_stream:
                # Nothing newer, but the subscription is live: a value held is told now.
                return self._went_live(was_ready) if first else []
            if self.attached:
                return []
            # The snapshot we asked for, overtaken by the stream: only a snapshot makes the
            # channel attached, and its metadata serves if the stream brought none (what the
            # stream brought is newer).
            if metadata is not None and not self.metadata:
                self.metadata = dict(metadata)  # type: ignore[assignment]
            self.attached = True
            self._notify()
            changed = self.ready != was_ready or self.metadata != old_metadata
            return [("meta", old)] if changed else []
        if from_stream and self.attached:
            if epoch != self.epoch:
                # A new actor: what it published before our subscription reached it
                # (metadata, the connection) comes with a fresh snapshot.
                self.hub.resync(self)
            elif seq > self.seq + 1:
                if self.live:  # Rule 1: not at a subscription's first message
                    self.gaps += 1
                    self.missed += seq - self.seq - 1
                    log.warning("readings_missed", pv=self.pv, missed=seq - self.seq - 1, gaps=self.gaps)
                self.hub.resync(self)
        was_connected = self.connected
        self.epoch, self.seq = epoch, seq
        self.connected = connected
        if reading is not None:
            self.reading = reading
        if metadata is not None:
            self.metadata = dict(metadata)  # type: ignore[assignment]
        if not from_stream:
            self.attached = True
        if first:
            self.live = True
        self._notify()
        events: list[tuple[str, p.Reading | None]] = []
        if connected != was_connected or self.ready != was_ready or (
                self.metadata is not old_metadata and self.metadata != old_metadata):
            events.append(("meta", old))
        # An actor's first reading after a restart is often the very one we hold: once only.
        # Not live, a new value is held; the first message of the subscription tells it (Rule 2).
        if self.live:
            events += self._untold_value()
        return events

    def _went_live(self, was_ready: bool) -> list[tuple[str, p.Reading | None]]:
        """The subscription's first message brought nothing newer than the snapshot held: the
        channel is live now, and its held value is told (Rule 2)."""
        self.live = True
        self._notify()
        events: list[tuple[str, p.Reading | None]] = [("meta", self.reading)] if self.ready != was_ready else []
        return events + self._untold_value()

    def _untold_value(self) -> list[tuple[str, p.Reading | None]]:
        """The ``value`` event of a reading listeners have not been told, if the PV is connected."""
        if self.reading is not None and self.connected and not p.same_reading(self.reading, self.told):
            return [("value", self.told)]
        return []

    def lose(self, reason: str, daemon_lost: bool = False) -> None:
        """The PV's actor or (``daemon_lost``) the daemon went away: disconnected until a new
        snapshot."""
        with self.cond:
            was_connected = self.connected
            self.connected = False
            self.attached = False
            self.live = False
            # Whatever comes next (a new actor, or the same one after the client lost the
            # daemon for a while) must be accepted, even at the seq we already have; after a
            # lost daemon, even with a smaller epoch (a new daemon may have started after the
            # wall clock went back; nothing of the old one can arrive any more).
            self.seq = -1
            if daemon_lost:
                self.epoch = 0
            self.proof_request = None  # its answer, if it comes, is no proof of anything now
            self.cond.notify_all()
            if was_connected:
                self.version += 1
                self._tell([("meta", self.reading)])
        if was_connected:
            log.warning("pv_lost", pv=self.pv, reason=reason)


# The longest a channel refused for a limit waits before it asks again (ProofSchedule).
MAX_LIMITED_INTERVAL = 5.0


class ProofSchedule:
    """Which channels the hub must ask for a snapshot, and when (hub.py, Rule 4).

    No I/O and no clock of its own: the hub says what it sent, what was answered and what was
    lost, and asks what is due at ``now``. Only channels that are not yet live and attached
    are held, in a heap by when they are due, so asking costs nothing per idle channel. Used
    by the I/O thread only.
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval  # between a channel's answer and its next request
        self.timeout = timeout  # after which an unanswered request is given up
        # (due, order, channel); an entry whose due is no longer its channel's proof_due is
        # stale, and skipped.
        self._heap: list[tuple[float, int, Channel]] = []
        self._order = itertools.count()

    @property
    def next_due(self) -> float | None:
        """When the soonest entry is due (it may be stale, which only wakes early), or None."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        """How many channels are still looked after."""
        return sum(1 for due, _, channel in list(self._heap) if channel.proof_due == due)

    def sent(self, channel: Channel, request_id: int, now: float) -> None:
        channel.proof_request = request_id
        channel.proof_asked = now
        self._at(channel, now + self.timeout)

    def not_sent(self, channel: Channel, now: float) -> None:
        channel.proof_request = None
        self._at(channel, now + self.interval)

    def answered(self, channel: Channel, request_id: int, limited: bool = False) -> bool:
        """The answer to ``request_id`` came; False if it no longer counts (given up, or the
        PV was lost since), and then it must be ignored. A refusal for a limit of the daemon's
        (``limited``: too many PVs, too many requests) is asked again after an interval that
        doubles with each refusal in a row, up to ``MAX_LIMITED_INTERVAL``: asking ten times a
        second would only spend the budget the process's other requests need."""
        if channel.proof_request != request_id:
            return False
        channel.proof_request = None
        channel.limited = min(channel.limited + 1, 32) if limited else 0  # 2**32 intervals: past any cap
        wait = min(MAX_LIMITED_INTERVAL, self.interval * 2**channel.limited)
        self._at(channel, channel.proof_asked + wait)
        return True

    def forget(self, channel: Channel) -> None:
        """The hub let ``channel`` go: its entries are stale from now on, and an answer still
        to come is ignored."""
        channel.proof_due = channel.proof_request = None

    def lost(self, channel: Channel, now: float) -> None:
        """The PV's actor went away: ask for the new one's snapshot at once."""
        self._at(channel, now)

    def due(self, now: float) -> tuple[list[Channel], list[tuple[Channel, int]]]:
        """The channels to ask again now, and of those the requests given up (channel, id)."""
        ask: list[Channel] = []
        given_up: list[tuple[Channel, int]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, channel = heapq.heappop(heap)
            if channel.proof_due != due:
                continue
            channel.proof_due = None
            if self._done(channel):
                continue
            if channel.proof_request is not None:
                if now - channel.proof_asked < self.timeout:
                    self._at(channel, channel.proof_asked + self.timeout)
                    continue
                given_up.append((channel, channel.proof_request))
                channel.proof_request = None
            ask.append(channel)
        return ask, given_up

    @staticmethod
    def _done(channel: Channel) -> bool:
        return (channel.live and channel.attached) or channel.error is not None

    def _at(self, channel: Channel, due: float) -> None:
        if self._done(channel):
            return
        if channel.proof_due is not None and channel.proof_due <= due:
            return  # it is looked at sooner already
        channel.proof_due = due
        heapq.heappush(self._heap, (due, next(self._order), channel))
