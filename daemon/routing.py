"""The broker's rules: what to do with each message, when an actor is restarted or declared
hung, and what is owed to whom when one dies. Who owns a PV is ``daemon/placement.py``'s,
the clients and their bounds ``daemon/clients.py``'s, the status ``daemon/status.py``'s;
``Router`` is the one entry point the broker uses.

Rule 1: no I/O, here or in the modules named above. Inputs are decoded messages (with the
raw bytes, forwarded untouched) and ``now``; outputs are effects (``daemon/effects.py``) for
the broker loop to carry out.
Rule 2: ownership outlives the process (placement.py Rule 2): a dead actor is restarted (at
once the first time, then with exponential backoff while it keeps dying young), its new
incarnation adopts the same PVs, and requests meanwhile wait for it.
Rule 3: a request is never left hanging. Requests that reach an actor not yet ready are
queued for it; when an actor dies, every request queued for it or in flight to it is
answered with ``actor_died`` (a put's outcome is then unknown, and it is never re-sent).
Rule 4 (Paranoid Pirate): an actor silent for ``LIVENESS`` heartbeats is hung: it is killed,
and restarted like any dead actor (a silent client: clients.py Rule 3). Silence is counted
only while the daemon was running: what it did not hear while it was stopped was not silence.
Rule 5: nothing per message costs O(all PVs) or O(all clients). A request costs dictionary
lookups; placing a new PV costs O(pooled processes); an actor's heartbeat carries only the
PVs whose state changed; a death costs O(the dead actor's PVs). Only ``status`` walks them all.
Rule 6 (limits): every request is allowed or refused before any actor sees it: the client's
rights and bounds first (clients.py Rule 2), then the daemon's bound on the PVs it holds;
past one, that request alone gets a ``limit`` error.
"""

from __future__ import annotations

from collections.abc import Callable

from pvhub import __version__
from pvhub import protocol as p
from pvhub.access import ANONYMOUS
from pvhub.config import MAX_RECORD_LENGTH, Config, valid_pv_name
from pvhub.daemon.clients import MAX_CLIENT_NAME, ClientRecord, Clients
from pvhub.daemon.effects import (
    Adopt,
    Announce,
    Effect,
    KillActor,
    Release,
    RetireActor,
    Stalled,
    ToActor,
    ToClient,
    error_reply,
)
from pvhub.daemon.placement import ActorRecord, Placement, PvRecord
from pvhub.daemon.status import build_status, drop_counts, take_counts
from pvhub.errors import (
    ActorDiedError,
    HubUnavailableError,
    LimitError,
    PVNotAllowedError,
    PvhubError,
    UnknownOperationError,
)

# An actor that has not said ActorReady this long after its start is stuck in start-up.
ACTOR_STARTUP_TIMEOUT = 20.0
# An actor that dies sooner than this after starting "dies young": its next restart waits.
DIES_YOUNG_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
ACTOR_TIMEOUT = p.LIVENESS * p.ACTOR_HEARTBEAT_S + 1.0
# The broker's loop ticks this often (broker Rule 3). A gap between ticks longer than STALL_S
# means the daemon itself was not running (SIGSTOP, a paused VM, a starved machine): what it
# did not hear then was not silence.
TICK_S = 0.2
STALL_S = 1.0


