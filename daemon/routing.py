"""The broker's rules: which actor owns a PV, what to do with each message, when an actor is
restarted, declared hung or given fewer PVs, and when a client is forgotten.

Rule 1: no I/O. Inputs are decoded messages (with the raw bytes, forwarded untouched) and
``now``; outputs are effects for the broker loop to carry out.
Rule 2: every PV has exactly one owner, an actor, and one actor process owns many PVs. A PV
named in a config group belongs to that group's actor; a PV the config isolates (or one
quarantined, Rule 5) gets an actor of its own; any other PV joins a pooled actor
(``pool:N``, started with the daemon, so no process starts on the way of a request). The
owner's process is told with ``AdoptPvs`` before any request for the PV reaches it.
Ownership outlives the process: a dead actor is restarted (at once the first time, then with
exponential backoff while it keeps dying young), its new incarnation adopts the same PVs, and
requests meanwhile wait for it.
Rule 3: a request is never left hanging. Requests that reach an actor not yet ready are
queued for it; when an actor dies, every request queued for it or in flight to it is
answered with ``actor_died`` (a put's outcome is then unknown, and it is never re-sent).
Rule 4 (Paranoid Pirate): an actor silent for ``LIVENESS`` heartbeats is hung: it is killed,
and restarted like any dead actor. A client silent for ``LIVENESS`` of its heartbeats (plus a
margin) is forgotten.
Rule 5 (quarantine): a PV is trusted once it has lived ``TRUST_S`` in a process that did not
die. When a shared process dies, each untrusted PV it owned gets a strike; those with
``QUARANTINE_STRIKES`` leave it: one alone moves to a process of its own (quarantined);
several are split between two probation processes, and a probation process that dies is
split again, so that a PV that kills whatever process holds it is found in about log2(n)
deaths while the PVs that did nothing go on in their own process. Config groups stay whole.
Rule 6: nothing per message costs O(all PVs) or O(all clients). A request costs dictionary
lookups; placing a new PV costs O(pooled processes); an actor's heartbeat carries only the
PVs whose state changed; a death costs O(the dead actor's PVs). Only ``status`` walks them all.
Rule 8 (access and limits): a client's identity (the name of its CURVE key, see
``daemon/security.py``) must have the right to read (read, describe, subscribe) or write (set)
the PV, else ``access_denied`` at once; every set is allowed or refused before any actor sees
it. Each client connection has a request rate (a token bucket), a bound on its requests in
flight and on the PVs it has asked for, and the daemon a bound on the PVs it holds; past one,
that request alone gets a ``limit`` error. A PV that finds no IOC for
``release_unconnected_s`` (never connected since it was adopted) is released; a process of
its own (isolated, quarantined, on probation) left with no PV is stopped for good, so that
names asked for once do not leave processes behind.
Rule 7 (placement): PVs of one device or IOC (one name prefix, see ``device_prefix``) share a
pooled process while it has room (``max_pvs_per_actor``); a new prefix goes to the least
loaded one. When the last room is taken, one more pooled process starts at once, ahead of
the next new PV.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from dataclasses import dataclass, field

from pvhub import __version__
from pvhub import protocol as p
from pvhub.access import ANONYMOUS
from pvhub.config import MAX_RECORD_LENGTH, Config, valid_pv_name
from pvhub.errors import (
    AccessDeniedError,
    ActorDiedError,
    HubUnavailableError,
    LimitError,
    PVNotAllowedError,
    PvhubError,
    UnknownOperationError,
)

# Rule 8: how long a retired actor's name keeps counting its incarnations: longer than its
# process may take to go (the supervisor's SIGTERM, then SIGKILL after a grace).
RETIRED_MEMORY_S = 30.0
# Rule 7: how many more device prefixes than twice the PVs held ``Router.homes`` may keep.
HOMES_SLACK = 1024
# An actor that has not said ActorReady this long after its start is stuck in start-up.
ACTOR_STARTUP_TIMEOUT = 20.0
# An actor that dies sooner than this after starting "dies young": its next restart waits.
DIES_YOUNG_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
CLIENT_TIMEOUT = p.LIVENESS * p.CLIENT_HEARTBEAT_S + 2.0
ACTOR_TIMEOUT = p.LIVENESS * p.ACTOR_HEARTBEAT_S + 1.0
# The broker's loop ticks this often (broker Rule 3). A gap between ticks longer than STALL_S
# means the daemon itself was not running (SIGSTOP, a paused VM, a starved machine): what it
# did not hear then was not silence.
TICK_S = 0.2
STALL_S = 1.0
# Rule 5: a PV that lived this long in a process that did not die is no suspect.
TRUST_S = 10.0
QUARANTINE_STRIKES = 2
# A client's name (its hello says it) is kept and shown this long at most.
MAX_CLIENT_NAME = 200
# A status walks every PV: it costs a client PVs / STATUS_PVS_PER_TOKEN tokens of a bucket of
# STATUS_PER_S a second, so that no client makes the daemon walk more than 10,000 PVs a
# second for it (one status a second at 10,000 PVs; as many as it likes of a small daemon).
STATUS_PER_S = 50.0
STATUS_PVS_PER_TOKEN = 200
# Update rates for ``pvhub status`` are measured over windows at least this long.
RATE_WINDOW_S = 1.0
# An identity is a ZeroMQ routing id (at most 255 bytes); longer actor names are hashed.
_MAX_IDENTITY_BYTES = 200

POOL, GROUP, OWN, PROBATION = "pool", "group", "own", "probation"

# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToClient:
    client: bytes
    message: p.Message


@dataclass(frozen=True)
class ToActor:
    actor: str  # the incarnation's identity
    client: bytes
    payload: bytes
    request_id: int = field(default=0, compare=False)  # to answer, should the broker fail to hand it over


@dataclass(frozen=True)
class Adopt:
    """Tell the incarnation ``actor`` (an identity) that it owns ``pvs`` from now on."""

    actor: str
    pvs: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """Tell the actor process ``identity`` its ``pvs`` are no longer its own (Rule 8)."""

    identity: str
    pvs: tuple[str, ...]


@dataclass(frozen=True)
class SpawnActor:
    actor: str
    identity: str  # the incarnation's identity at the broker (see ``identity_of``)
    pvs: int = 0  # how many PVs it will adopt once ready (for the log)


@dataclass(frozen=True)
class KillActor:
    actor: str
    reason: str


@dataclass(frozen=True)
class RetireActor:
    """Stop ``actor``'s process for good: it owns no PV any more (Rule 8)."""

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


