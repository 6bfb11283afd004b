"""The broker's rules, through ``Router`` (``pvhub.daemon.routing``): who owns a PV, what each
message becomes, what happens to requests when an actor dies, when it is restarted, killed,
or a client forgotten. No sockets and no clock: messages and ``now`` (plain floats) in,
effects out.
"""

from __future__ import annotations

import pytest

from pvhub import __version__
from pvhub import protocol as p
from pvhub.config import Config, Limits
from pvhub.daemon.clients import CLIENT_TIMEOUT, Clients
from pvhub.errors import LimitError
from pvhub.daemon.effects import Adopt, Announce, ClientForgotten, KillActor, SpawnActor, Stalled, ToActor, ToClient
from pvhub.daemon.placement import identity_of
from pvhub.daemon.routing import (
    ACTOR_STARTUP_TIMEOUT,
    ACTOR_TIMEOUT,
    BACKOFF_MAX_S,
    DIES_YOUNG_S,
    STALL_S,
    TICK_S,
    Router,
    restart_delay,
)

READINGS = "tcp://127.0.0.1:5571"
LARGE_READINGS = "tcp://127.0.0.1:5572"
ALICE = b"\x00alice"
BOB = b"\x00bob"


def make_router(**config) -> Router:
    """A router; unless told otherwise, with no pool (each PV in a process of its own), the
    rules most tests here are about. Pooled placement has tests of its own below."""
    config.setdefault("pool_size", 0)
    return Router(Config(**config), READINGS, LARGE_READINGS)


def spawn(actor: str, pvs: tuple[str, ...] = (), incarnation: int = 0) -> SpawnActor:
    """The effect that starts incarnation ``incarnation`` of ``actor`` (which, once ready, is
    given ``pvs``: a restart says how many)."""
    return SpawnActor(actor, identity_of(actor, incarnation), len(pvs) if incarnation else 0)


def adopt(identity: str, *pvs: str) -> Adopt:
    """The broker's word to an actor that it owns ``pvs`` from now on."""
    return Adopt(identity, pvs)


def owner(router: Router, pv: str) -> str:
    return router.pvs[pv].actor


def send(router: Router, message: p.Message, client: bytes = ALICE, now: float = 10.0):
    """A client's message as the broker hands it over: decoded, with its raw bytes."""
    return router.client_message(client, message, p.encode(message), now)


def ready(router: Router, identity: str, pid: int = 4321, now: float = 11.0):
    """``ActorReady`` from the incarnation ``identity`` (``identity_of(actor, n)``)."""
    return router.actor_message(identity, b"", p.ActorReady(actor=identity, pid=pid), now)


def from_actor(router: Router, identity: str, client: bytes, message: p.Message, now: float = 12.0):
    return router.actor_message(identity, client, message, now)


def only_error(effects, client: bytes = ALICE) -> p.ErrorReply:
    (effect,) = effects
    assert isinstance(effect, ToClient) and effect.client == client
    assert isinstance(effect.message, p.ErrorReply)
    return effect.message


def inflight(router: Router, actor: str) -> int:
    (entry,) = [a for a in router.status(0.0)["actors"] if a["actor"] == actor]
    return entry["inflight"]


def running(router: Router, pv: str = "X:a") -> str:
    """Route one request to ``pv`` and make its actor ready; return the actor's id."""
    send(router, p.DescribeRequest(id=999, pv=pv))
    actor = owner(router, pv)
    ready(router, actor)
    from_actor(router, actor, ALICE, p.DescribeReply(id=999, pv=pv, connected=True))
    assert inflight(router, actor) == 0
    return actor


def replies(effects) -> dict:
    """The messages sent to clients, by (client, request id)."""
    return {(e.client, e.message.id): e.message for e in effects if isinstance(e, ToClient)}


def of_type(effects, kind) -> list:
    return [e for e in effects if isinstance(e, kind)]


def ticking(router: Router, now: float) -> list:
    """The effects of every tick of a daemon that runs on until ``now``: its loop ticks every
    ``TICK_S`` or sooner (a longer gap is a stall of the daemon, tested on its own)."""
    effects = []
    if router.last_tick is not None:
        at = router.last_tick + TICK_S
        while at < now:
            effects.extend(router.tick(at))
            at += TICK_S
    effects.extend(router.tick(now))
    return effects


def actor_tick(router: Router, now: float) -> list:
    """``tick``'s effects on actors (clients left silent by a test are forgotten meanwhile)."""
    return [e for e in ticking(router, now) if not isinstance(e, ClientForgotten)]


# --- the daemon's own requests ---------------------------------------------------------------


def test_hello_replies_the_readings_endpoint_version_and_client_identity():
    router = make_router()
    effects = send(router, p.HelloRequest(id=1, client="bluesky@host:42"))
    assert effects == [
        ToClient(
            ALICE,
            p.HelloReply(id=1, readings=READINGS, server_version=__version__, client=ALICE,
                         max_message_bytes=16 * 1024 * 1024, identity="anonymous",
                         large_readings=LARGE_READINGS),
        )
    ]
    (client,) = router.status(10.0)["clients"]
    assert client["name"] == "bluesky@host:42"
    assert client["client"] == ALICE.hex()


def test_ping_gets_pong_that_asks_for_the_pvs_until_a_ping_said_them():
    router = make_router()
    assert send(router, p.PingRequest(id=77)) == [ToClient(ALICE, p.Pong(id=77, pvs_wanted=True))]
    assert send(router, p.PingRequest(id=78, pvs=[])) == [ToClient(ALICE, p.Pong(id=78))]
    assert send(router, p.PingRequest(id=79)) == [ToClient(ALICE, p.Pong(id=79))]


def test_status_describes_actors_and_clients():
    router = make_router(start=("X:a",))
    router.initial_actors(now=100.0)
    send(router, p.HelloRequest(id=1, client="me"), now=101.0)
    (effect,) = send(router, p.StatusRequest(id=2), now=105.0)
    assert isinstance(effect.message, p.StatusReply) and effect.message.id == 2
    status = effect.message.status
    assert status["version"] == __version__
    assert status["readings"] == READINGS and status["large_readings"] == LARGE_READINGS
    assert status["uptime"] == pytest.approx(5.0)
    assert status["actors"] == [
        {"actor": "pv:X:a", "kind": "own", "pvs": ["X:a"], "pid": None, "ready": False, "inflight": 0,
         "restarts": 0, "age": 5.0}
    ]
    assert status["clients"] == [
        {"client": ALICE.hex(), "name": "me", "identity": "anonymous", "requests": 2, "inflight": 0,
         "idle": 0.0, "pvs": 0}
    ]


