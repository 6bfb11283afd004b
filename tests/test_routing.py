"""The broker's rules (``pvhub.daemon.routing``): who owns a PV, what each message becomes, and
what happens to requests when an actor dies. No sockets: messages in, effects out.
"""

from __future__ import annotations

import pytest

from pvhub import __version__
from pvhub import protocol as p
from pvhub.config import Config
from pvhub.daemon.routing import Router, SpawnActor, ToActor, ToClient

READINGS = "tcp://127.0.0.1:5571"
ALICE = b"\x00alice"
BOB = b"\x00bob"


def make_router(**config) -> Router:
    return Router(Config(**config), READINGS)


def send(router: Router, message: p.Message, client: bytes = ALICE, now: float = 10.0):
    """A client's message as the broker hands it over: decoded, with its raw bytes."""
    return router.client_message(client, message, p.encode(message), now)


def ready(router: Router, actor: str, pid: int = 4321, now: float = 11.0):
    return router.actor_message(actor, b"", p.ActorReady(actor=actor, pid=pid), now)


def from_actor(router: Router, actor: str, client: bytes, message: p.Message, now: float = 12.0):
    return router.actor_message(actor, client, message, now)


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
    actor = router.owner[pv]
    ready(router, actor)
    from_actor(router, actor, ALICE, p.DescribeReply(id=999, pv=pv, connected=True))
    assert inflight(router, actor) == 0
    return actor


# --- the daemon's own requests ---------------------------------------------------------------


def test_hello_replies_the_readings_endpoint_version_and_client_identity():
    router = make_router()
    effects = send(router, p.HelloRequest(id=1, client="bluesky@host:42"))
    assert effects == [
        ToClient(
            ALICE,
            p.HelloReply(id=1, readings=READINGS, server_version=__version__, client=ALICE),
        )
    ]
    (client,) = router.status(10.0)["clients"]
    assert client["name"] == "bluesky@host:42"
    assert client["client"] == ALICE.hex()


def test_ping_gets_pong():
    assert send(make_router(), p.PingRequest(id=77)) == [ToClient(ALICE, p.Pong(id=77))]


def test_status_describes_actors_and_clients():
    router = make_router(start=("X:a",))
    router.initial_actors(now=100.0)
    send(router, p.HelloRequest(id=1, client="me"), now=101.0)
    (effect,) = send(router, p.StatusRequest(id=2), now=105.0)
    assert isinstance(effect.message, p.StatusReply) and effect.message.id == 2
    status = effect.message.status
    assert status["version"] == __version__
    assert status["readings"] == READINGS
    assert status["uptime"] == pytest.approx(5.0)
    assert status["actors"] == [
        {"actor": "pv:X:a", "pvs": ["X:a"], "pid": None, "ready": False, "inflight": 0, "age": 5.0}
    ]
    assert status["clients"] == [
        {"client": ALICE.hex(), "name": "me", "requests": 2, "idle": 0.0}
    ]


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
    assert effects == [SpawnActor("pv:X:a", ("X:a",))]
    assert router.owner == {"X:a": "pv:X:a"}


