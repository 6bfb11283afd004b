"""The broker's rules: which actor owns a PV, what to do with each message, when an actor is
restarted or declared hung, and when a client is forgotten.

Rule 1: no I/O. Inputs are decoded messages (with the raw bytes, forwarded untouched) and
``now``; outputs are effects for the broker loop to carry out.
Rule 2: every PV has at most one owner. A PV named in a config group belongs to that group's
actor; any other PV gets an actor of its own, started on first use. Ownership outlives the
actor's process: a dead actor is restarted (immediately the first time, then with
exponential backoff while it keeps dying young), and requests meanwhile wait for it.
Rule 3: a request is never left hanging. Requests that reach an actor not yet ready are
queued for it; when an actor dies, every request queued for it or in flight to it is
answered with ``actor_died`` (a put's outcome is then unknown, and it is never re-sent).
Rule 4 (Paranoid Pirate): an actor silent for ``LIVENESS`` heartbeats is hung: it is killed,
and restarted like any dead actor. A client silent for ``LIVENESS`` of its heartbeats (plus a
margin) is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pvhub import __version__
from pvhub import protocol as p
from pvhub.config import Config
from pvhub.errors import (
    ActorDiedError,
    HubUnavailableError,
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
CLIENT_TIMEOUT = p.LIVENESS * p.CLIENT_HEARTBEAT_S + 2.0
ACTOR_TIMEOUT = p.LIVENESS * p.ACTOR_HEARTBEAT_S + 1.0
# The broker's loop ticks at least this often. A gap between ticks longer than STALL_S means
# the daemon itself was not running (SIGSTOP, a paused VM, a starved machine): what it did
# not hear then was not silence.
TICK_S = 0.2
STALL_S = 1.0

# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToClient:
    client: bytes
    message: p.Message


@dataclass(frozen=True)
class ToActor:
    actor: str
    client: bytes
    payload: bytes


@dataclass(frozen=True)
class SpawnActor:
    actor: str
    pvs: tuple[str, ...]
    identity: str  # the incarnation's identity at the broker (see ``identity_of``)


@dataclass(frozen=True)
class KillActor:
    actor: str
    reason: str


@dataclass(frozen=True)
class Announce:
    """Publish ``message`` on ``topic`` (a PV's, or ``HUB_TOPIC``)."""

    topic: bytes
    message: p.Message


@dataclass(frozen=True)
class ClientForgotten:
    client: bytes
    name: str
    idle: float


@dataclass(frozen=True)
class Stalled:
    seconds: float  # between two ticks


Effect = ToClient | ToActor | SpawnActor | KillActor | Announce | ClientForgotten | Stalled


def identity_of(actor: str, incarnation: int) -> str:
    """The routing identity of one incarnation of ``actor``: a restarted actor gets a new one,
    so nothing the dead process sent late (a reply, an ``ActorReady``) is taken for the new
    process's word, and nothing meant for the new one reaches the old."""
    # A space never occurs in a PV or group name (``pvhub.config`` checks both).
    return actor if incarnation == 0 else f"{actor} {incarnation}"


def split_identity(identity: str) -> tuple[str, int]:
    actor, sep, number = identity.rpartition(" ")
    if sep and number.isdigit():
        return actor, int(number)
    return identity, 0


def restart_delay(streak: int) -> float:
    """Seconds before restarting an actor that died young ``streak`` times in a row: the first
    death is answered at once, each further one waits twice as long as the last."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (streak - 2), BACKOFF_MAX_S)


@dataclass
class ActorRecord:
    actor: str
    pvs: tuple[str, ...]
    started: float
    ready: bool = False
    alive: bool = True  # its process exists (or is being started)
    pid: int | None = None
    last_seen: float = 0.0
    restarts: int = 0
    streak: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None
    killing: bool = False
    queued: list[tuple[bytes, int, str, bytes]] = field(default_factory=list)
    # (client, request id) -> op, for every request forwarded and not finally answered
    inflight: dict[tuple[bytes, int], str] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)
    stats_at: tuple[float, dict] | None = None


@dataclass
class ClientRecord:
    client: bytes
    first_seen: float
    last_seen: float
    name: str = ""
    requests: int = 0
    pvs: tuple[str, ...] | None = None  # None until a ping says which PVs the client follows


def actor_id_for(pv: str, config: Config) -> tuple[str, tuple[str, ...]]:
    group = config.group_of(pv)
    if group is not None:
        return f"group:{group}", config.groups[group]
    return f"pv:{pv}", (pv,)


class Router:
    """The broker's state: actors, PV owners, clients, requests in flight."""

    def __init__(self, config: Config, readings_endpoint: str) -> None:
        self.config = config
        self.readings_endpoint = readings_endpoint
        self.actors: dict[str, ActorRecord] = {}
        self.owner: dict[str, str] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        self.started = 0.0
        self.stopping = False
        self.last_tick: float | None = None
        # Silence is counted from the later of a peer's last word and this: the time since the
        # daemon was last not running (a stall) is the only time it was listening.
        self.listening_since = 0.0

    # --- start-up --------------------------------------------------------------------------

    def initial_actors(self, now: float) -> list[Effect]:
        """Actors the config asks to start with the daemon."""
        self.started = now
        effects: list[Effect] = []
        for pv in (*self.config.start, *(pv for pvs in self.config.groups.values() for pv in pvs)):
            effects.extend(self._ensure_actor(pv, now))
        return effects

    def _ensure_actor(self, pv: str, now: float) -> list[Effect]:
        if pv in self.owner:
            return []
        actor, pvs = actor_id_for(pv, self.config)
        self.actors[actor] = ActorRecord(actor=actor, pvs=pvs, started=now, last_seen=now)
        for owned in pvs:
            self.owner[owned] = actor
        return [SpawnActor(actor, pvs, identity_of(actor, 0))]

    # --- clients ---------------------------------------------------------------------------

    def client_message(self, client: bytes, message: p.Message, payload: bytes, now: float) -> list[Effect]:
        record = self.clients.get(client)
        if record is None:
            record = self.clients[client] = ClientRecord(client=client, first_seen=now, last_seen=now)
        record.last_seen = now
        record.requests += 1
        if isinstance(message, p.HelloRequest):
            record.name = message.client
            return [
                ToClient(
                    client,
                    p.HelloReply(
                        id=message.id,
                        readings=self.readings_endpoint,
                        server_version=__version__,
                        client=client,
                    ),
                )
            ]
        if isinstance(message, p.PingRequest):
            if message.pvs is not None:
                record.pvs = tuple(str(pv) for pv in message.pvs)
            return [ToClient(client, p.Pong(id=message.id, pvs_wanted=record.pvs is None))]
        if isinstance(message, p.StatusRequest):
            return [ToClient(client, p.StatusReply(id=message.id, status=self.status(now)))]
        if isinstance(message, p.PV_REQUESTS):
            return self._route(client, message, payload, now)
        request_id = getattr(message, "id", 0)
        return [ToClient(client, error_reply(request_id, UnknownOperationError(f"{message.OP!r} is not a request")))]

    def _route(self, client: bytes, message: p.Message, payload: bytes, now: float) -> list[Effect]:
        pv: str = message.pv  # type: ignore[attr-defined]
        request_id: int = message.id  # type: ignore[attr-defined]
        if not self.config.allows(pv):
            return [ToClient(client, error_reply(request_id, PVNotAllowedError(f"{pv!r} is not allowed by this daemon"), pv))]
        record = self.actors.get(self.owner.get(pv, ""))
        if self.stopping and (isinstance(message, p.SetRequest) or record is None or not record.ready):
            return [ToClient(client, error_reply(request_id, HubUnavailableError("the daemon is stopping; the request was not sent"), pv))]
        effects = self._ensure_actor(pv, now)
        record = self.actors[self.owner[pv]]
        if record.ready:
            record.inflight[(client, request_id)] = message.OP
            effects.append(ToActor(identity_of(record.actor, record.restarts), client, payload))
        else:
            record.queued.append((client, request_id, message.OP, payload))
        return effects

    def op_of(self, identity: str, client: bytes, request_id: int) -> str | None:
        """The operation of a request in flight to an actor (before its reply is routed)."""
        record = self.actors.get(split_identity(identity)[0])
        return record.inflight.get((client, request_id)) if record else None

    def client_gone(self, client: bytes) -> None:
        self.clients.pop(client, None)

    # --- actors ----------------------------------------------------------------------------

    def actor_message(self, identity: str, client: bytes, message: p.Message, now: float) -> list[Effect]:
        actor, incarnation = split_identity(identity)
        record = self.actors.get(actor)
        if record is None or not record.alive or incarnation != record.restarts:
            return []  # from an incarnation already declared dead: ignore it
        record.last_seen = now
        if client == b"":
            return self._actor_control(record, message, now)
        request_id = getattr(message, "id", None)
        if isinstance(message, p.FINAL_REPLIES) and request_id is not None:
            record.inflight.pop((client, request_id), None)
        return [ToClient(client, message)]

    def _actor_control(self, record: ActorRecord, message: p.Message, now: float) -> list[Effect]:
        if isinstance(message, p.ActorReady):
            record.ready = True
            record.pid = message.pid
            effects: list[Effect] = []
            identity = identity_of(record.actor, record.restarts)
            for client, request_id, op, payload in record.queued:
                record.inflight[(client, request_id)] = op
                effects.append(ToActor(identity, client, payload))
            record.queued.clear()
            return effects
        if isinstance(message, p.Heartbeat):
            self._take_stats(record, message.stats, now)
        return []

    def _take_stats(self, record: ActorRecord, stats: dict, now: float) -> None:
        if record.stats_at is None:
            record.stats_at = (now, stats)
        else:
            then, before = record.stats_at
            if now - then >= 1.0:
                record.rates = {
                    pv: max(0.0, (s.get("updates", 0) - before.get(pv, {}).get("updates", 0)) / (now - then))
                    for pv, s in stats.items()
                }
                record.stats_at = (now, stats)
        record.stats = stats

    def actor_exited(self, actor: str, returncode: int | None, now: float = 0.0) -> list[Effect]:
        """The actor's process is gone: answer everything it owed, tell subscribers, and
        restart it (now, or after a backoff if it keeps dying young)."""
        record = self.actors.get(actor)
        if record is None or not record.alive:
            return []
        reason = f"the actor owning {', '.join(record.pvs)} exited (code {returncode})"
        effects: list[Effect] = []
        for (client, request_id), op in record.inflight.items():
            detail = "; the put's outcome is unknown" if op == p.SetRequest.OP else ""
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason + detail))))
        for client, request_id, _, _ in record.queued:
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason))))
        record.inflight.clear()
        record.queued.clear()
        effects.extend(Announce(p.topic(pv), p.PvLost(pv=pv, reason=reason)) for pv in record.pvs)
        # Dying young: soon after starting, or before ever becoming ready.
        young = now - record.started < DIES_YOUNG_S or not record.ready
        record.streak = record.streak + 1 if young else 0
        record.alive = record.ready = record.killing = False
        record.pid = None
        record.stats, record.rates, record.stats_at = {}, {}, None
        if self.stopping:
            return effects
        delay = restart_delay(record.streak)
        if delay <= 0:
            effects.extend(self._restart(record, now))
        else:
            record.restart_at = now + delay
        return effects

    def _restart(self, record: ActorRecord, now: float) -> list[Effect]:
        record.restart_at = None
        record.alive = True
        record.started = record.last_seen = now
        record.restarts += 1
        return [SpawnActor(record.actor, record.pvs, identity_of(record.actor, record.restarts))]

    # --- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Restarts that are due, hung actors to kill, silent clients to forget."""
        effects: list[Effect] = []
        if self.last_tick is not None and now - self.last_tick > STALL_S:
            # Their heartbeats may still wait in the sockets: judge nobody for that time.
            self.listening_since = now
            effects.append(Stalled(now - self.last_tick))
        self.last_tick = now
        for record in self.actors.values():
            if not record.alive:
                if record.restart_at is not None and now >= record.restart_at and not self.stopping:
                    effects.extend(self._restart(record, now))
                continue
            if record.killing:
                continue
            if record.ready and now - max(record.last_seen, self.listening_since) > ACTOR_TIMEOUT:
                record.killing = True
                effects.append(KillActor(record.actor, f"no heartbeat for {now - record.last_seen:.1f} s"))
            elif not record.ready and now - max(record.started, self.listening_since) > ACTOR_STARTUP_TIMEOUT:
                record.killing = True
                effects.append(KillActor(record.actor, f"not ready {now - record.started:.0f} s after its start"))
        for client, record in list(self.clients.items()):
            idle = now - record.last_seen
            if now - max(record.last_seen, self.listening_since) > CLIENT_TIMEOUT:
                del self.clients[client]
                effects.append(ClientForgotten(client, record.name, idle))
        return effects

    # --- stopping --------------------------------------------------------------------------

    def begin_stop(self) -> list[Effect]:
        """Refuse new puts and tell clients; the broker then waits for puts in flight. What
        waits for an actor that will not be restarted now can never be sent: answer it."""
        self.stopping = True
        effects: list[Effect] = [Announce(p.HUB_TOPIC, p.HubStopping(reason="the daemon is stopping"))]
        for record in self.actors.values():
            if not record.alive:
                for client, request_id, _, _ in record.queued:
                    effects.append(ToClient(client, error_reply(request_id, HubUnavailableError("the daemon is stopping; the request was not sent"))))
                record.queued.clear()
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
            for (client, request_id), op in record.inflight.items():
                detail = "; the put's outcome is unknown" if op == p.SetRequest.OP else ""
                effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason + detail))))
            for client, request_id, _, _ in record.queued:
                effects.append(ToClient(client, error_reply(request_id, HubUnavailableError(reason + "; not sent"))))
            record.inflight.clear()
            record.queued.clear()
        return effects

    # --- introspection ---------------------------------------------------------------------

    def status(self, now: float) -> dict:
        subscribers: dict[str, int] = {}
        for client in self.clients.values():
            for pv in client.pvs or ():
                subscribers[pv] = subscribers.get(pv, 0) + 1
        pvs = []
        for pv, actor in sorted(self.owner.items()):
            record = self.actors[actor]
            stats = record.stats.get(pv, {})
            pvs.append(
                {
                    "pv": pv,
                    "actor": actor,
                    "pid": record.pid,
                    "connected": bool(stats.get("connected", False)) and record.ready,
                    "updates": stats.get("updates", 0),
                    "rate": round(record.rates.get(pv, 0.0), 2),
                    "last_update": stats.get("last_update"),
                    "subscribers": subscribers.get(pv, 0),
                    "restarts": record.restarts,
                }
            )
        return {
            "version": __version__,
            "uptime": now - self.started,
            "readings": self.readings_endpoint,
            "pvs": pvs,
            "actors": [
                {
                    "actor": r.actor,
                    "pvs": list(r.pvs),
                    "pid": r.pid,
                    "ready": r.ready,
                    "inflight": len(r.inflight),
                    "restarts": r.restarts,
                    "age": now - r.started,
                }
                for r in self.actors.values()
            ],
            "clients": [
                {
                    "client": c.client.hex(),
                    "name": c.name,
                    "requests": c.requests,
                    "idle": now - c.last_seen,
                    "pvs": len(c.pvs or ()),
                }
                for c in self.clients.values()
            ],
        }


def error_reply(request_id: int, exc: PvhubError, pv: str = "") -> p.ErrorReply:
    return p.ErrorReply(id=request_id, code=exc.code, message=str(exc), pv=pv)