def test_a_status_budget_is_its_identitys_not_its_connections():
    # `pvhub status` in a loop is a new connection each time: with a budget per connection,
    # each would walk every PV on the broker's thread at once, whatever it had cost before.
    clients = Clients()
    held = 1_000_000  # 5,000 tokens a status, past the burst, at 50 a second: one every 100 s
    first = clients.heard(ALICE, "anonymous", 10.0)
    assert clients.status_refusal(first, held, now=10.0) is None  # the first, on credit
    again = clients.heard(BOB, "anonymous", 10.1)
    refused = clients.status_refusal(again, held, now=10.1)
    assert isinstance(refused, LimitError) and "'anonymous'" in str(refused)
    keyed = clients.heard(b"\x00carol", "carol", 10.1)
    assert clients.status_refusal(keyed, held, now=10.1) is None  # an identity of its own
    assert isinstance(clients.status_refusal(again, held, now=109.0), LimitError)
    assert clients.status_refusal(again, held, now=110.1) is None  # the credit paid back


def test_status_shows_a_ready_actors_pid():
    router = make_router()
    actor = running(router)
    (entry,) = router.status(20.0)["actors"]
    assert entry["actor"] == actor and entry["ready"] is True and entry["pid"] == 4321


@pytest.mark.parametrize(
    "message",
    [
        p.Update(pv="X:a", epoch=1, seq=1, connected=True),
        p.Heartbeat(sender="someone"),
        p.Pong(id=5),
    ],
    ids=["update", "heartbeat", "reply"],
)
def test_a_client_message_that_is_not_a_request_is_refused(message):
    router = make_router()
    error = only_error(send(router, message))
    assert error.code == "unknown_operation"
    assert error.id == getattr(message, "id", 0)
    assert router.actors == {}


# --- routing to actors --------------------------------------------------------------------------


def test_the_first_request_for_a_pv_spawns_its_actor_and_waits_for_it():
    router = make_router()
    effects = send(router, p.ReadRequest(id=1, pv="X:a"))
    assert effects == [spawn("pv:X:a", ("X:a",))]
    assert owner(router, "X:a") == "pv:X:a"


def test_queued_requests_are_forwarded_untouched_once_the_actor_is_ready():
    router = make_router()
    first = p.ReadRequest(id=1, pv="X:a", publish=True)
    second = p.SetRequest(id=2, pv="X:a", value=[1.5, 2.5])
    send(router, first, client=ALICE)
    assert send(router, second, client=BOB) == []  # no second spawn, still queued
    effects = ready(router, "pv:X:a")
    assert effects == [
        adopt("pv:X:a", "X:a"),  # first: the actor must own the PV before it is asked
        ToActor("pv:X:a", ALICE, p.encode(first)),
        ToActor("pv:X:a", BOB, p.encode(second)),
    ]
    assert inflight(router, "pv:X:a") == 2
    assert ready(router, "pv:X:a") == []  # the queue was emptied


def test_requests_to_a_ready_actor_go_straight_to_it():
    router = make_router()
    actor = running(router)
    message = p.DescribeRequest(id=5, pv="X:a")
    assert send(router, message) == [ToActor(actor, ALICE, p.encode(message))]


def test_each_pv_gets_its_own_actor():
    router = make_router()
    assert send(router, p.ReadRequest(id=1, pv="X:a")) == [spawn("pv:X:a", ("X:a",))]
    assert send(router, p.ReadRequest(id=2, pv="X:b")) == [spawn("pv:X:b", ("X:b",))]
    assert set(router.actors) == {"pv:X:a", "pv:X:b"}


def test_pvs_of_a_group_share_the_group_actor():
    router = make_router(groups={"motors": ("M:1", "M:2")})
    assert send(router, p.ReadRequest(id=1, pv="M:2")) == [
        spawn("group:motors", ("M:1", "M:2"))
    ]
    assert send(router, p.ReadRequest(id=2, pv="M:1")) == []
    assert {pv: owner(router, pv) for pv in ("M:1", "M:2")} == {"M:1": "group:motors", "M:2": "group:motors"}
    effects = ready(router, "group:motors")
    assert effects[0] == adopt("group:motors", "M:1", "M:2")
    assert [e.actor for e in effects] == ["group:motors"] * 3


def test_initial_actors_start_groups_and_start_pvs_once_each():
    router = make_router(start=("X:a", "M:1"), groups={"motors": ("M:1", "M:2")})
    effects = router.initial_actors(now=1.0)
    assert sorted(effects, key=lambda e: e.actor) == [
        spawn("group:motors", ("M:1", "M:2")),
        spawn("pv:X:a", ("X:a",)),
    ]
    assert send(router, p.ReadRequest(id=1, pv="X:a")) == []  # already started


def test_initial_actors_with_an_empty_config_start_nothing():
    assert make_router().initial_actors(now=1.0) == []


def test_a_pv_the_config_does_not_allow_is_refused_without_an_actor():
    router = make_router(allow=("IOC:*",))
    error = only_error(send(router, p.SetRequest(id=3, pv="OTHER:x", value=1)))
    assert error.code == "pv_not_allowed"
    assert error.id == 3 and error.pv == "OTHER:x"
    assert router.actors == {}
    assert send(router, p.ReadRequest(id=4, pv="IOC:x")) == [spawn("pv:IOC:x", ("IOC:x",))]


@pytest.mark.parametrize(
    "pv",
    ["has space", "", "x" * 257, "tab\there", "caf\u00e9", "nul\0", "R" * 60 + ".VAL"],
    ids=["space", "empty", "too-long", "tab", "non-ascii", "nul", "record-too-long-for-ca"],
)
def test_an_invalid_pv_name_is_refused(pv):
    router = make_router()
    error = only_error(send(router, p.ReadRequest(id=8, pv=pv)))
    assert error.id == 8
    assert error.code == "pv_not_allowed"
    assert router.actors == {}


