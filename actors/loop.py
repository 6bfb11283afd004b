"""The ZeroMQ edge of an actor process: turns the crank of its PVs' state machines.

Rule 1: one thread does everything: it owns the ZeroMQ sockets (a DEALER to the broker, a PUB
to the readings forwarder) and polls the Channel Access sockets with them, handing what is
ready to the backend (``actors/backend.py``), whose responses become events on a queue that
the same pass drains. Channel Access is read only while that queue is shorter than
``DRAIN_LIMIT``: an IOC faster than the actor is held back by TCP, not by memory. A wake-up
pipe is left for signals (a stop).
Rule 2: the actor never outlives its daemon. Linux's parent-death signal ends it the moment
the daemon dies (``pvhub.actors.__main__``); a check of the parent pid on every poll covers
other systems, and an orphan leaves at once, without lingering over answers nobody can
route any more.
Rule 3: nothing a client sends can end the loop: a request that cannot be handled is answered
with an error and logged with its traceback.
Rule 4: the broker gives the actor its PVs (``AdoptPvs``, before any request for them); the
actor's heartbeat names only the PVs whose state changed since the last one, so a process
that owns thousands of quiet PVs sends almost nothing. A PV adopted, connected or
disconnected is named in the next heartbeat; one that only counted updates, at most every
``ACTOR_STATS_INTERVAL_S`` (``pvhub.protocol``): thousands of busy PVs cost the broker a few
records a second, not thousands.
Rule 5: ``PVHUB_FAULT_EXIT_ON_ADOPT`` (a glob pattern) makes the process exit when it adopts a
PV that matches: a PV that crashes whatever process holds it, for the tests of the broker's
quarantine. Unset, it costs nothing.
Rule 6: a readings message is a PV's topic frame and a frame holding its updates back to back,
in seq order, runs of consecutive value changes as one ``Updates`` each (protocol Rule 8: a
client reads one frame per message and a few list items per reading). When one of them is
``JOIN_LIMIT`` bytes or more (an array), each goes as a frame of its own instead, so that no
array is copied into a joined frame, and the message goes on the PV's large topic (protocol
Rule 4). A PV's message goes at the end of the loop's pass,
unless the PV's previous message with a new value left less than ``BATCH_WINDOW_S`` ago: then
its updates wait, and go together when the window is over (a snapshot, such as the one a new
client asks for, starts no window, so a new PV's first value never waits). A snapshot is
published for clients proving their subscription (client hub.py Rule 4): at most one per PV
every ``SNAPSHOT_SPACING_S``, and one waiting takes no second of the same state, so a
hundred clients that reconnect at once cost a PV a few snapshots, each to all of them, not a
hundred each to all (a client not proved by one asks again after its ``PROOF_INTERVAL``). A quiet PV's
update goes alone, at once; one that changes faster than the window (500 Hz) waits at most
the window, and its updates cost the actor, the daemon's forwarder and every client one
message per window instead of one per update (each ZeroMQ message wakes a thread in each of
them). What waits is bounded by the PVs this actor owns, times their rate over one window.
A message that cannot be encoded is logged and dropped; its PV's subscribers see a seq gap
and ask for a snapshot.
"""

from __future__ import annotations

import collections
import fnmatch
import os
import time
from typing import Any

import numpy as np
import structlog
import zmq

from pvhub import protocol as p
from pvhub.actors import backend as ca
from pvhub.config import DEFAULT_READINGS_HWM, valid_pv_name
from pvhub.actors.state import (
    Effect,
    Publish,
    PvState,
    Reply,
    StartDescribe,
    StartPut,
    StartRead,
    StartReadBack,
)
from pvhub.errors import ActorDiedError, DisconnectedError, InternalError, ProtocolError
from pvhub.logs import loggable
from pvhub.waker import Waker

log = structlog.get_logger("pvhub.actor")

