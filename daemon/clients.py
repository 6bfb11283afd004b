"""The clients the broker knows: one record per connection, its bounds, and when it is
forgotten.

Rule 1: no I/O. A client is a connection (a ZeroMQ routing id); its identity is the name of
its CURVE key (``daemon/security.py``), ``anonymous`` without one. A new connection that
takes a routing id gets a new record: nothing the old one was owed or allowed carries over.
Rule 2 (access and limits): a client's identity must have the right to read (read, describe,
subscribe) or write (set) the PV, else ``access_denied`` at once. Each connection has a
request rate (a token bucket), a bound on its requests in flight and on the PVs it has asked
for; past one, that request alone gets a ``limit`` error. A status walks every PV and every
client's list of followed PVs, so a client pays for a status by what it walks, from a budget
of its identity's, not its connection's: ``pvhub status`` run in a loop is a new connection
each time. Identities are the daemon's configured keys and ``anonymous``, so their budgets
are few.
Rule 3 (Paranoid Pirate): a client silent for ``LIVENESS`` of its heartbeats (plus a margin)
is forgotten. Silence is counted from the later of its last word and the last time the
daemon itself was not running (``listening_since``, routing.py Rule 4).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from pvhub import protocol as p
from pvhub.access import ANONYMOUS
from pvhub.config import Config
from pvhub.daemon.effects import ClientForgotten
from pvhub.errors import AccessDeniedError, LimitError, PvhubError

CLIENT_TIMEOUT = p.LIVENESS * p.CLIENT_HEARTBEAT_S + 2.0
# A client's name (its hello says it) is kept and shown this long at most.
MAX_CLIENT_NAME = 200
# Rule 2: a status walks every PV: it costs an identity PVs / STATUS_PVS_PER_TOKEN tokens of
# a bucket of STATUS_PER_S a second, so that no identity makes the daemon walk more than
# 10,000 PVs a second for it (one status a second at 10,000 PVs; as many as it likes of a
# small daemon), with a burst of STATUS_BURST_S seconds' worth (an operator's or a monitoring
# script's dozen statuses in a row at 20,000 PVs, or two at 100,000).
STATUS_PER_S = 50.0
STATUS_PVS_PER_TOKEN = 200
STATUS_BURST_S = 30.0


class TokenBucket:
    """Requests per second with a burst of ``burst_s`` seconds' worth."""

    __slots__ = ("rate", "capacity", "tokens", "last")

    def __init__(self, rate: float, now: float, burst_s: float = 1.0) -> None:
        self.rate = rate
        self.capacity = self.tokens = rate * burst_s
        self.last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= min(cost, self.capacity):
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
    inflight: int = 0  # requests sent to (or queued for) actors, not finally answered
    # PVs this connection asked for (bounded by max_pvs_per_client); names the daemon has
    # released since are dropped when the bound is reached (``pruned_at``: ``Placement.releases``
    # then).
    asked: set[str] = field(default_factory=set)
    pruned_at: int = 0
    # Final replies the broker could not deliver (its queue for this client was full); said
    # in the next pong, bounded.
    lost: list[int] = field(default_factory=list)

    def take_lost(self) -> list[int] | None:
        """The ids of final replies lost since the last pong, for this pong (None: none)."""
        lost, self.lost = self.lost or None, []
        return lost