def test_a_pv_name_of_256_characters_is_accepted():
    pv = "x" * 59 + "." + "F" * 196
    assert send(make_router(), p.ReadRequest(id=1, pv=pv)) == [spawn(f"pv:{pv}", (pv,))]


# --- replies from actors ------------------------------------------------------------------------


def test_a_final_reply_is_forwarded_and_clears_the_request():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"))
    assert inflight(router, actor) == 1
    snapshot = p.Snapshot(id=1, pv="X:a", epoch=1, seq=3, connected=True)
    assert from_actor(router, actor, ALICE, snapshot) == [ToClient(ALICE, snapshot)]
    assert inflight(router, actor) == 0


def test_set_accepted_keeps_the_set_in_flight_until_done():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0))
    accepted = p.SetAccepted(id=2, pv="X:a")
    assert from_actor(router, actor, ALICE, accepted) == [ToClient(ALICE, accepted)]
    assert inflight(router, actor) == 1
    done = p.SetDone(id=2, pv="X:a", epoch=1, seq=4)
    assert from_actor(router, actor, ALICE, done) == [ToClient(ALICE, done)]
    assert inflight(router, actor) == 0


def test_an_error_reply_from_an_actor_clears_the_request():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0))
    error = p.ErrorReply(id=2, code="read_only", message="no", pv="X:a")
    assert from_actor(router, actor, ALICE, error) == [ToClient(ALICE, error)]
    assert inflight(router, actor) == 0


def test_a_reply_clears_only_its_own_clients_request():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.ReadRequest(id=1, pv="X:a"), client=BOB)
    from_actor(router, actor, BOB, p.Snapshot(id=1, pv="X:a", epoch=1, seq=1, connected=True))
    assert inflight(router, actor) == 1


def test_heartbeats_from_an_actor_produce_nothing_but_refresh_it():
    router = make_router()
    actor = running(router)
    assert router.actor_message(actor, b"", p.Heartbeat(sender=actor), now=50.0) == []
    assert router.actors[actor].last_seen == 50.0


def test_messages_from_an_unknown_actor_are_ignored():
    router = make_router()
    assert ready(router, "pv:nobody") == []
    assert from_actor(router, "pv:nobody", ALICE, p.Pong(id=1)) == []
    assert router.actors == {}


# --- actors that die: every request is answered ------------------------------------------------


def test_an_actor_that_dies_fails_every_request_in_flight():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0), client=BOB)
    answered = replies(router.actor_exited(actor, returncode=-9, now=13.0))
    assert set(answered) == {(ALICE, 1), (BOB, 2)}
    assert all(m.code == "actor_died" for m in answered.values())
    assert "-9" in answered[(ALICE, 1)].message
    assert "outcome is unknown" in answered[(BOB, 2)].message
    assert "outcome is unknown" not in answered[(ALICE, 1)].message
    assert inflight(router, actor) == 0


def test_an_actor_that_dies_before_ready_fails_every_queued_request():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0), client=BOB)
    effects = router.actor_exited("pv:X:a", returncode=1, now=11.0)
    answered = sorted((client, m.id, m.code) for (client, _), m in replies(effects).items())
    assert answered == [(ALICE, 1, "actor_died"), (BOB, 2, "actor_died")]
    assert "outcome is unknown" not in replies(effects)[(BOB, 2)].message  # it was never sent
    assert router.actors["pv:X:a"].queued == []


def test_a_set_in_flight_after_being_queued_still_says_its_outcome_is_unknown():
    router = make_router()
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0))
    ready(router, "pv:X:a")
    (error,) = replies(router.actor_exited("pv:X:a", returncode=1, now=12.0)).values()
    assert error.code == "actor_died"
    assert "outcome is unknown" in error.message


def test_a_read_in_flight_after_being_queued_is_not_told_about_a_put():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"))
    ready(router, "pv:X:a")
    (error,) = replies(router.actor_exited("pv:X:a", returncode=1, now=12.0)).values()
    assert error.code == "actor_died"
    assert "put" not in error.message


def test_an_actor_that_dies_announces_each_of_its_pvs_lost_on_its_topic():
    router = make_router(groups={"motors": ("M:1", "M:2")})
    router.initial_actors(now=0.0)
    ready(router, "group:motors", now=1.0)
    announced = of_type(router.actor_exited("group:motors", returncode=-11, now=30.0), Announce)
    assert [(a.topic, type(a.message), a.message.pv) for a in announced] == [
        (p.topic("M:1"), p.PvLost, "M:1"),
        (p.topic("M:2"), p.PvLost, "M:2"),
    ]
    assert all("-11" in a.message.reason for a in announced)


# --- actors that die: ownership outlives the process -------------------------------------------


def test_the_first_death_restarts_the_actor_at_once_as_a_new_incarnation_keeping_its_pvs():
    router = make_router()
    actor = running(router)
    effects = router.actor_exited(actor, returncode=0, now=13.0)
    assert of_type(effects, SpawnActor) == [SpawnActor(actor, f"{actor} 1", 1)]
    assert owner(router, "X:a") == actor
    record = router.actors[actor]
    assert (record.alive, record.ready, record.pid, record.restarts) == (True, False, None, 1)
    assert record.started == 13.0 and record.restart_at is None


def test_a_group_actor_is_restarted_once_for_all_its_pvs():
    router = make_router(groups={"motors": ("M:1", "M:2")})
    router.initial_actors(now=0.0)
    effects = router.actor_exited("group:motors", returncode=1, now=1.0)
    assert of_type(effects, SpawnActor) == [spawn("group:motors", ("M:1", "M:2"), 1)]
    assert send(router, p.ReadRequest(id=1, pv="M:2"), now=1.5) == []  # waits, no second spawn