def restart_delay(streak: int) -> float:
    """Seconds before restarting an actor that died young ``streak`` times in a row: the first
    death is answered at once, each further one waits twice as long as the last."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (streak - 2), BACKOFF_MAX_S)


class Router:
    """The broker's state: actors, PV owners, clients, requests in flight."""

    def __init__(self, config: Config, readings_endpoint: str, large_readings_endpoint: str = "") -> None:
        self.config = config
        self.readings_endpoint = readings_endpoint
        self.large_readings_endpoint = large_readings_endpoint
        self.placement = Placement()
        self.clients = Clients()
        self.started = 0.0
        self.stopping = False
        self.last_tick: float | None = None
        # Silence is counted from the later of a peer's last word and this: the time since the
        # daemon was last not running (a stall) is the only time it was listening.
        self.listening_since = 0.0

    @property
    def actors(self) -> dict[str, ActorRecord]:
        return self.placement.actors

    @property
    def pvs(self) -> dict[str, PvRecord]:
        return self.placement.pvs

    # --- start-up --------------------------------------------------------------------------

    def initial_actors(self, now: float) -> list[Effect]:
        """The pool, the config's groups, and the PVs the config asks to start with."""
        self.started = now
        return self.placement.start(self.config, now)

    # --- clients ---------------------------------------------------------------------------

    def client_message(self, client: bytes, message: p.Message, payload: bytes, now: float,
                       identity: str = ANONYMOUS) -> list[Effect]:
        record = self.clients.heard(client, identity, now)
        if isinstance(message, p.HelloRequest):
            record.name = message.client[:MAX_CLIENT_NAME]  # shown in every status
            return [
                ToClient(
                    client,
                    p.HelloReply(
                        id=message.id,
                        readings=self.readings_endpoint,
                        server_version=__version__,
                        client=client,
                        max_message_bytes=self.config.limits.max_message_bytes,
                        identity=record.identity,
                        large_readings=self.large_readings_endpoint,
                    ),
                )
            ]
        if isinstance(message, p.PingRequest):
            if message.pvs is not None:
                self.clients.follow(record, message.pvs, self.config.limits.max_pvs_per_client)
            return [ToClient(client, p.Pong(id=message.id, pvs_wanted=record.pvs is None, lost=record.take_lost()))]
        if isinstance(message, p.StatusRequest):
            refusal = self.clients.status_refusal(record, len(self.pvs), now)
            if refusal is not None:
                return [ToClient(client, error_reply(message.id, refusal))]
            return [ToClient(client, p.StatusReply(id=message.id, status=self.status(now, viewer=record)))]
        if isinstance(message, p.PV_REQUESTS):
            refusal = self._refusal(record, message, now)
            if refusal is not None:
                return [ToClient(client, error_reply(message.id, refusal, message.pv))]
            return self._route(client, message, payload, now)
        request_id = getattr(message, "id", None)
        if request_id is None:  # an op that has no id of its own: the map may still carry one
            request_id = p.salvage_id(payload)
        return [ToClient(client, error_reply(request_id, UnknownOperationError(f"{message.OP!r} is not a request")))]

    def _refusal(self, record: ClientRecord, message: p.Message, now: float) -> PvhubError | None:
        """Why ``message`` must not go on (Rule 6), or None. Costs lookups only."""
        refusal = self.clients.refusal(record, message, self.config, self.pvs, self.placement.releases, now)
        if refusal is not None:
            return refusal
        pv: str = message.pv  # type: ignore[attr-defined]
        if pv not in self.pvs and len(self.pvs) >= self.config.limits.max_pvs:
            return LimitError(f"the daemon holds {len(self.pvs)} PVs, the most it allows; {pv!r} was not opened")
        return None

    def _route(self, client: bytes, message: p.Message, payload: bytes, now: float) -> list[Effect]:
        pv: str = message.pv  # type: ignore[attr-defined]
        request_id: int = message.id  # type: ignore[attr-defined]
        pv_record = self.pvs.get(pv)
        if pv_record is None and not self.config.allows(pv):
            why = "is not allowed by this daemon" if valid_pv_name(pv) else (
                f"is not a Channel Access name (printable ASCII without spaces, at most 256 characters, "
                f"a record name of at most {MAX_RECORD_LENGTH})")
            return [ToClient(client, error_reply(request_id, PVNotAllowedError(f"{pv!r} {why}"), pv))]
        record = self.actors[pv_record.actor] if pv_record is not None else None
        if self.stopping and (isinstance(message, p.SetRequest) or record is None or not record.ready):
            return [ToClient(client, error_reply(request_id, HubUnavailableError("the daemon is stopping; the request was not sent"), pv))]
        effects = self.placement.ensure_owner(pv, self.config, now)
        record = self.actors[self.pvs[pv].actor]
        self.clients.sent(client, pv)
        if record.ready:
            record.inflight[(client, request_id)] = message.OP
            effects.append(ToActor(record.identity, client, payload, request_id))
        else:
            record.queued.append((client, request_id, message.OP, payload))
        return effects

    def op_of(self, identity: str, client: bytes, request_id: int) -> str | None:
        """The operation of a request in flight to an actor (before its reply is routed)."""
        record = self.placement.live(identity)
        return record.inflight.get((client, request_id)) if record else None

    def not_delivered(self, identity: str, client: bytes, request_id: int) -> None:
        """The broker could not hand a request to its actor: it is answered there, and no
        longer owed by the actor."""
        record = self.placement.live(identity)
        if record is not None and record.inflight.pop((client, request_id), None) is not None:
            self.clients.settled(client)

    def reply_lost(self, client: bytes, request_id: int) -> None:
        """The final reply to ``request_id`` could not be queued for ``client``: its next pong
        says so (at most ``max_requests_in_flight`` ids are kept)."""
        self.clients.reply_lost(client, request_id, self.config.limits.max_requests_in_flight)

    def client_gone(self, client: bytes) -> None:
        self.clients.gone(client)

    # --- actors ----------------------------------------------------------------------------

    def actor_message(self, identity: str, client: bytes, message: p.Message, now: float) -> list[Effect]:
        record = self.placement.live(identity)
        if record is None:
            return []  # from an incarnation already declared dead: ignore it
        record.last_seen = now
        if client == b"":
            return self._actor_control(record, message, now)
        request_id = getattr(message, "id", None)
        if isinstance(message, p.FINAL_REPLIES) and request_id is not None:
            if record.inflight.pop((client, request_id), None) is not None:
                self.clients.settled(client)
        return [ToClient(client, message)]

    def _actor_control(self, record: ActorRecord, message: p.Message, now: float) -> list[Effect]:
        if isinstance(message, p.ActorReady):
            if record.ready:
                return []
            record.ready = True
            record.pid = message.pid
            effects: list[Effect] = []
            identity = record.identity
            new = sorted(record.pvs - set(message.pvs))
            if new:
                effects.append(Adopt(identity, tuple(new)))
            for pv in sorted(record.pvs):
                self.placement.on_trial(pv, record, now)
            for client, request_id, op, payload in record.queued:
                record.inflight[(client, request_id)] = op
                effects.append(ToActor(identity, client, payload, request_id))
            record.queued.clear()
            return effects
        if isinstance(message, p.Heartbeat):
            self._take_stats(record, message.stats, now)
        return []

    def _take_stats(self, record: ActorRecord, stats: dict, now: float) -> None:
        """Rule 5: only PVs that changed are in ``stats``."""
        if not isinstance(stats, dict):
            return
        for pv, values in stats.items():
            pv_record = self.pvs.get(pv)
            if pv_record is not None and pv_record.actor == record.actor:
                take_counts(pv_record, values, now)

    def actor_exited(self, actor: str, returncode: int | None, now: float = 0.0) -> list[Effect]:
        """The actor's process is gone: answer everything it owed, tell subscribers, move the
        PVs that keep killing it out (placement.py Rule 4), and restart it (now, or after a
        backoff)."""
        record = self.actors.get(actor)
        if record is None or not record.alive:
            return []
        self.placement.died(record)
        pvs = sorted(record.pvs)
        shown = ", ".join(pvs[:3]) + (f" and {len(pvs) - 3} more" if len(pvs) > 3 else "")
        reason = f"the actor owning {shown or 'no PV'} exited (code {returncode})"
        effects = self._answer_owed(record, reason)
        effects.extend(Announce(p.topic(pv), p.PvLost(pv=pv, reason=reason)) for pv in pvs)
        for pv in pvs:
            drop_counts(self.pvs[pv])
        # Dying young: soon after starting, or before ever becoming ready.
        young = now - record.started < DIES_YOUNG_S or not record.ready
        record.streak = record.streak + 1 if young else 0
        # Killed as hung: a process too busy (a burst of thousands of new PVs on a loaded
        # machine) is no evidence against any one of its PVs.
        crashed = not record.killing
        record.alive = record.ready = record.killing = False
        record.pid = None
        if self.stopping:
            return effects
        if crashed:
            effects.extend(self.placement.quarantine(record, self.config, now))
        if record.actor not in self.actors:
            return effects  # split into probation processes: nothing left to restart
        delay = restart_delay(record.streak)
        if delay <= 0:
            effects.extend(self.placement.restart(record, now))
        else:
            record.restart_at = now + delay
        return effects

    def _answer_owed(self, record: ActorRecord, reason: str,
                     never_sent: Callable[[str], PvhubError] = ActorDiedError) -> list[Effect]:
        """Rule 3: ``actor_died`` for every request in flight to ``record``'s process (a put:
        its outcome unknown); ``never_sent(reason)`` for every one queued for it."""
        effects: list[Effect] = []
        for (client, request_id), op in record.inflight.items():
            detail = "; the put's outcome is unknown" if op == p.SetRequest.OP else ""
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason + detail))))
            self.clients.settled(client)
        for client, request_id, _, _ in record.queued:
            effects.append(ToClient(client, error_reply(request_id, never_sent(reason))))
            self.clients.settled(client)
        record.inflight.clear()
        record.queued.clear()
        return effects

    def _retire(self, record: ActorRecord, reason: str, now: float) -> list[Effect]:
        """Forget ``record`` and stop its process for good (placement.py Rule 5); whatever
        still waits for it is answered."""
        self.placement.retire(record, now)
        effects = self._answer_owed(record, reason)
        if record.alive:
            effects.append(RetireActor(record.actor, reason))
        return effects

    # --- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Restarts that are due, hung actors to kill, silent clients to forget, PVs that
        earned trust."""
        effects: list[Effect] = []
        if self.last_tick is not None and now - self.last_tick > STALL_S:
            # Their heartbeats may still wait in the sockets: judge nobody for that time.
            self.listening_since = now
            effects.append(Stalled(now - self.last_tick))
        self.last_tick = now
        self.placement.trust(now)
        effects.extend(self._release_unconnected(now))
        self.placement.forget_retired(now)
        for record in self.actors.values():
            if not record.alive:
                if record.restart_at is not None and now >= record.restart_at and not self.stopping:
                    effects.extend(self.placement.restart(record, now))
                continue
            if record.killing:
                continue
            if record.ready and now - max(record.last_seen, self.listening_since) > ACTOR_TIMEOUT:
                record.killing = True
                effects.append(KillActor(record.actor, f"no heartbeat for {now - record.last_seen:.1f} s"))
            elif not record.ready and now - max(record.started, self.listening_since) > ACTOR_STARTUP_TIMEOUT:
                record.killing = True
                effects.append(KillActor(record.actor, f"not ready {now - record.started:.0f} s after its start"))
        effects.extend(self.clients.forget_silent(now, self.listening_since))
        return effects

    def _release_unconnected(self, now: float) -> list[Effect]:
        """placement.py Rule 5: what the PVs released now cost their owners and followers."""
        released, emptied, to_actors = self.placement.release_unconnected(self.config, now)
        effects: list[Effect] = [Release(identity, tuple(pvs)) for identity, pvs in to_actors.items()]
        seconds = self.config.limits.release_unconnected_s
        reason = f"no IOC answered for {seconds:g} s: the daemon released it (a new request searches again)"
        for record in emptied:
            effects.extend(self._retire(record, reason, now))
        effects.extend(Announce(p.topic(pv), p.PvLost(pv=pv, reason=reason)) for pv in released)
        return effects

    # --- stopping --------------------------------------------------------------------------

    def begin_stop(self) -> list[Effect]:
        """Refuse new puts and tell clients; the broker then waits for puts in flight. What
        waits for an actor that will not be restarted now can never be sent: answer it."""
        self.stopping = True
        effects: list[Effect] = [Announce(p.HUB_TOPIC, p.HubStopping(reason="the daemon is stopping"))]
        for record in self.actors.values():
            if not record.alive:  # nothing in flight: a dead process's requests were answered
                effects.extend(self._answer_owed(record, "the daemon is stopping", _not_sent("the request was not sent")))
        return effects

    def puts_in_flight(self) -> int:
        return sum(
            1 for r in self.actors.values()
            for op in (*r.inflight.values(), *(q[2] for q in r.queued)) if op == p.SetRequest.OP
        )

    def finish(self, reason: str) -> list[Effect]:
        """The daemon is going: answer everything still queued or in flight (Rule 3)."""
        effects: list[Effect] = []
        for record in self.actors.values():
            effects.extend(self._answer_owed(record, reason, _not_sent("not sent")))
        return effects

    # --- introspection ---------------------------------------------------------------------

    def status(self, now: float, viewer: ClientRecord | None = None) -> dict:
        """The daemon's state (``daemon/status.py``). A ``viewer`` whose identity may not read
        every PV sees only the PVs it may read, and no other client."""
        return build_status(self.placement, self.clients, self.config.access, self.readings_endpoint,
                            now - self.started, now, viewer, large_readings=self.large_readings_endpoint)


def _not_sent(outcome: str) -> Callable[[str], PvhubError]:
    """What a request queued for a process that will never take it is told: the daemon is
    unavailable, and the request never left."""
    return lambda reason: HubUnavailableError(f"{reason}; {outcome}")