@dataclass(frozen=True)
class Quarantined:
    """PVs moved out of a process that kept dying (Rule 5), to ``actor``."""

    pvs: tuple[str, ...]
    source: str
    actor: str


Effect = (ToClient | ToActor | Adopt | Release | SpawnActor | KillActor | Announce | ClientForgotten | Stalled
          | Quarantined)


def coalesce(effects: list[Effect]) -> list[Effect]:
    """``effects`` with every ``Adopt`` of one incarnation merged into its first: a burst of
    new PVs becomes one message per actor. Adopting earlier than asked is harmless, and each
    request still follows the adoption of its PV."""
    merged: dict[str, list[str]] = {}
    out: list[Effect | str] = []
    for effect in effects:
        if isinstance(effect, Adopt):
            if effect.actor not in merged:
                merged[effect.actor] = []
                out.append(effect.actor)  # the first one's place
            merged[effect.actor].extend(effect.pvs)
        else:
            out.append(effect)
    return [Adopt(e, tuple(merged[e])) if isinstance(e, str) else e for e in out]


def identity_of(actor: str, incarnation: int) -> str:
    """The routing identity of one incarnation of ``actor``: a restarted actor gets a new one,
    so nothing the dead process sent late (a reply, an ``ActorReady``) is taken for the new
    process's word, and nothing meant for the new one reaches the old."""
    if len(actor.encode()) > _MAX_IDENTITY_BYTES:
        kind = actor.split(":", 1)[0]
        actor = f"{kind}#{hashlib.sha1(actor.encode()).hexdigest()}"
    # A space never occurs in a PV or group name (``pvhub.config`` checks both).
    return actor if incarnation == 0 else f"{actor} {incarnation}"