def test_a_request_during_a_restart_waits_for_the_new_incarnations_ready():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=13.0)
    request = p.ReadRequest(id=7, pv="X:a")
    assert send(router, request, now=13.5) == []
    assert router.op_of(f"{actor} 1", ALICE, 7) is None  # queued, not in flight
    assert ready(router, f"{actor} 1", pid=5555, now=14.0) == [
        adopt(f"{actor} 1", "X:a"), ToActor(f"{actor} 1", ALICE, p.encode(request))]
    assert router.op_of(f"{actor} 1", ALICE, 7) == "read"
    assert router.actors[actor].pid == 5555
    # Later requests go to the new incarnation too, and its replies are routed.
    describe = p.DescribeRequest(id=8, pv="X:a")
    assert send(router, describe, now=14.5) == [ToActor(f"{actor} 1", ALICE, p.encode(describe))]
    reply = p.DescribeReply(id=8, pv="X:a", connected=True)
    assert from_actor(router, f"{actor} 1", ALICE, reply, now=15.0) == [ToClient(ALICE, reply)]


@pytest.mark.parametrize(
    ("actor", "incarnation", "identity"),
    [("pv:X:a", 0, "pv:X:a"), ("pv:X:a", 1, "pv:X:a 1"), ("group:motors", 12, "group:motors 12")],
)
def test_identity_of_an_incarnation(actor, incarnation, identity):
    assert identity_of(actor, incarnation) == identity


def test_a_long_actor_name_gets_a_short_identity_that_stays_apart():
    long_a, long_b = "pv:" + "A" * 300, "pv:" + "A" * 299 + "B"
    identities = {identity_of(name, n) for name in (long_a, long_b) for n in (0, 1)}
    assert len(identities) == 4
    assert all(len(identity.encode()) <= 255 for identity in identities)


def test_a_pv_too_long_for_a_zeromq_identity_still_gets_a_working_actor():
    router = make_router()
    pv = "X:" + "a" * 57 + "." + "F" * 196
    request = p.ReadRequest(id=1, pv=pv)
    (spawn_effect,) = send(router, request, now=0.0)
    assert len(spawn_effect.identity.encode()) <= 255
    assert ready(router, spawn_effect.identity, now=1.0)[-1] == ToActor(spawn_effect.identity, ALICE, p.encode(request))


def test_a_pv_whose_name_ends_in_hash_and_digits_gets_a_working_actor():
    router = make_router()
    request = p.ReadRequest(id=1, pv="X:a#1")
    (spawn_effect,) = send(router, request, now=0.0)
    identity = spawn_effect.identity
    assert ready(router, identity, now=1.0) == [adopt(identity, "X:a#1"), ToActor(identity, ALICE, p.encode(request))]


def test_restart_delay_is_zero_first_then_doubles_up_to_the_cap():
    assert [restart_delay(streak) for streak in range(0, 10)] == [
        0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX_S, BACKOFF_MAX_S
    ]
    assert restart_delay(1000) == BACKOFF_MAX_S


def test_an_actor_dying_young_again_and_again_is_restarted_with_backoff():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), now=0.0)
    actor = "pv:X:a"
    now, delays = 0.0, []
    for incarnation in range(1, 10):
        now = router.actors[actor].started + 1.0  # dies young, before ever being ready
        effects = router.actor_exited(actor, returncode=1, now=now)
        if of_type(effects, SpawnActor):
            assert of_type(effects, SpawnActor) == [spawn(actor, ("X:a",), incarnation)]
            delays.append(0.0)
            continue
        restart_at = router.actors[actor].restart_at
        delays.append(restart_at - now)
        assert actor_tick(router, restart_at - 0.01) == []
        assert actor_tick(router, restart_at) == [spawn(actor, ("X:a",), incarnation)]
        now = restart_at
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert router.actors[actor].restarts == 9


def test_an_actor_killed_for_its_startup_timeout_dies_young():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), now=0.0)
    actor = "pv:X:a"
    assert ACTOR_STARTUP_TIMEOUT > DIES_YOUNG_S  # so only "never ready" makes it young
    (kill,) = actor_tick(router, ACTOR_STARTUP_TIMEOUT + 0.5)
    effects = router.actor_exited(kill.actor, returncode=-9, now=ACTOR_STARTUP_TIMEOUT + 0.6)
    assert of_type(effects, SpawnActor) == [spawn(actor, ("X:a",), 1)]  # the first: at once
    assert router.actors[actor].streak == 1
    start = router.actors[actor].started
    (kill,) = actor_tick(router, start + ACTOR_STARTUP_TIMEOUT + 0.5)
    effects = router.actor_exited(kill.actor, returncode=-9, now=start + ACTOR_STARTUP_TIMEOUT + 0.6)
    assert of_type(effects, SpawnActor) == []
    record = router.actors[actor]
    assert (record.streak, record.restart_at) == (2, start + ACTOR_STARTUP_TIMEOUT + 0.6 + 0.5)


def test_an_actor_that_was_ready_and_lived_long_does_not_die_young():
    router = make_router()
    actor = running(router)  # started at 10.0, ready at 11.0
    effects = router.actor_exited(actor, returncode=1, now=10.0 + DIES_YOUNG_S + 0.1)
    assert of_type(effects, SpawnActor) == [spawn(actor, ("X:a",), 1)]
    assert router.actors[actor].streak == 0


def test_living_longer_than_dies_young_resets_the_streak():
    router = make_router()
    actor = running(router)  # started at 10.0
    for now in (11.0, 12.0):
        router.actor_exited(actor, returncode=1, now=now)  # young: at once, then (no spawn) 0.5 s
    actor_tick(router, 12.5)
    assert router.actors[actor].streak == 2 and router.actors[actor].started == 12.5
    ready(router, identity_of(actor, 2), now=13.0)
    later = 12.5 + DIES_YOUNG_S + 1.0
    assert of_type(router.actor_exited(actor, returncode=1, now=later), SpawnActor)
    assert router.actors[actor].streak == 0
    # The next young death is again the first of a streak: restarted at once.
    assert of_type(router.actor_exited(actor, returncode=1, now=later + 1.0), SpawnActor)
    assert of_type(router.actor_exited(actor, returncode=1, now=later + 2.0), SpawnActor) == []
    assert router.actors[actor].restart_at == later + 2.5