POLL_MS = 250
# Requests, or Channel Access events, taken in one go before the loop looks around again.
DRAIN_LIMIT = 2000
# A PV's readings messages leave at most this often; updates in between go together (Rule 6).
BATCH_WINDOW_S = 0.005
# A PV's published snapshots leave at most this often (Rule 6): half a client's PROOF_INTERVAL.
SNAPSHOT_SPACING_S = 0.05
# An update this big goes in a frame of its own rather than be copied into a joined one (Rule 6).
JOIN_LIMIT = p.LARGE_BYTES


class Actor:
    """One actor process: owns ``pvs`` for the broker at ``broker``."""

    def __init__(self, actor_id: str, pvs: list[str], broker: str, readings: str,
                 parent_pid: int | None = None, epoch: int | None = None) -> None:
        self.actor_id = actor_id
        # Given by the daemon, larger than any earlier incarnation's whatever the wall clock did.
        self.epoch = epoch if epoch is not None else time.time_ns()
        self.states: dict[str, PvState] = {}
        self._changed: set[str] = set()  # PVs whose update counts changed (Rule 4)
        self._urgent: set[str] = set()  # PVs adopted, connected or disconnected since
        self._last_stats = 0.0
        self._outgoing: dict[str, list[p.Update]] = {}  # readings messages not sent yet (Rule 6)
        self._sent_at: dict[str, float] = {}  # when each PV's last readings message left
        self._snapshot_at: dict[str, float] = {}  # when each PV's last snapshot-only message left
        self._next_send: float | None = None  # when the first waiting message may leave
        self._fresh = False  # a PV's first update since its last message is among them
        self._valued: set[str] = set()  # PVs whose waiting messages carry a change, not only snapshots
        self._initial = list(pvs)
        self._events: collections.deque[ca.Event] = collections.deque()
        self._waker = Waker()
        self._stopping = False
        self._parent = parent_pid if parent_pid is not None else os.getppid()
        self._last_beat = time.monotonic()
        self._ctx = zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.IDENTITY, actor_id.encode())
        self._dealer.setsockopt(zmq.LINGER, 1000)
        self._dealer.setsockopt(zmq.SNDHWM, p.ACTOR_QUEUE_HWM)
        self._dealer.setsockopt(zmq.RCVHWM, p.ACTOR_QUEUE_HWM)
        self._dealer.connect(broker)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 1000)
        # Readings wait here only while the daemon's forwarder is behind (a burst of a
        # thousand PVs changing at once); past this a PUB drops, and clients see the gap.
        self._pub.setsockopt(zmq.SNDHWM, DEFAULT_READINGS_HWM)
        self._pub.setsockopt(zmq.RCVHWM, p.SUBSCRIPTION_QUEUE_HWM)  # clients' subscriptions
        self._pub.connect(readings)
        self._poller = zmq.Poller()
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._waker.fileno(), zmq.POLLIN)
        self._backend = ca.ChannelAccessBackend(self._events.append, ca.poller_watch(self._poller))
        self.log = log.bind(actor=actor_id, actor_pid=os.getpid())

    def request_stop(self, *_: Any) -> None:
        self._stopping = True
        self._waker.wake()

    def adopt(self, pvs: list[str]) -> None:
        """Own ``pvs`` from now on (those not owned yet): connect and monitor them."""
        new = [pv for pv in dict.fromkeys(pvs) if isinstance(pv, str) and pv and pv not in self.states]
        refused = [pv for pv in new if not valid_pv_name(pv)]
        if refused:  # the broker checks names first; caproto's search thread would die of one
            self.log.error("pvs_refused", pvs=refused[:5], count=len(refused), reason="not a Channel Access name")
            new = [pv for pv in new if valid_pv_name(pv)]
        fault = os.environ.get("PVHUB_FAULT_EXIT_ON_ADOPT")
        if fault and any(fnmatch.fnmatchcase(pv, fault) for pv in new):
            self.log.error("fault_injected", pvs=new[:5])
            os._exit(70)
        for pv in new:
            self.states[pv] = PvState(pv, self.epoch)
            self._urgent.add(pv)
        for i, pv in enumerate(new):
            self._backend.add(pv)
            if i % 100 == 99:
                self._beat_if_due()
        if new:
            self.log.info("pvs_adopted", count=len(new), pvs=new[:5])

    def release(self, pvs: list[str]) -> None:
        """Own ``pvs`` no more (they found no IOC): stop searching, forget them."""
        gone = [pv for pv in dict.fromkeys(pvs) if isinstance(pv, str) and pv in self.states]
        reason = DisconnectedError("the daemon released this PV: no IOC answered")
        for pv in gone:
            self._carry_out(self.states.pop(pv).fail_all_puts(reason))
            self._changed.discard(pv)
            self._urgent.discard(pv)
            self._sent_at.pop(pv, None)
            self._snapshot_at.pop(pv, None)
            self._outgoing.pop(pv, None)  # sent later, it would note the PV's time again
            self._valued.discard(pv)
            self._backend.remove(pv)
        if gone:
            self.log.info("pvs_released", count=len(gone), pvs=gone[:5])

    def run(self) -> int:
        self.adopt(self._initial)
        self._send_control(p.ActorReady(actor=self.actor_id, pid=os.getpid(), pvs=list(self.states)))
        self.log.info("actor_started", pvs=len(self.states))
        backend = self._backend
        wake = self._waker.fileno()
        try:
            while not self._stopping:
                # Work left over from a bounded drain is taken up again at once.
                timeout = POLL_MS
                if self._events:
                    timeout = 0
                else:
                    now = time.monotonic()
                    due = backend.timeout(now)
                    if self._next_send is not None:
                        wait = max(0.0, self._next_send - now)
                        due = wait if due is None else min(due, wait)
                    if due is not None:
                        timeout = min(POLL_MS, int(due * 1000) + 1)
                ready = self._poller.poll(timeout)
                for item, flags in ready:
                    if item is self._dealer:
                        self._drain_requests()
                    elif item == wake:
                        self._waker.drain()
                    elif len(self._events) < DRAIN_LIMIT and backend.owns(item):
                        backend.service(item, flags)
                backend.tick(time.monotonic())
                if self._events:
                    self._drain_events()
                if self._outgoing:
                    self._publish()
                self._beat_if_due()
                if os.getppid() != self._parent:
                    self.log.warning("actor_orphaned")
                    os._exit(0)  # Rule 2: nobody is left to answer
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        reason = ActorDiedError("the actor owning this PV is stopping; the put's outcome is unknown")
        for state in self.states.values():
            self._carry_out(state.fail_all_puts(reason))
        self._publish(everything=True)
        self._backend.close()
        self._dealer.close()
        self._pub.close()
        self._ctx.term()
        self.log.info("actor_stopped")

    def _stats(self, now: float) -> dict:
        """Rule 4: what the next heartbeat says of the PVs."""
        if now - self._last_stats >= p.ACTOR_STATS_INTERVAL_S:
            self._last_stats = now
            changed, self._changed = self._changed | self._urgent, set()
        else:
            changed = self._urgent
            self._changed -= changed
        self._urgent = set()
        return {
            pv: {
                "connected": state.connected,
                "updates": state.updates_published,
                "last_update": state.last_timestamp,
            }
            for pv in changed
            if (state := self.states.get(pv)) is not None
        }

    def _beat_if_due(self) -> None:
        """The heartbeat (Rule 4). Long work (a burst of events, an adoption of thousands of
        PVs) calls this as it goes, so that a busy actor is never taken for a hung one."""
        now = time.monotonic()
        if now - self._last_beat >= p.ACTOR_HEARTBEAT_S:
            self._last_beat = now
            self._send_control(p.Heartbeat(sender=self.actor_id, stats=self._stats(now)))

    def _send_control(self, message: p.Message) -> None:
        self._dealer.send_multipart([b"", p.encode(message)])

    def _drain_requests(self) -> None:
        for count in range(1, DRAIN_LIMIT + 1):
            if count % 100 == 0:
                self._beat_if_due()
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.log.warning("malformed_envelope", frames=len(frames))
                continue
            client, payload = frames
            if client == b"":
                self._handle_control(payload)
            else:
                self._handle_request(client, payload)

    def _handle_control(self, payload: bytes) -> None:
        try:
            message = p.decode(payload)
            if isinstance(message, p.AdoptPvs):
                self.adopt(message.pvs)
            elif isinstance(message, p.ReleasePvs):
                self.release(message.pvs)
            else:
                self.log.warning("unknown_control", op=message.OP)
        except ProtocolError as exc:
            self.log.error("bad_control", error=str(exc))
        except Exception:  # the loop boundary
            self.log.exception("control_failed")

    def _handle_request(self, client: bytes, payload: bytes) -> None:
        request_id = 0
        try:
            request = p.decode(payload)
            request_id = getattr(request, "id", 0)
            pv = getattr(request, "pv", None)
            state = self.states.get(pv) if pv else None
            if state is None:
                raise ProtocolError(f"this actor does not own {pv!r}")
            self._carry_out(state.handle(client, request))
        except ProtocolError as exc:
            self._reply(client, p.ErrorReply(id=request_id, code=exc.code, message=str(exc)))
        except Exception as exc:  # the loop boundary: answer, log, go on
            self.log.exception("request_failed")
            self._reply(client, p.ErrorReply(id=request_id, code=InternalError.code, message=repr(exc)))

    def _drain_events(self) -> None:
        for count in range(1, DRAIN_LIMIT + 1):
            if not self._events:
                return
            if count % 100 == 0:
                self._beat_if_due()
            event = self._events.popleft()
            state = self.states.get(event.pv)
            if state is None:
                continue
            try:
                effects = self._apply(state, event)
                if type(event) is ca.ConnectionEvent:
                    self._urgent.add(event.pv)
                elif effects:
                    self._changed.add(event.pv)
                self._carry_out(effects)
            except Exception:
                # ``kind``, not ``event``: structlog's own first argument is ``event``, and the
                # clash raised here, in the one place meant to keep the loop alive.
                self.log.exception("event_failed", pv=event.pv, kind=type(event).__name__)

    def _apply(self, state: PvState, event: ca.Event) -> list[Effect]:
        if isinstance(event, ca.ReadingEvent):
            return state.reading_received(event.reading)
        if isinstance(event, ca.ConnectionEvent):
            self.log.info("pv_connected" if event.connected else "pv_disconnected", pv=event.pv)
            return state.connection_changed(event.connected)
        if isinstance(event, ca.MetadataEvent):
            return state.metadata_received(event.metadata)
        if isinstance(event, ca.AccessEvent):
            return state.access_changed(event.read_access, event.write_access)
        if isinstance(event, ca.ReadDoneEvent):
            return state.read_completed(event.read_id, event.reading)
        if isinstance(event, ca.PutAnsweredEvent):
            return state.put_answered(event.put_id, event.read_back_pending)
        if isinstance(event, ca.PutDoneEvent):
            effects = state.reading_received(event.readback, read=True) if event.readback else []
            return effects + state.put_completed(event.put_id, event.error)
        return []

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Publish):
                update = effect.update
                pv = update.pv
                updates = self._outgoing.get(pv)
                if update.snapshot and updates and _same_state(updates[-1], update):
                    continue  # that state waits to go already: once is enough (Rule 6)
                if updates is None:
                    self._outgoing[pv] = [effect.update]
                    self._fresh = True
                else:
                    updates.append(effect.update)
                if not effect.update.snapshot:
                    self._valued.add(pv)
            elif isinstance(effect, Reply):
                self._reply(effect.client, effect.message)
            elif isinstance(effect, StartRead):
                self._backend.read(effect.pv, effect.read_id)
            elif isinstance(effect, StartReadBack):
                self._backend.read_back(effect.pv, effect.put_id)
            elif isinstance(effect, StartDescribe):
                self._backend.describe(effect.pv)
            elif isinstance(effect, StartPut):
                self._backend.put(effect.pv, effect.put_id, effect.value)
                # Logged once the put is on its way: the record costs no time on the put's path.
                self.log.info("put_started", pv=effect.pv, value=loggable(effect.value))

    def _publish(self, everything: bool = False) -> None:
        """Send the readings messages whose PV's window is over (Rule 6)."""
        now = time.monotonic()
        if not (everything or self._fresh) and self._next_send is not None and now < self._next_send:
            return  # only waiting messages, none of them due yet
        self._fresh = False
        waiting: dict[str, list[p.Update]] = {}
        next_send = None
        sent_at = self._sent_at
        snapshot_at = self._snapshot_at
        valued = self._valued
        for pv, updates in self._outgoing.items():
            free_at = sent_at.get(pv, 0.0) + BATCH_WINDOW_S
            if pv not in valued:  # snapshots only: spaced (Rule 6)
                free_at = max(free_at, snapshot_at.get(pv, 0.0) + SNAPSHOT_SPACING_S)
            if not everything and now < free_at:
                waiting[pv] = updates
                next_send = free_at if next_send is None else min(next_send, free_at)
                continue
            try:
                frames = readings_frames(pv, updates)
            except ProtocolError as exc:  # Rule 6: never the loop's end
                self.log.error("readings_not_encoded", pv=pv, updates=len(updates), error=str(exc))
            else:
                self._pub.send_multipart(frames)
            if pv in valued:
                sent_at[pv] = now
            else:
                snapshot_at[pv] = now
        valued.intersection_update(waiting)
        self._outgoing = waiting
        self._next_send = next_send

    def _reply(self, client: bytes, message: p.Message) -> None:
        if isinstance(message, p.ErrorReply) and message.code != "bad_message":
            self.log.info("request_refused", pv=message.pv, code=message.code, error=message.message)
        elif isinstance(message, p.SetDone):
            self.log.debug("put_done", pv=message.pv)  # the daemon logs put_finished for each put
        self._dealer.send_multipart([client, p.encode(message)])