def device_prefix(pv: str) -> str:
    """The part of a PV's name its siblings on one device or IOC share (Rule 7): the record
    name without its field, up to its last ``:`` (``IOC:m1.RBV`` -> ``IOC``)."""
    record = pv.split(".", 1)[0]
    head, sep, _ = record.rpartition(":")
    return head if sep else record


def restart_delay(streak: int) -> float:
    """Seconds before restarting an actor that died young ``streak`` times in a row: the first
    death is answered at once, each further one waits twice as long as the last."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_FIRST_S * 2 ** (streak - 2), BACKOFF_MAX_S)


@dataclass
class ActorRecord:
    actor: str
    kind: str  # POOL, GROUP, OWN or PROBATION
    started: float
    pvs: set[str] = field(default_factory=set)
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

    @property
    def identity(self) -> str:
        return identity_of(self.actor, self.restarts)


@dataclass
class PvRecord:
    pv: str
    actor: str
    trusted: bool = False  # Rule 5
    strikes: int = 0
    quarantined: bool = False
    connected: bool = False
    ever_connected: bool = False  # since its owner adopted it (Rule 8)
    adopted: float = 0.0
    updates: int = 0
    last_update: float | None = None
    rate: float = 0.0
    window: tuple[float, int] | None = None  # (since, updates then), for the rate


class TokenBucket:
    """Requests per second with a burst of one second's worth."""

    __slots__ = ("rate", "tokens", "last")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= min(cost, self.rate):
            self.tokens -= cost  # a cost above the burst is taken on credit
            return True
        return False


@dataclass
class ClientRecord:
    client: bytes
    first_seen: float
    last_seen: float
    name: str = ""
    identity: str = ANONYMOUS
    requests: int = 0
    pvs: tuple[str, ...] | None = None  # None until a ping says which PVs the client follows
    bucket: TokenBucket | None = None
    status_bucket: TokenBucket | None = None
    inflight: int = 0  # requests sent to (or queued for) actors, not finally answered
    # PVs this connection asked for (bounded by max_pvs_per_client); names the daemon has
    # released since are dropped when the bound is reached (``pruned_at``: ``Router.releases``
    # then).
    asked: set[str] = field(default_factory=set)
    pruned_at: int = 0
    # Final replies the broker could not deliver (its queue for this client was full); said
    # in the next pong, bounded.
    lost: list[int] = field(default_factory=list)