def test_a_due_restart_is_carried_out_by_tick_once():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)
    record = router.actors[actor]
    assert (record.alive, record.restart_at) == (False, 12.0)
    assert actor_tick(router, 11.9) == []
    assert actor_tick(router, 12.0) == [spawn(actor, ("X:a",), 2)]
    assert (record.alive, record.restart_at, record.started) == (True, None, 12.0)
    assert actor_tick(router, 12.3) == []


def test_requests_waiting_for_a_backoff_restart_are_forwarded_after_it():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)  # restart at 12.0
    request = p.SetRequest(id=3, pv="X:a", value=2.0)
    assert send(router, request, now=11.6) == []
    assert router.puts_in_flight() == 1  # a queued put counts: it is owed an answer
    actor_tick(router, 12.0)
    assert ready(router, f"{actor} 2", now=12.5) == [adopt(f"{actor} 2", "X:a"), ToActor(f"{actor} 2", ALICE, p.encode(request))]
    assert router.puts_in_flight() == 1


def test_messages_from_a_dead_actor_awaiting_its_restart_are_ignored():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    send(router, p.ReadRequest(id=1, pv="X:a"), now=11.2)
    ready(router, f"{actor} 1", now=11.3)
    router.actor_exited(actor, returncode=1, now=11.5)  # dead until 12.0
    late = p.Snapshot(id=1, pv="X:a", epoch=1, seq=1, connected=True)
    assert from_actor(router, f"{actor} 1", ALICE, late, now=11.6) == []
    assert router.actor_message(f"{actor} 1", b"", p.Heartbeat(sender=actor), now=11.7) == []
    assert ready(router, f"{actor} 1", now=11.8) == []
    assert ready(router, f"{actor} 2", now=11.9) == []  # not even started yet
    record = router.actors[actor]
    assert (record.ready, record.last_seen) == (False, 11.3)


def test_a_late_reply_from_the_dead_incarnation_is_not_forwarded_after_an_immediate_restart():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"))
    assert replies(router.actor_exited(actor, returncode=1, now=13.0))[(ALICE, 1)].code == "actor_died"
    late = p.Snapshot(id=1, pv="X:a", epoch=1, seq=1, connected=True)
    assert from_actor(router, actor, ALICE, late, now=13.1) == []
    assert router.actor_message(actor, b"", p.Heartbeat(sender=actor), now=13.2) == []
    assert router.actors[actor].last_seen == 13.0


def test_a_late_actor_ready_from_the_dead_incarnation_does_not_make_the_new_one_ready():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), now=0.0)
    router.actor_exited("pv:X:a", returncode=1, now=1.0)  # restarted at once, pid unknown yet
    second = p.ReadRequest(id=2, pv="X:a")
    send(router, second, now=1.1)
    assert ready(router, "pv:X:a", pid=4321, now=1.2) == []  # sent by the process that died at 1.0
    assert router.actors["pv:X:a"].ready is False
    # The new process's own ActorReady is the one that counts.
    assert ready(router, "pv:X:a 1", pid=5555, now=1.3) == [adopt("pv:X:a 1", "X:a"), ToActor("pv:X:a 1", ALICE, p.encode(second))]
    assert (router.actors["pv:X:a"].ready, router.actors["pv:X:a"].pid) == (True, 5555)


def test_an_older_incarnations_messages_are_ignored_after_several_restarts():
    router = make_router()
    actor = running(router)
    for now in (13.0, 14.0):
        router.actor_exited(actor, returncode=1, now=now)
    actor_tick(router, 14.5)  # incarnation 2
    ready(router, f"{actor} 2", now=15.0)
    assert router.actors[actor].ready is True
    for stale in (actor, f"{actor} 1", f"{actor} 3"):
        assert router.actor_message(stale, b"", p.Heartbeat(sender=stale), now=16.0) == []
    assert router.actors[actor].last_seen == 15.0


def test_an_actor_that_is_dead_exits_only_once():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    send(router, p.ReadRequest(id=1, pv="X:a"), now=11.1)
    assert len(replies(router.actor_exited(actor, returncode=1, now=11.5))) == 1  # backoff wait
    assert router.actor_exited(actor, returncode=1, now=11.6) == []
    assert router.actor_exited("pv:never-started", returncode=1, now=11.6) == []


# --- hung actors (Paranoid Pirate) ------------------------------------------------------------


def test_a_ready_actor_silent_too_long_is_killed_exactly_once():
    router = make_router()
    actor = running(router)  # last heard at 12.0
    assert actor_tick(router, 12.0 + ACTOR_TIMEOUT) == []
    (kill,) = actor_tick(router, 12.0 + ACTOR_TIMEOUT + 0.1)
    assert isinstance(kill, KillActor) and kill.actor == actor
    assert "heartbeat" in kill.reason
    assert actor_tick(router, 12.0 + ACTOR_TIMEOUT + 5.0) == []
    assert actor_tick(router, 200.0) == []


def test_heartbeats_keep_a_ready_actor_alive():
    router = make_router()
    actor = running(router)
    now = 12.0
    while now < 100.0:
        now += ACTOR_TIMEOUT * 0.9
        assert router.actor_message(actor, b"", p.Heartbeat(sender=actor), now) == []
        assert actor_tick(router, now + ACTOR_TIMEOUT * 0.5) == []


def test_any_message_from_an_actor_refreshes_it():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"), now=13.0)
    from_actor(router, actor, ALICE, p.Snapshot(id=1, pv="X:a", epoch=1, seq=1, connected=True), now=14.0)
    assert router.actors[actor].last_seen == 14.0
    assert actor_tick(router, 14.0 + ACTOR_TIMEOUT) == []


def test_an_actor_not_ready_after_its_startup_timeout_is_killed_exactly_once():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), now=0.0)
    router.actor_message("pv:X:a", b"", p.Heartbeat(sender="pv:X:a"), now=ACTOR_STARTUP_TIMEOUT - 1)
    assert actor_tick(router, ACTOR_STARTUP_TIMEOUT) == []
    (kill,) = actor_tick(router, ACTOR_STARTUP_TIMEOUT + 0.5)
    assert kill.actor == "pv:X:a" and "not ready" in kill.reason
    assert actor_tick(router, ACTOR_STARTUP_TIMEOUT + 10.0) == []