class Clients(Mapping[bytes, ClientRecord]):
    """Every client connection the broker knows, by routing id."""

    def __init__(self) -> None:
        self._records: dict[bytes, ClientRecord] = {}
        self._status_buckets: dict[str, TokenBucket] = {}  # by identity (Rule 2)
        self.followed = 0  # the lengths of all clients' lists of followed PVs, summed

    def __getitem__(self, client: bytes) -> ClientRecord:
        return self._records[client]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def heard(self, client: bytes, identity: str, now: float) -> ClientRecord:
        """The record of the connection that sent a message ``now`` (Rule 1)."""
        record = self._records.get(client)
        if record is None or record.identity != identity:  # a new connection took this routing id
            if record is not None:
                self._unfollow(record)
            record = self._records[client] = ClientRecord(client=client, first_seen=now, last_seen=now,
                                                          identity=identity)
        record.last_seen = now
        record.requests += 1
        return record

    def _unfollow(self, record: ClientRecord) -> None:
        """``record``'s list of followed PVs leaves the running total (its owner may replace it)."""
        self.followed -= len(record.pvs or ())

    def follow(self, record: ClientRecord, pvs: list, limit: int) -> None:
        """``record``'s client follows ``pvs`` (its ping says so), at most ``limit`` of them."""
        self._unfollow(record)
        record.pvs = tuple(str(pv) for pv in pvs[:limit])
        self.followed += len(record.pvs)

    def status_refusal(self, record: ClientRecord, held: int, now: float) -> PvhubError | None:
        """Why a status must not be built for ``record``'s client now (Rule 2), or None.
        ``held`` is how many PVs the daemon holds."""
        bucket = self._status_buckets.get(record.identity)
        if bucket is None:
            bucket = self._status_buckets[record.identity] = TokenBucket(STATUS_PER_S, now, STATUS_BURST_S)
        # A status walks every PV and every client's list of followed PVs: it costs both.
        if not bucket.take(now, max(held + self.followed, 1) / STATUS_PVS_PER_TOKEN):
            return LimitError(
                f"too many status requests from {record.identity!r} (each walks all {held} PVs and "
                f"{self.followed} followed by clients); ask less often")
        return None

    @staticmethod
    def refusal(record: ClientRecord, message: p.Message, config: Config, held: Mapping[str, object],
                releases: int, now: float) -> PvhubError | None:
        """Why ``message`` must not go on for ``record``'s client (Rule 2), or None. ``held``
        are the PVs the daemon holds, ``releases`` the batches of them released so far. Costs
        lookups only."""
        pv: str = message.pv  # type: ignore[attr-defined]
        limits = config.limits
        access = config.access
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
            if record.pruned_at != releases:
                # PVs released since the last look no longer count against the client: at most
                # one pass over its names per batch of releases, never one per request.
                record.pruned_at = releases
                record.asked.intersection_update(held.keys())
            if len(record.asked) >= limits.max_pvs_per_client:
                return LimitError(f"this client has asked for {len(record.asked)} PVs, the most the daemon "
                                  f"allows one client; {pv!r} was not opened")
        return None

    def sent(self, client: bytes, pv: str) -> None:
        """A request of ``client`` for ``pv`` went to (or was queued for) an actor."""
        record = self._records.get(client)
        if record is not None:
            record.asked.add(pv)
            record.inflight += 1

    def settled(self, client: bytes) -> None:
        """A request of ``client`` was finally answered (Rule 2's in-flight bound)."""
        record = self._records.get(client)
        if record is not None:
            record.inflight = max(0, record.inflight - 1)

    def reply_lost(self, client: bytes, request_id: int, most: int) -> None:
        """The final reply to ``request_id`` could not be queued for ``client``: its next pong
        says so (at most ``most`` ids are kept)."""
        record = self._records.get(client)
        if record is not None and len(record.lost) < most:
            record.lost.append(request_id)

    def gone(self, client: bytes) -> None:
        record = self._records.pop(client, None)
        if record is not None:
            self._unfollow(record)

    def forget_silent(self, now: float, listening_since: float) -> list[ClientForgotten]:
        """Rule 3."""
        forgotten: list[ClientForgotten] = []
        for client, record in list(self._records.items()):
            idle = now - record.last_seen
            if now - max(record.last_seen, listening_since) > CLIENT_TIMEOUT:
                del self._records[client]
                self._unfollow(record)
                forgotten.append(ClientForgotten(client, record.name, idle))
        return forgotten

    def subscribers(self) -> dict[str, int]:
        """How many clients follow each PV that any client follows."""
        counts: dict[str, int] = {}
        for record in self._records.values():
            for pv in record.pvs or ():
                counts[pv] = counts.get(pv, 0) + 1
        return counts