def test_queued_requests_are_forwarded_untouched_once_the_actor_is_ready():
    router = make_router()
    first = p.ReadRequest(id=1, pv="X:a", publish=True)
    second = p.SetRequest(id=2, pv="X:a", value=[1.5, 2.5])
    send(router, first, client=ALICE)
    assert send(router, second, client=BOB) == []  # no second spawn, still queued
    effects = ready(router, "pv:X:a")
    assert effects == [
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
    assert send(router, p.ReadRequest(id=1, pv="X:a")) == [SpawnActor("pv:X:a", ("X:a",))]
    assert send(router, p.ReadRequest(id=2, pv="X:b")) == [SpawnActor("pv:X:b", ("X:b",))]
    assert set(router.actors) == {"pv:X:a", "pv:X:b"}


def test_pvs_of_a_group_share_the_group_actor():
    router = make_router(groups={"motors": ("M:1", "M:2")})
    assert send(router, p.ReadRequest(id=1, pv="M:2")) == [
        SpawnActor("group:motors", ("M:1", "M:2"))
    ]
    assert send(router, p.ReadRequest(id=2, pv="M:1")) == []
    assert router.owner == {"M:1": "group:motors", "M:2": "group:motors"}
    effects = ready(router, "group:motors")
    assert [e.actor for e in effects] == ["group:motors", "group:motors"]


def test_initial_actors_start_groups_and_start_pvs_once_each():
    router = make_router(start=("X:a", "M:1"), groups={"motors": ("M:1", "M:2")})
    effects = router.initial_actors(now=1.0)
    assert sorted(effects, key=lambda e: e.actor) == [
        SpawnActor("group:motors", ("M:1", "M:2")),
        SpawnActor("pv:X:a", ("X:a",)),
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
    assert send(router, p.ReadRequest(id=4, pv="IOC:x")) == [SpawnActor("pv:IOC:x", ("IOC:x",))]


@pytest.mark.parametrize(
    "pv",
    ["has space", "", "x" * 257, "tab\there", "caf\u00e9", "nul\0"],
    ids=["space", "empty", "too-long", "tab", "non-ascii", "nul"],
)
def test_an_invalid_pv_name_is_refused(pv):
    router = make_router()
    error = only_error(send(router, p.ReadRequest(id=8, pv=pv)))
    assert error.id == 8
    assert error.code == "pv_not_allowed"
    assert router.actors == {}


def test_a_pv_name_of_256_characters_is_accepted():
    pv = "x" * 256
    assert send(make_router(), p.ReadRequest(id=1, pv=pv)) == [SpawnActor(f"pv:{pv}", (pv,))]


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


# --- actors that die ----------------------------------------------------------------------------


def test_an_actor_that_dies_fails_every_request_in_flight():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0), client=BOB)
    effects = router.actor_exited(actor, returncode=-9)
    answered = {(e.client, e.message.id): e.message for e in effects}
    assert set(answered) == {(ALICE, 1), (BOB, 2)}
    assert all(m.code == "actor_died" for m in answered.values())
    assert "-9" in answered[(ALICE, 1)].message
    assert "outcome is unknown" in answered[(BOB, 2)].message
    assert "outcome is unknown" not in answered[(ALICE, 1)].message


def test_an_actor_that_dies_before_ready_fails_every_queued_request():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"), client=ALICE)
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0), client=BOB)
    effects = router.actor_exited("pv:X:a", returncode=1)
    answered = sorted((e.client, e.message.id, e.message.code) for e in effects)
    assert answered == [(ALICE, 1, "actor_died"), (BOB, 2, "actor_died")]


def test_a_set_in_flight_after_being_queued_still_says_its_outcome_is_unknown():
    router = make_router()
    send(router, p.SetRequest(id=2, pv="X:a", value=1.0))
    ready(router, "pv:X:a")
    error = only_error(router.actor_exited("pv:X:a", returncode=1))
    assert error.code == "actor_died"
    assert "outcome is unknown" in error.message


def test_a_read_in_flight_after_being_queued_is_not_told_about_a_put():
    router = make_router()
    send(router, p.ReadRequest(id=1, pv="X:a"))
    ready(router, "pv:X:a")
    error = only_error(router.actor_exited("pv:X:a", returncode=1))
    assert error.code == "actor_died"
    assert "put" not in error.message


def test_after_an_actor_dies_the_next_request_spawns_a_new_one():
    router = make_router()
    actor = running(router)
    router.actor_exited(actor, returncode=0)
    assert router.actors == {} and router.owner == {}
    assert send(router, p.ReadRequest(id=1, pv="X:a")) == [SpawnActor("pv:X:a", ("X:a",))]
    assert router.actors["pv:X:a"].ready is False


def test_after_a_group_actor_dies_any_of_its_pvs_respawns_the_group():
    router = make_router(groups={"motors": ("M:1", "M:2")})
    router.initial_actors(now=0.0)
    router.actor_exited("group:motors", returncode=1)
    assert send(router, p.ReadRequest(id=1, pv="M:2")) == [
        SpawnActor("group:motors", ("M:1", "M:2"))
    ]


def test_messages_from_a_dead_actor_are_ignored():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"))
    router.actor_exited(actor, returncode=1)
    late = p.Snapshot(id=1, pv="X:a", epoch=1, seq=1, connected=True)
    assert from_actor(router, actor, ALICE, late) == []
    assert router.actor_message(actor, b"", p.Heartbeat(sender=actor), now=20.0) == []


def test_an_actor_exits_only_once():
    router = make_router()
    actor = running(router)
    send(router, p.ReadRequest(id=1, pv="X:a"))
    assert len(router.actor_exited(actor, returncode=1)) == 1
    assert router.actor_exited(actor, returncode=1) == []
    assert router.actor_exited("pv:never-started", returncode=1) == []