def test_a_killed_actor_that_exits_is_answered_for_and_restarted():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=4, pv="X:a", value=1.0), now=12.0)
    kill_at = 12.0 + ACTOR_TIMEOUT + 0.1
    assert actor_tick(router, kill_at) == [KillActor(actor, f"no heartbeat for {kill_at - 12.0:.1f} s")]
    effects = router.actor_exited(actor, returncode=-9, now=kill_at + 0.2)
    assert replies(effects)[(ALICE, 4)].code == "actor_died"
    assert of_type(effects, SpawnActor) == [spawn(actor, ("X:a",), 1)]  # it had lived long
    record = router.actors[actor]
    assert (record.killing, record.restarts, record.last_seen) == (False, 1, kill_at + 0.2)
    # The new incarnation is watched like the first one: a hang in start-up is killed again.
    assert actor_tick(router, kill_at + 0.2 + ACTOR_STARTUP_TIMEOUT + 1.0) == [
        KillActor(actor, f"not ready {ACTOR_STARTUP_TIMEOUT:.0f} s after its start")
    ]


def test_a_dead_actor_awaiting_its_restart_is_not_killed():
    router = make_router(limits=Limits(release_unconnected_s=0))  # its PV never connects: kept
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)
    router.actors[actor].restart_at = 500.0  # a long backoff
    assert actor_tick(router, 400.0) == []


# --- the daemon's own stalls ------------------------------------------------------------------


def test_a_stall_of_the_daemon_is_not_taken_for_silence_of_its_actors_and_clients():
    router = make_router()
    actor = running(router)
    send(router, p.HelloRequest(id=1, client="me"), now=12.0)
    assert actor_tick(router, 12.4) == []
    # The daemon stops for 10 s; its peers' heartbeats wait in its sockets meanwhile.
    assert router.tick(22.4) == [Stalled(pytest.approx(10.0))]
    # It listens a full timeout before it judges anyone again.
    assert ticking(router, 22.4 + min(ACTOR_TIMEOUT, CLIENT_TIMEOUT)) == []
    router.actor_message(actor, b"", p.Heartbeat(sender=actor), now=23.0)
    send(router, p.PingRequest(id=2), now=23.0)
    assert ticking(router, 23.0 + ACTOR_TIMEOUT) == []
    assert [c["name"] for c in router.status(25.0)["clients"]] == ["me"]


def test_after_a_stall_a_peer_still_silent_is_judged_one_timeout_later():
    router = make_router()
    actor = running(router)
    send(router, p.HelloRequest(id=1, client="me"), now=12.0)
    actor_tick(router, 12.4)
    assert of_type(router.tick(22.4), Stalled)
    effects = ticking(router, 22.4 + max(ACTOR_TIMEOUT, CLIENT_TIMEOUT) + TICK_S)
    assert [e.actor for e in of_type(effects, KillActor)] == [actor]
    assert [e.name for e in of_type(effects, ClientForgotten)] == ["me"]


def test_a_gap_between_ticks_up_to_the_stall_limit_is_no_stall():
    router = make_router()
    running(router)
    actor_tick(router, 12.0)
    assert ticking(router, 12.0 + STALL_S) == []
    (stalled,) = router.tick(12.0 + 2 * STALL_S + 0.01)
    assert stalled == Stalled(pytest.approx(STALL_S + 0.01))


# --- clients --------------------------------------------------------------------------------


def test_a_silent_client_is_forgotten_once():
    router = make_router()
    send(router, p.HelloRequest(id=1, client="me"), now=10.0)
    assert ticking(router, 10.0 + CLIENT_TIMEOUT) == []
    (forgotten,) = ticking(router, 10.0 + CLIENT_TIMEOUT + 0.5)  # at the first tick past the timeout
    assert (forgotten.client, forgotten.name) == (ALICE, "me")
    assert CLIENT_TIMEOUT < forgotten.idle <= CLIENT_TIMEOUT + TICK_S
    assert router.status(20.0)["clients"] == []
    assert ticking(router, 100.0) == []


def test_any_client_message_keeps_it_remembered():
    router = make_router()
    send(router, p.HelloRequest(id=1, client="me"), now=0.0)
    messages = [p.PingRequest(id=2), p.ReadRequest(id=3, pv="X:a"), p.StatusRequest(id=4), p.Pong(id=5)]
    now = 0.0
    for message in messages * 3:  # even one that is refused
        now += CLIENT_TIMEOUT * 0.9
        send(router, message, now=now)
        assert of_type(ticking(router, now + CLIENT_TIMEOUT * 0.5), ClientForgotten) == []
    assert [c["name"] for c in router.status(now)["clients"]] == ["me"]


def test_a_forgotten_client_that_speaks_again_is_known_anew():
    router = make_router()
    send(router, p.HelloRequest(id=1, client="me"), now=0.0)
    ticking(router, CLIENT_TIMEOUT + 1.0)
    send(router, p.PingRequest(id=2, pvs=["X:a"]), now=1.0)
    ticking(router, CLIENT_TIMEOUT + 2.0)
    # It does not know what the client follows any more, and asks.
    assert send(router, p.PingRequest(id=3), now=50.0) == [ToClient(ALICE, p.Pong(id=3, pvs_wanted=True))]
    (client,) = router.status(50.0)["clients"]
    assert (client["name"], client["requests"], client["pvs"]) == ("", 1, 0)


def test_client_gone_forgets_it_without_an_effect():
    router = make_router()
    send(router, p.HelloRequest(id=1, client="me"))
    router.client_gone(ALICE)
    router.client_gone(BOB)
    assert router.status(10.0)["clients"] == []


# --- stopping -------------------------------------------------------------------------------


def test_begin_stop_announces_it_on_the_hub_topic():
    router = make_router()
    (effect,) = router.begin_stop()
    assert isinstance(effect, Announce) and effect.topic == p.HUB_TOPIC
    assert isinstance(effect.message, p.HubStopping) and effect.message.reason
    assert router.stopping is True


