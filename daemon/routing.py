"""The broker's rules: which actor owns a PV, what to do with each message, and what happens
to requests when an actor dies.

Rule 1: no I/O. Inputs are decoded messages (with the raw bytes, forwarded untouched) and
``now``; outputs are effects for the broker loop to carry out.
Rule 2: every PV has at most one owner. A PV named in a config group belongs to that group's
actor; any other PV gets an actor of its own, started on first use.
Rule 3: a request is never left hanging. Requests that reach an actor not yet ready are
queued for it; when an actor dies, every request queued for it or in flight to it is
answered with ``actor_died`` (a put's outcome is then unknown, and it is never re-sent).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pvhub import __version__
from pvhub import protocol as p
from pvhub.config import Config
from pvhub.errors import ActorDiedError, PVNotAllowedError, PvhubError, UnknownOperationError

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


Effect = ToClient | ToActor | SpawnActor


@dataclass
class ActorRecord:
    actor: str
    pvs: tuple[str, ...]
    started: float
    ready: bool = False
    pid: int | None = None
    last_seen: float = 0.0
    queued: list[tuple[bytes, int, str, bytes]] = field(default_factory=list)
    # (client, request id) -> op, for every request forwarded and not finally answered
    inflight: dict[tuple[bytes, int], str] = field(default_factory=dict)


@dataclass
class ClientRecord:
    client: bytes
    first_seen: float
    last_seen: float
    name: str = ""
    requests: int = 0


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
        return [SpawnActor(actor, pvs)]

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
            return [ToClient(client, p.Pong(id=message.id))]
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
        effects = self._ensure_actor(pv, now)
        record = self.actors[self.owner[pv]]
        if record.ready:
            record.inflight[(client, request_id)] = message.OP
            effects.append(ToActor(record.actor, client, payload))
        else:
            record.queued.append((client, request_id, message.OP, payload))
        return effects

    def client_gone(self, client: bytes) -> None:
        self.clients.pop(client, None)

    # --- actors ----------------------------------------------------------------------------

    def actor_message(self, actor: str, client: bytes, message: p.Message, now: float) -> list[Effect]:
        record = self.actors.get(actor)
        if record is None:
            return []  # a message from an actor already declared dead: ignore it
        record.last_seen = now
        if client == b"":
            return self._actor_control(record, message)
        request_id = getattr(message, "id", None)
        if isinstance(message, p.FINAL_REPLIES) and request_id is not None:
            record.inflight.pop((client, request_id), None)
        return [ToClient(client, message)]

    def _actor_control(self, record: ActorRecord, message: p.Message) -> list[Effect]:
        if isinstance(message, p.ActorReady):
            record.ready = True
            record.pid = message.pid
            effects: list[Effect] = []
            for client, request_id, op, payload in record.queued:
                record.inflight[(client, request_id)] = op
                effects.append(ToActor(record.actor, client, payload))
            record.queued.clear()
            return effects
        return []  # heartbeats only refresh last_seen

    def actor_exited(self, actor: str, returncode: int | None) -> list[Effect]:
        """The actor's process is gone: answer everything it owed, forget its PVs."""
        record = self.actors.pop(actor, None)
        if record is None:
            return []
        for pv in record.pvs:
            if self.owner.get(pv) == actor:
                del self.owner[pv]
        reason = f"the actor owning {', '.join(record.pvs)} exited (code {returncode})"
        effects: list[Effect] = []
        for (client, request_id), op in record.inflight.items():
            detail = "; the put's outcome is unknown" if op == p.SetRequest.OP else ""
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason + detail))))
        for client, request_id, _, _ in record.queued:
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason))))
        return effects

    # --- introspection ---------------------------------------------------------------------

    def status(self, now: float) -> dict:
        return {
            "version": __version__,
            "uptime": now - self.started,
            "readings": self.readings_endpoint,
            "actors": [
                {
                    "actor": r.actor,
                    "pvs": list(r.pvs),
                    "pid": r.pid,
                    "ready": r.ready,
                    "inflight": len(r.inflight),
                    "age": now - r.started,
                }
                for r in self.actors.values()
            ],
            "clients": [
                {"client": c.client.hex(), "name": c.name, "requests": c.requests, "idle": now - c.last_seen}
                for c in self.clients.values()
            ],
        }


def error_reply(request_id: int, exc: PvhubError, pv: str = "") -> p.ErrorReply:
    return p.ErrorReply(id=request_id, code=exc.code, message=str(exc), pv=pv)
