"""Who owns each PV: the records of actors and PVs, the pool PVs are placed in, and the PVs
moved out of a process that keeps dying.

Rule 1: no I/O; what is decided here comes back as effects (``daemon/effects.py``) for the
router to return. The config is passed in with each call, never kept: the broker reloads it
(broker Rule 5), and a kept one would go stale.
Rule 2: every PV has exactly one owner, an actor, and one actor process owns many PVs. A PV
named in a config group belongs to that group's actor; a PV the config isolates (or one
quarantined, Rule 4) gets an actor of its own; any other PV joins a pooled actor
(``pool:N``, started with the daemon, so no process starts on the way of a request). The
owner's process is told with ``AdoptPvs`` before any request for the PV reaches it.
Ownership outlives the process (routing.py Rule 2).
Rule 3 (placement): PVs of one device or IOC (one name prefix, see ``device_prefix``) share a
pooled process while it has room (``max_pvs_per_actor``); a new prefix goes to the least
loaded one. When the last room is taken, one more pooled process starts at once, ahead of
the next new PV.
Rule 4 (quarantine): a PV is trusted once it has lived ``TRUST_S`` in a process that did not
die. When a shared process dies, each untrusted PV it owned gets a strike; those with
``QUARANTINE_STRIKES`` leave it: one alone moves to a process of its own (quarantined);
several are split between two probation processes, and a probation process that dies is
split again, so that a PV that kills whatever process holds it is found in about log2(n)
deaths while the PVs that did nothing go on in their own process. Config groups stay whole.
A PV released (Rule 5) quarantined, or with strikes and not trusted since, keeps them for ``SUSPECT_MEMORY_S``
(at most ``MAX_SUSPECTS`` names, the oldest forgotten first): asked for again, a quarantined
one goes straight to a process of its own, not back into the pool it killed.
Rule 5 (release): a PV that finds no IOC for ``release_unconnected_s`` (never connected since
it was adopted) is released; a process of its own (isolated, quarantined, on probation) left
with no PV is stopped for good, so that names asked for once do not leave processes behind.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from dataclasses import dataclass, field

from pvhub.config import Config
from pvhub.daemon.effects import Adopt, Effect, Quarantined, SpawnActor

# Rule 5: how long a retired actor's name keeps counting its incarnations: longer than its
# process may take to go (the supervisor's SIGTERM, then SIGKILL after a grace).
RETIRED_MEMORY_S = 30.0
# Rule 3: how many more device prefixes than twice the PVs held ``Placement.homes`` may keep.
HOMES_SLACK = 1024
# Rule 4: a PV that lived this long in a process that did not die is no suspect.
TRUST_S = 10.0
QUARANTINE_STRIKES = 2
# Rule 4: how long, and for how many names, the strikes of released PVs are remembered.
SUSPECT_MEMORY_S = 3600.0
MAX_SUSPECTS = 10_000
# An identity is a ZeroMQ routing id (at most 255 bytes); longer actor names are hashed.
_MAX_IDENTITY_BYTES = 200

POOL, GROUP, OWN, PROBATION = "pool", "group", "own", "probation"


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
    """The part of a PV's name its siblings on one device or IOC share (Rule 3): the record
    name without its field, up to its last ``:`` (``IOC:m1.RBV`` -> ``IOC``)."""
    record = pv.split(".", 1)[0]
    head, sep, _ = record.rpartition(":")
    return head if sep else record


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
    trusted: bool = False  # Rule 4
    strikes: int = 0
    quarantined: bool = False
    connected: bool = False
    ever_connected: bool = False  # since its owner adopted it (Rule 5)
    adopted: float = 0.0
    updates: int = 0
    last_update: float | None = None
    rate: float = 0.0
    window: tuple[float, int] | None = None  # (since, updates then), for the rate


class Placement:
    """Every actor, every PV's owner, and the pool."""

    def __init__(self) -> None:
        self.actors: dict[str, ActorRecord] = {}
        self.pvs: dict[str, PvRecord] = {}
        # identity -> actor, for live incarnations only: a word from any other is ignored.
        self._identities: dict[str, str] = {}
        self.pool: list[str] = []
        # Rule 3: device prefix -> the pooled actor holding its PVs. Prefixes whose PVs all
        # went are dropped when it holds twice as many entries as there are PVs (``_place``).
        self.homes: dict[str, str] = {}
        # Rule 4: (trusted at, pv, actor, incarnation), in the order PVs joined.
        self._trials: collections.deque[tuple[float, str, ActorRecord, int]] = collections.deque()
        # Rule 5: (release at, pv, adopted at) in the order PVs were adopted.
        self._searches: collections.deque[tuple[float, str, float]] = collections.deque()
        self._probations = itertools.count(1)
        self.releases = 0  # batches of PVs released so far (Rule 5)
        # Names retired lately -> (when, their next incarnation); kept RETIRED_MEMORY_S.
        self._retired: dict[str, tuple[float, int]] = {}
        # Rule 4: PVs released with strikes -> (when, strikes, quarantined), oldest first.
        self._suspects: dict[str, tuple[float, int, bool]] = {}

    def live(self, identity: str) -> ActorRecord | None:
        """The record of the live incarnation ``identity``; None for any other, whose word
        no longer counts."""
        return self.actors.get(self._identities.get(identity, ""))

    # --- owners ----------------------------------------------------------------------------

    def start(self, config: Config, now: float) -> list[Effect]:
        """The pool, the config's groups, and the PVs the config asks to start with."""
        effects: list[Effect] = []
        for _ in range(config.pool_size):
            effects.extend(self._grow_pool(now))
        for group in config.groups:
            effects.extend(self._group_actor(group, config, now)[1])
        for pv in config.start:
            effects.extend(self.ensure_owner(pv, config, now))
        return effects

    def _new_actor(self, actor: str, kind: str, now: float) -> list[Effect]:
        # A name retired a moment ago goes on counting its incarnations: its old process may
        # still be on its way out, and must never be taken for the new one (``identity_of``).
        _, incarnation = self._retired.pop(actor, (0.0, 0))
        record = self.actors[actor] = ActorRecord(actor=actor, kind=kind, started=now, last_seen=now,
                                                  restarts=incarnation)
        self._identities[record.identity] = actor
        return [SpawnActor(actor, record.identity)]

    def _group_actor(self, group: str, config: Config, now: float) -> tuple[ActorRecord, list[Effect]]:
        """The actor of a config group, made (with all its PVs) if it does not exist yet."""
        actor = f"group:{group}"
        if actor in self.actors:
            return self.actors[actor], []
        effects = self._new_actor(actor, GROUP, now)
        for pv in config.groups[group]:
            self._assign(pv, self.actors[actor], config, now)
        return self.actors[actor], effects

    def _grow_pool(self, now: float) -> list[Effect]:
        actor = f"pool:{len(self.pool)}"
        self.pool.append(actor)
        return self._new_actor(actor, POOL, now)

    def ensure_owner(self, pv: str, config: Config, now: float) -> list[Effect]:
        """Give ``pv`` an owner if it has none (Rule 2), telling a running owner at once."""
        if pv in self.pvs:
            return []
        group = config.group_of(pv)
        effects: list[Effect] = []
        released, strikes, quarantined = self._suspects.pop(pv, (now, 0, False))
        if now - released >= SUSPECT_MEMORY_S:
            strikes, quarantined = 0, False
        if group is not None:
            record, spawned = self._group_actor(group, config, now)
            effects.extend(spawned)
        elif config.isolated(pv) or quarantined:
            record = self.actors.get(f"pv:{pv}")
            if record is None:
                effects.extend(self._new_actor(f"pv:{pv}", OWN, now))
                record = self.actors[f"pv:{pv}"]
        else:
            record, spawned = self._pool_member_for(pv, config.max_pvs_per_actor, now)
            effects.extend(spawned)
        effects.extend(self._assign(pv, record, config, now))
        if strikes or quarantined:
            self.pvs[pv].strikes = strikes
            self.pvs[pv].quarantined = quarantined and record.kind == OWN
        if record.kind == POOL and not any(len(self.actors[a].pvs) < config.max_pvs_per_actor for a in self.pool):
            effects.extend(self._grow_pool(now))  # Rule 3: room for the next new PV, ahead of it
        return effects

    def _pool_member_for(self, pv: str, cap: int, now: float) -> tuple[ActorRecord, list[Effect]]:
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
        """``prefix``'s PVs go to ``actor`` from now on (Rule 3). Entries of prefixes none of
        whose PVs is held any more are dropped once they would double the map: O(PVs) then,
        O(1) per placement over time."""
        self.homes[prefix] = actor
        if len(self.homes) > 2 * len(self.pvs) + HOMES_SLACK:
            pool = set(self.pool)
            held = {device_prefix(pv) for pv, record in self.pvs.items() if record.actor in pool}
            self.homes = {p_: a for p_, a in self.homes.items() if p_ in held or p_ == prefix}

    def _assign(self, pv: str, record: ActorRecord, config: Config, now: float) -> list[Effect]:
        """``pv`` belongs to ``record`` from now on; a ready process adopts it at once."""
        pv_record = self.pvs.get(pv)
        if pv_record is None:
            pv_record = self.pvs[pv] = PvRecord(pv=pv, actor=record.actor)
        pv_record.actor = record.actor
        pv_record.connected = pv_record.ever_connected = False
        pv_record.adopted = now
        pv_record.window = None
        record.pvs.add(pv)
        release_s = config.limits.release_unconnected_s
        if release_s > 0:
            self._searches.append((now + release_s, pv, now))
        if not record.ready:
            return []  # adopted with the rest once it says ActorReady
        self.on_trial(pv, record, now)
        return [Adopt(record.identity, (pv,))]

    # --- trust and quarantine (Rule 4) -----------------------------------------------------

    def on_trial(self, pv: str, record: ActorRecord, now: float) -> None:
        """``pv`` now lives in ``record``'s process: trusted ``TRUST_S`` from now if that
        incarnation lives so long."""
        if not self.pvs[pv].trusted:
            self._trials.append((now + TRUST_S, pv, record, record.restarts))

    def trust(self, now: float) -> None:
        """The PVs whose trial is over, in the process they began it in, are trusted."""
        while self._trials and self._trials[0][0] <= now:
            _, pv, trial, incarnation = self._trials.popleft()
            pv_record = self.pvs.get(pv)
            # The same record (not one made anew under its name since) and incarnation.
            if (self.actors.get(trial.actor) is trial and pv_record is not None and pv_record.actor == trial.actor
                    and trial.alive and trial.restarts == incarnation):
                pv_record.trusted = True

    def quarantine(self, record: ActorRecord, config: Config, now: float) -> list[Effect]:
        """Rule 4, after ``record``'s process died."""
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
                self._assign(pv, self.actors[actor], config, now)
            effects.append(Quarantined(tuple(half), record.actor, actor))
        return effects

    # --- incarnations ----------------------------------------------------------------------

    def died(self, record: ActorRecord) -> None:
        """``record``'s process is gone: nothing its incarnation sends late counts."""
        self._identities.pop(record.identity, None)

    def restart(self, record: ActorRecord, now: float) -> list[Effect]:
        """A new incarnation of ``record``'s actor, for the same PVs."""
        record.restart_at = None
        record.alive = True
        record.started = record.last_seen = now
        record.restarts += 1
        self._identities[record.identity] = record.actor
        return [SpawnActor(record.actor, record.identity, len(record.pvs))]

    def retire(self, record: ActorRecord, now: float) -> None:
        """Forget ``record``: it owns no PV any more (Rule 5). Its name, should it come back,
        goes on counting incarnations for ``RETIRED_MEMORY_S``."""
        del self.actors[record.actor]
        self._identities.pop(record.identity, None)
        self._retired[record.actor] = (now, record.restarts + 1)

    def forget_retired(self, now: float) -> None:
        if self._retired:
            self._retired = {a: v for a, v in self._retired.items() if now - v[0] < RETIRED_MEMORY_S}

    @property
    def suspects_remembered(self) -> int:
        """How many released PVs' strikes are kept (Rule 4)."""
        return len(self._suspects)

    def _remember_suspect(self, pv_record: PvRecord, now: float) -> None:
        """Keep a released PV's strikes (Rule 4); the oldest go past the bound or the time."""
        self._suspects.pop(pv_record.pv, None)
        # A trusted PV's strikes are history: they are not carried into a new trial.
        strikes = 0 if pv_record.trusted else pv_record.strikes
        self._suspects[pv_record.pv] = (now, strikes, pv_record.quarantined)
        for pv, (released, _, _) in list(itertools.islice(self._suspects.items(), 2)):
            if len(self._suspects) > MAX_SUSPECTS or now - released >= SUSPECT_MEMORY_S:
                del self._suspects[pv]

    # --- release (Rule 5) ------------------------------------------------------------------

    def release_unconnected(self, config: Config, now: float
                            ) -> tuple[list[str], list[ActorRecord], dict[str, list[str]]]:
        """PVs adopted ``release_unconnected_s`` ago that never connected since, dropped:
        their names, the processes of their own left with no PV (for the router to retire),
        and for each other ready owner (by identity) the names it must let go."""
        released: list[str] = []
        emptied: list[ActorRecord] = []
        to_actors: dict[str, list[str]] = {}
        while self._searches and self._searches[0][0] <= now:
            _, pv, adopted = self._searches.popleft()
            pv_record = self.pvs.get(pv)
            if (pv_record is None or pv_record.adopted != adopted or pv_record.ever_connected
                    or config.starts_with_daemon(pv) or config.group_of(pv) is not None):
                continue
            record = self.actors[pv_record.actor]
            if (pv_record.strikes and not pv_record.trusted) or pv_record.quarantined:
                self._remember_suspect(pv_record, now)
            del self.pvs[pv]
            record.pvs.discard(pv)
            released.append(pv)
            if record.kind in (OWN, PROBATION) and not record.pvs:
                emptied.append(record)
            elif record.ready:  # one not ready adopts what it still owns when it is
                to_actors.setdefault(record.identity, []).append(pv)
        if released:
            self.releases += 1
        return released, emptied, to_actors