def test_while_stopping_new_puts_are_refused_and_reads_still_routed():
    router = make_router()
    actor = running(router)
    router.begin_stop()
    error = only_error(send(router, p.SetRequest(id=5, pv="X:a", value=1.0)))
    assert (error.code, error.id, error.pv) == ("hub_unavailable", 5, "X:a")
    read = p.ReadRequest(id=6, pv="X:a")
    assert send(router, read) == [ToActor(actor, ALICE, p.encode(read))]
    describe = p.DescribeRequest(id=7, pv="X:a")
    assert send(router, describe) == [ToActor(actor, ALICE, p.encode(describe))]
    assert router.puts_in_flight() == 0


def test_puts_in_flight_counts_sets_until_their_final_reply():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=1, pv="X:a", value=1.0), client=ALICE)
    send(router, p.SetRequest(id=1, pv="X:a", value=2.0), client=BOB)
    send(router, p.ReadRequest(id=2, pv="X:a"), client=ALICE)
    router.begin_stop()
    assert router.puts_in_flight() == 2
    from_actor(router, actor, ALICE, p.SetAccepted(id=1, pv="X:a"))
    assert router.puts_in_flight() == 2
    from_actor(router, actor, ALICE, p.SetDone(id=1, pv="X:a"))
    assert router.puts_in_flight() == 1
    from_actor(router, actor, BOB, p.ErrorReply(id=1, code="put_failed", message="no", pv="X:a"))
    assert router.puts_in_flight() == 0


def test_while_stopping_a_dead_actor_is_answered_for_but_not_restarted():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=1, pv="X:a", value=1.0))
    router.begin_stop()
    effects = router.actor_exited(actor, returncode=-15, now=13.0)
    assert replies(effects)[(ALICE, 1)].code == "actor_died"
    assert of_type(effects, Announce) and of_type(effects, SpawnActor) == []
    record = router.actors[actor]
    assert (record.alive, record.restart_at) == (False, None)
    assert router.puts_in_flight() == 0
    assert actor_tick(router, 100.0) == []


def test_while_stopping_a_due_backoff_restart_is_not_carried_out():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)  # restart due at 12.0
    router.begin_stop()
    assert actor_tick(router, 12.0) == []
    assert router.actors[actor].alive is False


def test_while_stopping_a_read_for_a_dead_actors_pv_is_answered():
    router = make_router()
    actor = running(router)
    router.begin_stop()
    router.actor_exited(actor, returncode=1, now=13.0)
    error = only_error(send(router, p.ReadRequest(id=9, pv="X:a"), now=14.0))
    assert (error.code, error.id, error.pv) == ("hub_unavailable", 9, "X:a")
    assert router.actors[actor].queued == []


def _no_actor(router: Router) -> None:
    pass


def _starting(router: Router) -> None:
    send(router, p.ReadRequest(id=1, pv="X:a"), now=10.0)


def _restarting(router: Router) -> None:
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)  # restarted at once, not ready yet


def _awaiting_backoff(router: Router) -> None:
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)  # restart due at 12.0


@pytest.mark.parametrize("state", [_no_actor, _starting, _restarting, _awaiting_backoff],
                         ids=["no-actor", "starting", "restarting", "awaiting-backoff"])
@pytest.mark.parametrize("request_", [p.ReadRequest(id=9, pv="X:a"), p.DescribeRequest(id=9, pv="X:a"),
                                      p.SetRequest(id=9, pv="X:a", value=1.0)],
                         ids=["read", "describe", "set"])
def test_while_stopping_a_request_for_an_actor_not_ready_is_refused_at_once(state, request_):
    router = make_router()
    state(router)
    actors = {name: (r.restarts, r.alive) for name, r in router.actors.items()}
    queued = router.actors["pv:X:a"].queued[:] if router.actors else []
    router.begin_stop()
    error = only_error(send(router, request_, now=11.8))
    assert (error.code, error.id, error.pv) == ("hub_unavailable", 9, "X:a")
    assert "not sent" in error.message
    # Nothing is started, restarted or queued for it.
    assert {name: (r.restarts, r.alive) for name, r in router.actors.items()} == actors
    assert (router.actors["pv:X:a"].queued if router.actors else []) == queued


def test_puts_in_flight_counts_queued_sets():
    router = make_router()
    send(router, p.SetRequest(id=1, pv="X:a", value=1.0), client=ALICE, now=0.0)
    send(router, p.ReadRequest(id=2, pv="X:a"), client=ALICE, now=0.0)
    send(router, p.SetRequest(id=3, pv="X:a", value=2.0), client=BOB, now=0.0)
    assert router.puts_in_flight() == 2
    ready(router, "pv:X:a", now=1.0)  # queued -> in flight: still counted, once
    assert router.puts_in_flight() == 2
    router.actor_exited("pv:X:a", returncode=1, now=2.0)
    assert router.puts_in_flight() == 0


def test_finish_answers_everything_queued_or_in_flight_for_every_actor():
    router = make_router()
    running(router, "X:a")
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0), client=BOB)
    send(router, p.ReadRequest(id=3, pv="X:b"), client=ALICE)  # X:b's actor is still starting
    send(router, p.SetRequest(id=4, pv="X:b", value=1.0), client=BOB)
    router.begin_stop()
    answered = replies(router.finish("the daemon stopped"))
    assert {key: m.code for key, m in answered.items()} == {
        (ALICE, 1): "actor_died",
        (BOB, 2): "actor_died",
        (ALICE, 3): "hub_unavailable",
        (BOB, 4): "hub_unavailable",
    }
    assert all("the daemon stopped" in m.message for m in answered.values())
    assert "outcome is unknown" in answered[(BOB, 2)].message
    assert "outcome is unknown" not in answered[(ALICE, 1)].message
    assert all("not sent" in answered[key].message for key in ((ALICE, 3), (BOB, 4)))
    assert router.puts_in_flight() == 0
    assert [inflight(router, actor) for actor in ("pv:X:a", "pv:X:b")] == [0, 0]
    assert router.actors["pv:X:b"].queued == []
    assert router.finish("the daemon stopped") == []  # each request is answered once


def test_finish_does_not_answer_again_what_a_dead_actor_was_answered_for():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=1, pv="X:a", value=1.0))
    router.begin_stop()
    assert (ALICE, 1) in replies(router.actor_exited(actor, returncode=-15, now=13.0))
    assert router.finish("the daemon stopped") == []