class Router:
    """The broker's state: actors, PV owners, clients, requests in flight."""

    def __init__(self, config: Config, readings_endpoint: str) -> None:
        self.config = config
        self.readings_endpoint = readings_endpoint
        self.actors: dict[str, ActorRecord] = {}
        self.pvs: dict[str, PvRecord] = {}
        self.clients: dict[bytes, ClientRecord] = {}
        # identity -> actor, for live incarnations only: a word from any other is ignored.
        self.identities: dict[str, str] = {}
        self.pool: list[str] = []
        # Rule 7: device prefix -> the pooled actor holding its PVs. Prefixes whose PVs all
        # went are dropped when it holds twice as many entries as there are PVs (``_place``).
        self.homes: dict[str, str] = {}
        # Rule 5: (trusted at, pv, actor, incarnation), in the order PVs joined.
        self._trials: collections.deque[tuple[float, str, ActorRecord, int]] = collections.deque()
        # Rule 8: (release at, pv, adopted at) in the order PVs were adopted.
        self._searches: collections.deque[tuple[float, str, float]] = collections.deque()
        self._probations = itertools.count(1)
        self.releases = 0  # batches of PVs released so far (Rule 8)
        self.followed = 0  # the lengths of all clients' lists of followed PVs, summed
        # Names retired lately -> (when, their next incarnation); kept RETIRED_MEMORY_S.
        self._retired: dict[str, tuple[float, int]] = {}
        self.started = 0.0
        self.stopping = False
        self.last_tick: float | None = None
        # Silence is counted from the later of a peer's last word and this: the time since the
        # daemon was last not running (a stall) is the only time it was listening.
        self.listening_since = 0.0

    # --- start-up --------------------------------------------------------------------------

    def initial_actors(self, now: float) -> list[Effect]:
        """The pool, the config's groups, and the PVs the config asks to start with."""
        self.started = now
        effects: list[Effect] = []
        for _ in range(self.config.pool_size):
            effects.extend(self._grow_pool(now))
        for group in self.config.groups:
            effects.extend(self._group_actor(group, now)[1])
        for pv in self.config.start:
            effects.extend(self._ensure_owner(pv, now))
        return effects

    def _new_actor(self, actor: str, kind: str, now: float) -> list[Effect]:
        # A name retired a moment ago goes on counting its incarnations: its old process may
        # still be on its way out, and must never be taken for the new one (``identity_of``).
        _, incarnation = self._retired.pop(actor, (0.0, 0))
        record = self.actors[actor] = ActorRecord(actor=actor, kind=kind, started=now, last_seen=now,
                                                  restarts=incarnation)
        self.identities[record.identity] = actor
        return [SpawnActor(actor, record.identity)]

    def _group_actor(self, group: str, now: float) -> tuple[ActorRecord, list[Effect]]:
        """The actor of a config group, made (with all its PVs) if it does not exist yet."""
        actor = f"group:{group}"
        if actor in self.actors:
            return self.actors[actor], []
        effects = self._new_actor(actor, GROUP, now)
        for pv in self.config.groups[group]:
            self._assign(pv, self.actors[actor], now)
        return self.actors[actor], effects

    def _grow_pool(self, now: float) -> list[Effect]:
        actor = f"pool:{len(self.pool)}"
        self.pool.append(actor)
        return self._new_actor(actor, POOL, now)

    def _ensure_owner(self, pv: str, now: float) -> list[Effect]:
        """Give ``pv`` an owner if it has none (Rule 2), telling a running owner at once."""
        if pv in self.pvs:
            return []
        group = self.config.group_of(pv)
        effects: list[Effect] = []
        if group is not None:
            record, spawned = self._group_actor(group, now)
            effects.extend(spawned)
        elif self.config.isolated(pv):
            record = self.actors.get(f"pv:{pv}")
            if record is None:
                effects.extend(self._new_actor(f"pv:{pv}", OWN, now))
                record = self.actors[f"pv:{pv}"]
        else:
            record, spawned = self._pool_member_for(pv, now)
            effects.extend(spawned)
        effects.extend(self._assign(pv, record, now))
        if record.kind == POOL and not any(len(self.actors[a].pvs) < self.config.max_pvs_per_actor for a in self.pool):
            effects.extend(self._grow_pool(now))  # Rule 7: room for the next new PV, ahead of it
        return effects

    def _pool_member_for(self, pv: str, now: float) -> tuple[ActorRecord, list[Effect]]:
        cap = self.config.max_pvs_per_actor
        prefix = device_prefix(pv)
        home = self.homes.get(prefix)
        if home is not None and len(self.actors[home].pvs) < cap:
            return self.actors[home], []
        effects: list[Effect] = []
        roomy = [a for a in self.pool if len(self.actors[a].pvs) < cap]
        if not roomy:
            effects.extend(self._grow_pool(now))
            roomy = [self.pool[-1]]
        home = min(roomy, key=lambda a: len(self.actors[a].pvs))
        self._place(prefix, home)
        return self.actors[home], effects

    def _place(self, prefix: str, actor: str) -> None:
        """``prefix``'s PVs go to ``actor`` from now on (Rule 7). Entries of prefixes none of
        whose PVs is held any more are dropped once they would double the map: O(PVs) then,
        O(1) per placement over time."""
        self.homes[prefix] = actor
        if len(self.homes) > 2 * len(self.pvs) + HOMES_SLACK:
            pool = set(self.pool)
            held = {device_prefix(pv) for pv, record in self.pvs.items() if record.actor in pool}
            self.homes = {p_: a for p_, a in self.homes.items() if p_ in held or p_ == prefix}

    def _assign(self, pv: str, record: ActorRecord, now: float) -> list[Effect]:
        """``pv`` belongs to ``record`` from now on; a ready process adopts it at once."""
        pv_record = self.pvs.get(pv)
        if pv_record is None:
            pv_record = self.pvs[pv] = PvRecord(pv=pv, actor=record.actor)
        pv_record.actor = record.actor
        pv_record.connected = pv_record.ever_connected = False
        pv_record.adopted = now
        pv_record.window = None
        record.pvs.add(pv)
        release_s = self.config.limits.release_unconnected_s
        if release_s > 0:
            self._searches.append((now + release_s, pv, now))
        if not record.ready:
            return []  # adopted with the rest once it says ActorReady
        self._on_trial(pv, record, now)
        return [Adopt(record.identity, (pv,))]

    def _on_trial(self, pv: str, record: ActorRecord, now: float) -> None:
        if not self.pvs[pv].trusted:
            self._trials.append((now + TRUST_S, pv, record, record.restarts))

    # --- clients ---------------------------------------------------------------------------

    def client_message(self, client: bytes, message: p.Message, payload: bytes, now: float,
                       identity: str = ANONYMOUS) -> list[Effect]:
        record = self.clients.get(client)
        if record is None or record.identity != identity:  # a new connection took this routing id
            if record is not None:
                self.followed -= len(record.pvs or ())
            record = self.clients[client] = ClientRecord(client=client, first_seen=now, last_seen=now,
                                                         identity=identity)
        record.last_seen = now
        record.requests += 1
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
                    ),
                )
            ]
        if isinstance(message, p.PingRequest):
            if message.pvs is not None:
                limit = self.config.limits.max_pvs_per_client
                self.followed -= len(record.pvs or ())
                record.pvs = tuple(str(pv) for pv in message.pvs[:limit])
                self.followed += len(record.pvs)
            lost, record.lost = record.lost or None, []
            return [ToClient(client, p.Pong(id=message.id, pvs_wanted=record.pvs is None, lost=lost))]
        if isinstance(message, p.StatusRequest):
            if record.status_bucket is None:
                record.status_bucket = TokenBucket(STATUS_PER_S, now)
            # A status walks every PV and every client's list of followed PVs: it costs both.
            if not record.status_bucket.take(now, max(len(self.pvs) + self.followed, 1) / STATUS_PVS_PER_TOKEN):
                return [ToClient(client, error_reply(message.id, LimitError(
                    f"too many status requests from this client (each walks all {len(self.pvs)} PVs and "
                    f"{self.followed} followed by clients); ask less often")))]
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
        """Why ``message`` must not go on (Rule 8), or None. Costs lookups only."""
        pv: str = message.pv  # type: ignore[attr-defined]
        limits = self.config.limits
        access = self.config.access
        if isinstance(message, p.SetRequest):
            if not access.may_write(record.identity, pv):
                return AccessDeniedError(f"{record.identity!r} may not write {pv!r} (the daemon's access rules)")
        elif not access.may_read(record.identity, pv):
            return AccessDeniedError(f"{record.identity!r} may not read {pv!r} (the daemon's access rules)")
        if record.bucket is None or record.bucket.rate != limits.max_request_rate:
            record.bucket = TokenBucket(limits.max_request_rate, now)
        if not record.bucket.take(now):
            return LimitError(f"more than {limits.max_request_rate:g} requests per second from this client; "
                              "the request was not sent")
        if record.inflight >= limits.max_requests_in_flight:
            return LimitError(f"this client has {record.inflight} requests in flight, the most the daemon "
                              "allows; the request was not sent")
        if pv not in record.asked and len(record.asked) >= limits.max_pvs_per_client:
            if record.pruned_at != self.releases:
                # PVs released since the last look no longer count against the client: at most
                # one pass over its names per batch of releases, never one per request.
                record.pruned_at = self.releases
                record.asked.intersection_update(self.pvs.keys())
            if len(record.asked) >= limits.max_pvs_per_client:
                return LimitError(f"this client has asked for {len(record.asked)} PVs, the most the daemon "
                                  f"allows one client; {pv!r} was not opened")
        if pv not in self.pvs and len(self.pvs) >= limits.max_pvs:
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
        effects = self._ensure_owner(pv, now)
        record = self.actors[self.pvs[pv].actor]
        client_record = self.clients.get(client)
        if client_record is not None:
            client_record.asked.add(pv)
            client_record.inflight += 1
        if record.ready:
            record.inflight[(client, request_id)] = message.OP
            effects.append(ToActor(record.identity, client, payload, request_id))
        else:
            record.queued.append((client, request_id, message.OP, payload))
        return effects

    def op_of(self, identity: str, client: bytes, request_id: int) -> str | None:
        """The operation of a request in flight to an actor (before its reply is routed)."""
        record = self.actors.get(self.identities.get(identity, ""))
        return record.inflight.get((client, request_id)) if record else None

    def not_delivered(self, identity: str, client: bytes, request_id: int) -> None:
        """The broker could not hand a request to its actor: it is answered there, and no
        longer owed by the actor."""
        record = self.actors.get(self.identities.get(identity, ""))
        if record is not None and record.inflight.pop((client, request_id), None) is not None:
            self._settled(client)

    def _settled(self, client: bytes) -> None:
        """A request of ``client`` was finally answered (Rule 8's in-flight bound)."""
        record = self.clients.get(client)
        if record is not None:
            record.inflight = max(0, record.inflight - 1)

    def reply_lost(self, client: bytes, request_id: int) -> None:
        """The final reply to ``request_id`` could not be queued for ``client``: its next pong
        says so (at most ``max_requests_in_flight`` ids are kept)."""
        record = self.clients.get(client)
        if record is not None and len(record.lost) < self.config.limits.max_requests_in_flight:
            record.lost.append(request_id)

    def client_gone(self, client: bytes) -> None:
        record = self.clients.pop(client, None)
        if record is not None:
            self.followed -= len(record.pvs or ())

    # --- actors ----------------------------------------------------------------------------

    def actor_message(self, identity: str, client: bytes, message: p.Message, now: float) -> list[Effect]:
        actor = self.identities.get(identity)
        if actor is None:
            return []  # from an incarnation already declared dead: ignore it
        record = self.actors[actor]
        record.last_seen = now
        if client == b"":
            return self._actor_control(record, message, now)
        request_id = getattr(message, "id", None)
        if isinstance(message, p.FINAL_REPLIES) and request_id is not None:
            if record.inflight.pop((client, request_id), None) is not None:
                self._settled(client)
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
                self._on_trial(pv, record, now)
            for client, request_id, op, payload in record.queued:
                record.inflight[(client, request_id)] = op
                effects.append(ToActor(identity, client, payload, request_id))
            record.queued.clear()
            return effects
        if isinstance(message, p.Heartbeat):
            self._take_stats(record, message.stats, now)
        return []

    def _take_stats(self, record: ActorRecord, stats: dict, now: float) -> None:
        """Rule 6: only PVs that changed are in ``stats``."""
        if not isinstance(stats, dict):
            return
        for pv, values in stats.items():
            pv_record = self.pvs.get(pv)
            if pv_record is None or pv_record.actor != record.actor or not isinstance(values, dict):
                continue
            updates = values.get("updates", 0)
            if not isinstance(updates, int):
                continue
            pv_record.connected = bool(values.get("connected", False))
            pv_record.ever_connected = pv_record.ever_connected or pv_record.connected
            pv_record.updates = updates
            last = values.get("last_update")
            pv_record.last_update = last if isinstance(last, (int, float)) else pv_record.last_update
            if pv_record.window is None or updates < pv_record.window[1]:
                pv_record.window = (now, updates)
            elif now - pv_record.window[0] >= RATE_WINDOW_S:
                pv_record.rate = (updates - pv_record.window[1]) / (now - pv_record.window[0])
                pv_record.window = (now, updates)

    def actor_exited(self, actor: str, returncode: int | None, now: float = 0.0) -> list[Effect]:
        """The actor's process is gone: answer everything it owed, tell subscribers, move the
        PVs that keep killing it out (Rule 5), and restart it (now, or after a backoff)."""
        record = self.actors.get(actor)
        if record is None or not record.alive:
            return []
        self.identities.pop(record.identity, None)
        pvs = sorted(record.pvs)
        shown = ", ".join(pvs[:3]) + (f" and {len(pvs) - 3} more" if len(pvs) > 3 else "")
        reason = f"the actor owning {shown or 'no PV'} exited (code {returncode})"
        effects = self._answer_owed(record, reason)
        effects.extend(Announce(p.topic(pv), p.PvLost(pv=pv, reason=reason)) for pv in pvs)
        for pv in pvs:  # what the dead process counted died with it
            pv_record = self.pvs[pv]
            pv_record.connected, pv_record.updates, pv_record.rate = False, 0, 0.0
            pv_record.last_update = pv_record.window = None
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
            effects.extend(self._quarantine(record, now))
        if record.actor not in self.actors:
            return effects  # split into probation processes: nothing left to restart
        delay = restart_delay(record.streak)
        if delay <= 0:
            effects.extend(self._restart(record, now))
        else:
            record.restart_at = now + delay
        return effects

    def _quarantine(self, record: ActorRecord, now: float) -> list[Effect]:
        """Rule 5, after ``record``'s process died."""
        if record.kind == GROUP:
            return []
        suspects = [pv for pv in sorted(record.pvs) if not self.pvs[pv].trusted]
        for pv in suspects:
            self.pvs[pv].strikes += 1
        movers = [pv for pv in suspects if self.pvs[pv].strikes >= QUARANTINE_STRIKES]
        if not movers:
            return []
        if record.kind == OWN:
            return []  # alone already: it only restarts, with backoff
        if record.kind == PROBATION and len(record.pvs) == 1:
            for pv in movers:
                self.pvs[pv].quarantined = True
            record.kind = OWN
            return []
        if record.kind == PROBATION and len(movers) == len(record.pvs):
            del self.actors[record.actor]  # it is replaced by its two halves
        for pv in movers:
            record.pvs.discard(pv)
        effects: list[Effect] = []
        if len(movers) == 1:  # the only suspect: no doubt left
            halves, kind = [movers], OWN
            self.pvs[movers[0]].quarantined = True
        else:  # one of them, or more: halve, and let the next deaths tell
            halves, kind = [movers[: len(movers) // 2], movers[len(movers) // 2:]], PROBATION
        for half in halves:
            actor = f"pv:{half[0]}" if len(half) == 1 else f"probation:{next(self._probations)}"
            effects.extend(self._new_actor(actor, kind, now))
            for pv in half:
                self._assign(pv, self.actors[actor], now)
            effects.append(Quarantined(tuple(half), record.actor, actor))
        return effects

    def _answer_owed(self, record: ActorRecord, reason: str) -> list[Effect]:
        """Rule 3: ``actor_died`` for every request in flight to ``record``'s process or queued
        for it (a put in flight: its outcome unknown)."""
        effects: list[Effect] = []
        for (client, request_id), op in record.inflight.items():
            detail = "; the put's outcome is unknown" if op == p.SetRequest.OP else ""
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason + detail))))
            self._settled(client)
        for client, request_id, _, _ in record.queued:
            effects.append(ToClient(client, error_reply(request_id, ActorDiedError(reason))))
            self._settled(client)
        record.inflight.clear()
        record.queued.clear()
        return effects

    def _retire(self, record: ActorRecord, reason: str, now: float) -> list[Effect]:
        """Forget ``record`` and stop its process for good (Rule 8); whatever still waits for
        it is answered."""
        del self.actors[record.actor]
        self.identities.pop(record.identity, None)
        self._retired[record.actor] = (now, record.restarts + 1)
        effects = self._answer_owed(record, reason)
        if record.alive:
            effects.append(RetireActor(record.actor, reason))
        return effects

    def _restart(self, record: ActorRecord, now: float) -> list[Effect]:
        record.restart_at = None
        record.alive = True
        record.started = record.last_seen = now
        record.restarts += 1
        self.identities[record.identity] = record.actor
        return [SpawnActor(record.actor, record.identity, len(record.pvs))]

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
        while self._trials and self._trials[0][0] <= now:
            _, pv, trial, incarnation = self._trials.popleft()
            pv_record = self.pvs.get(pv)
            # The same record (not one made anew under its name since) and incarnation.
            if (self.actors.get(trial.actor) is trial and pv_record is not None and pv_record.actor == trial.actor
                    and trial.alive and trial.restarts == incarnation):
                pv_record.trusted = True
        effects.extend(self._release_unconnected(now))
        if self._retired:
            self._retired = {a: v for a, v in self._retired.items() if now - v[0] < RETIRED_MEMORY_S}
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
        for client, client_record in list(self.clients.items()):
            idle = now - client_record.last_seen
            if now - max(client_record.last_seen, self.listening_since) > CLIENT_TIMEOUT:
                del self.clients[client]
                self.followed -= len(client_record.pvs or ())
                effects.append(ClientForgotten(client, client_record.name, idle))
        return effects

    def _release_unconnected(self, now: float) -> list[Effect]:
        """Rule 8: PVs adopted ``release_unconnected_s`` ago that never connected since."""
        released: list[str] = []
        emptied: list[ActorRecord] = []
        to_actors: dict[str, list[str]] = {}
        while self._searches and self._searches[0][0] <= now:
            _, pv, adopted = self._searches.popleft()
            pv_record = self.pvs.get(pv)
            if (pv_record is None or pv_record.adopted != adopted or pv_record.ever_connected
                    or self.config.starts_with_daemon(pv) or self.config.group_of(pv) is not None):
                continue
            record = self.actors[pv_record.actor]
            del self.pvs[pv]
            record.pvs.discard(pv)
            released.append(pv)
            if record.kind in (OWN, PROBATION) and not record.pvs:
                emptied.append(record)
            elif record.ready:  # one not ready adopts what it still owns when it is
                to_actors.setdefault(record.identity, []).append(pv)
        if released:
            self.releases += 1
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
            if not record.alive:
                for client, request_id, _, _ in record.queued:
                    effects.append(ToClient(client, error_reply(request_id, HubUnavailableError("the daemon is stopping; the request was not sent"))))
                    self._settled(client)
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

    def status(self, now: float, viewer: ClientRecord | None = None) -> dict:
        """The daemon's state. A ``viewer`` whose identity may not read every PV sees only the
        PVs it may read, and no other client."""
        access = self.config.access
        everything = viewer is None or access.reads_everything(viewer.identity)
        subscribers: dict[str, int] = {}
        for client in self.clients.values():
            for pv in client.pvs or ():
                subscribers[pv] = subscribers.get(pv, 0) + 1
        pvs = []
        for pv in sorted(self.pvs):
            if not everything and not access.may_read(viewer.identity, pv):  # type: ignore[union-attr]
                continue
            pv_record = self.pvs[pv]
            record = self.actors[pv_record.actor]
            pvs.append(
                {
                    "pv": pv,
                    "actor": record.actor,
                    "pid": record.pid,
                    "connected": pv_record.connected and record.ready,
                    "updates": pv_record.updates,
                    "rate": round(self._rate(pv_record, now), 2),
                    "last_update": pv_record.last_update,
                    "subscribers": subscribers.get(pv, 0),
                    "restarts": record.restarts,
                    "quarantined": pv_record.quarantined,
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
                    "kind": r.kind,
                    "pvs": sorted(r.pvs),
                    "pid": r.pid,
                    "ready": r.ready,
                    "inflight": len(r.inflight),
                    "restarts": r.restarts,
                    "age": now - r.started,
                }
                for r in self.actors.values()
                if everything
            ],
            "clients": [
                {
                    "client": c.client.hex(),
                    "name": c.name,
                    "identity": c.identity,
                    "requests": c.requests,
                    "inflight": c.inflight,
                    "idle": now - c.last_seen,
                    "pvs": len(c.pvs or ()),
                }
                for c in self.clients.values()
                if everything or c is viewer
            ],
        }

    @staticmethod
    def _rate(pv_record: PvRecord, now: float) -> float:
        # A PV that stopped changing sends no more stats: its rate decays as time goes by. A
        # busy PV's count comes every ACTOR_STATS_INTERVAL_S (at the next heartbeat after it).
        if pv_record.window is None:
            return 0.0
        since, updates = pv_record.window
        if now - since <= max(2 * RATE_WINDOW_S, p.ACTOR_STATS_INTERVAL_S + 2 * p.ACTOR_HEARTBEAT_S):
            return pv_record.rate
        return (pv_record.updates - updates) / (now - since)


def error_reply(request_id: int, exc: PvhubError, pv: str = "") -> p.ErrorReply:
    return p.ErrorReply(id=request_id, code=exc.code, message=str(exc), pv=pv)