def _same_state(waiting: p.Update, snapshot: p.Update) -> bool:
    """Whether ``waiting`` is a snapshot of the state ``snapshot`` holds (Rule 6): a PV's
    state changes only with its seq (or with a new epoch)."""
    return waiting.snapshot and waiting.seq == snapshot.seq and waiting.epoch == snapshot.epoch


def readings_frames(pv: str, updates: list[p.Update]) -> list[bytes]:
    """One readings message of ``pv`` (Rule 6, protocol Rule 8): its topic, then one frame with
    its updates back to back, runs of consecutive value changes as one ``Updates`` each. An
    update of ``JOIN_LIMIT`` bytes or more (an array) is not copied into a joined frame: then
    each message goes as a frame of its own."""
    pieces: list[bytes] = []
    run: list[p.Update] = []

    def end_run() -> None:
        if len(run) == 1:
            pieces.append(p.encode(run[0]))
        elif run:
            items = [[u.seq, u.reading.value, u.reading.timestamp, u.reading.severity, u.reading.status]
                     for u in run]  # type: ignore[union-attr]
            pieces.append(p.encode(p.Updates(pv=pv, epoch=run[0].epoch, items=items)))
        run.clear()

    large = False
    for update in updates:
        reading = update.reading
        big = reading is not None and isinstance(reading.value, np.ndarray) and reading.value.nbytes >= JOIN_LIMIT
        large = large or big
        plain = (update.connected and reading is not None and update.metadata is None and not update.snapshot
                 and not big)
        if plain and run and (update.epoch != run[-1].epoch or update.seq != run[-1].seq + 1):
            end_run()
        if plain:
            run.append(update)
            continue
        end_run()
        pieces.append(p.encode(update))
    end_run()
    topic = p.large_topic(pv) if large else p.topic(pv)  # protocol Rule 4
    if len(pieces) == 1 or all(len(piece) < JOIN_LIMIT for piece in pieces):
        return [topic, b"".join(pieces)]
    return [topic, *pieces]