def test_finish_with_nothing_owed_says_nothing():
    router = make_router(start=("X:a",))
    router.initial_actors(now=0.0)
    assert router.finish("the daemon stopped") == []


def test_a_set_queued_for_an_actor_that_will_not_be_restarted_does_not_hold_up_the_stop():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=1, now=11.0)
    router.actor_exited(actor, returncode=1, now=11.5)  # restart due at 12.0
    send(router, p.SetRequest(id=3, pv="X:a", value=2.0), now=11.6)
    effects = router.begin_stop() + actor_tick(router, 12.0)
    assert router.puts_in_flight() == 0
    assert replies(effects)[(ALICE, 3)].code == "hub_unavailable"


# --- op_of ----------------------------------------------------------------------------------


def test_op_of_names_a_request_in_flight_until_its_final_reply():
    router = make_router()
    actor = running(router)
    send(router, p.SetRequest(id=1, pv="X:a", value=1.0))
    send(router, p.DescribeRequest(id=2, pv="X:a"))
    assert router.op_of(actor, ALICE, 1) == "set"
    assert router.op_of(actor, ALICE, 2) == "describe"
    assert router.op_of(actor, BOB, 1) is None
    assert router.op_of("pv:nobody", ALICE, 1) is None
    from_actor(router, actor, ALICE, p.SetDone(id=1, pv="X:a"))
    assert router.op_of(actor, ALICE, 1) is None


# --- status of PVs --------------------------------------------------------------------------


def pv_status(router: Router, pv: str, now: float) -> dict:
    (entry,) = [e for e in router.status(now)["pvs"] if e["pv"] == pv]
    return entry


def heartbeat(router: Router, actor: str, now: float, **stats) -> list:
    return router.actor_message(actor, b"", p.Heartbeat(sender=actor, stats=stats), now)


def test_status_of_a_pv_comes_from_its_actors_heartbeats():
    router = make_router()
    actor = running(router)
    heartbeat(router, actor, 20.0, **{"X:a": {"connected": True, "updates": 10, "last_update": 19.5}})
    assert pv_status(router, "X:a", 20.0) == {
        "pv": "X:a",
        "actor": actor,
        "pid": 4321,
        "connected": True,
        "updates": 10,
        "rate": 0.0,
        "last_update": 19.5,
        "subscribers": 0,
        "restarts": 0,
        "quarantined": False,
    }


def test_a_pvs_rate_is_measured_over_at_least_a_second():
    router = make_router()
    actor = running(router)
    heartbeat(router, actor, 20.0, **{"X:a": {"connected": True, "updates": 10}})
    heartbeat(router, actor, 20.5, **{"X:a": {"connected": True, "updates": 15}})
    entry = pv_status(router, "X:a", 20.5)
    assert (entry["updates"], entry["rate"]) == (15, 0.0)  # half a second: not measured yet
    heartbeat(router, actor, 22.0, **{"X:a": {"connected": True, "updates": 40}})
    assert pv_status(router, "X:a", 22.0)["rate"] == 15.0  # (40 - 10) / 2 s
    heartbeat(router, actor, 23.0, **{"X:a": {"connected": True, "updates": 40}})
    assert pv_status(router, "X:a", 23.0)["rate"] == 0.0


def test_a_busy_pvs_rate_holds_between_its_counts_two_seconds_apart():
    # Actors send a busy PV's count every ACTOR_STATS_INTERVAL_S, at their next heartbeat.
    router = make_router()
    actor = running(router)
    step = p.ACTOR_STATS_INTERVAL_S + p.ACTOR_HEARTBEAT_S
    heartbeat(router, actor, 20.0, **{"X:a": {"connected": True, "updates": 0}})
    heartbeat(router, actor, 20.0 + step, **{"X:a": {"connected": True, "updates": int(100 * step)}})
    for later in (0.0, 1.0, step - 0.01):  # until the next count: the rate it measured
        assert pv_status(router, "X:a", 20.0 + step + later)["rate"] == 100.0
    assert pv_status(router, "X:a", 20.0 + step + 10.0)["rate"] == 0.0  # none came: it stopped


def test_a_pv_is_not_connected_while_its_actor_is_not_ready():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), now=0.0)
    heartbeat(router, "pv:X:a", 1.0, **{"X:a": {"connected": True, "updates": 3}})
    assert pv_status(router, "X:a", 1.0)["connected"] is False


def test_a_dead_actors_pvs_show_disconnected_with_their_restarts():
    router = make_router()
    actor = running(router)
    heartbeat(router, actor, 20.0, **{"X:a": {"connected": True, "updates": 10, "last_update": 19.5}})
    router.actor_exited(actor, returncode=1, now=21.0)
    entry = pv_status(router, "X:a", 21.0)
    assert (entry["connected"], entry["updates"], entry["rate"], entry["last_update"]) == (False, 0, 0.0, None)
    assert (entry["pid"], entry["restarts"]) == (None, 1)
    (actor_entry,) = router.status(21.0)["actors"]
    assert actor_entry["restarts"] == 1 and actor_entry["age"] == 0.0


def test_subscribers_of_a_pv_come_from_clients_pings():
    router = make_router()
    running(router, "X:a")
    running(router, "X:b")
    send(router, p.PingRequest(id=1, pvs=["X:a", "X:b"]), client=ALICE)
    send(router, p.PingRequest(id=1, pvs=["X:a"]), client=BOB)
    assert [pv_status(router, pv, 20.0)["subscribers"] for pv in ("X:a", "X:b")] == [2, 1]
    send(router, p.PingRequest(id=2, pvs=None), client=BOB)  # unchanged
    assert pv_status(router, "X:a", 20.0)["subscribers"] == 2
    send(router, p.PingRequest(id=3, pvs=[]), client=ALICE)
    assert [pv_status(router, pv, 20.0)["subscribers"] for pv in ("X:a", "X:b")] == [1, 0]
    clients = {c["client"]: c["pvs"] for c in router.status(20.0)["clients"]}
    assert clients == {ALICE.hex(): 0, BOB.hex(): 1}
