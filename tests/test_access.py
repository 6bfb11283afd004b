"""Access rules, limits and the other guards that need no sockets: ``pvhub.access``, the
security parts of ``pvhub.config``, the broker's access rules and limits (``daemon/clients.py``
Rule 2, ``daemon/routing.py`` Rule 6, releases: ``daemon/placement.py`` Rule 5), epochs that
never go back (``pvhub.daemon.supervisor.next_epoch``) and a channel that takes a new daemon's
smaller epoch after it lost the old one.
"""

from __future__ import annotations

import tomllib

import pytest

from pvhub import protocol as p
from pvhub.access import ANONYMOUS, AccessRules, parse_access
from pvhub.client.channel import Channel
from pvhub.config import Config, ConfigError, Limits, exposure_problem, is_local, parse, reloadable
from pvhub.daemon.clients import TokenBucket
from pvhub.daemon.effects import Announce, Release, RetireActor, ToActor, ToClient
from pvhub.daemon.routing import Router
from pvhub.daemon.security import RefusalLog, REFUSALS_PER_WINDOW, REFUSAL_WINDOW_S
from pvhub.daemon.supervisor import next_epoch

READINGS = "tcp://127.0.0.1:5571"
ALICE = b"\x00alice"
BOB = b"\x00bob"

RULES = """
[access]
default = "none"
[access.groups]
operators = ["alice", "bob"]
[[access.rule]]
pvs = ["BL1:mono:*"]
who = ["@operators"]
access = "write"
[[access.rule]]
pvs = ["SR:*"]
who = ["*"]
write = false
[[access.rule]]
pvs = ["SR:*", "BL1:*"]
who = ["*"]
read = true
[[access.rule]]
pvs = ["BL1:shutter"]
who = ["carol"]
write = true
"""


def rules(text: str = RULES) -> AccessRules:
    return parse_access(tomllib.loads(text)["access"])


# --- pvhub.access ---------------------------------------------------------------------------


def test_each_right_is_decided_by_the_first_rule_that_speaks_of_it():
    access = rules()
    assert access.may_write("alice", "BL1:mono:energy") and access.may_read("alice", "BL1:mono:energy")
    assert not access.may_write("carol", "BL1:mono:energy")
    assert access.may_read("carol", "BL1:mono:energy")  # rule 3 (rule 1 is not hers)
    assert not access.may_write("alice", "SR:current") and access.may_read("alice", "SR:current")
    assert access.may_write("carol", "BL1:shutter") and access.may_read("carol", "BL1:shutter")
    assert not access.may_read("mallory", "XF:other") and not access.may_write("mallory", "XF:other")  # default
    assert not access.may_read(ANONYMOUS, "XF:other")


def test_a_write_only_rule_gives_no_read():
    access = rules('[access]\ndefault = "none"\n[[access.rule]]\npvs = ["A:*"]\nwho = ["bob"]\nwrite = true\n')
    assert access.may_write("bob", "A:x") and not access.may_read("bob", "A:x")


def test_no_access_section_lets_everyone_do_everything():
    access = parse_access(None)
    assert access.open and access.may_write("anyone", "X") and access.reads_everything("anyone")


def test_reads_everything_only_when_no_rule_could_deny_a_read():
    assert not rules().reads_everything("alice")  # default none
    access = rules('[access]\ndefault = "read"\n[[access.rule]]\npvs = ["S:*"]\nwho = ["@ops"]\nread = false\n'
                   '[access.groups]\nops = ["bob"]\n')
    assert access.reads_everything("alice") and not access.reads_everything("bob")


def test_decisions_are_cached_and_the_cache_is_bounded(monkeypatch):
    import pvhub.access as access_module

    monkeypatch.setattr(access_module, "CACHE_SIZE", 10)
    access = rules()
    for i in range(100):
        access.may_read("alice", f"BL1:pv{i}")
    assert len(access._cache) == 10
    assert access.may_read("alice", "BL1:pv0")  # recomputed, same answer


@pytest.mark.parametrize(
    "text, says",
    [
        ('[access]\ndefault = "all"\n', "access.default"),
        ('[access]\nfoo = 1\n', "unknown key"),
        ('[[access.rule]]\npvs = ["A"]\nwho = ["@nobody"]\naccess = "read"\n', "does not define"),
        ('[[access.rule]]\npvs = []\nwho = ["*"]\naccess = "read"\n', "pvs"),
        ('[[access.rule]]\npvs = ["A"]\nwho = ["*"]\n', "decides nothing"),
        ('[[access.rule]]\npvs = ["A"]\nwho = ["*"]\naccess = "read"\nwrite = true\n', "give one"),
        ('[[access.rule]]\npvs = ["A"]\nwho = ["*"]\nread = "yes"\n', "true or false"),
        ('[[access.rule]]\npvs = ["A"]\nwho = ["bad name"]\nread = true\n', "not an identity"),
    ],
)
def test_bad_access_sections_are_refused_with_what_is_wrong(text, says):
    with pytest.raises(ConfigError, match=says):
        parse(tomllib.loads(text))


# --- pvhub.config: exposure, security, limits, reload ------------------------------------


def test_only_loopback_and_ipc_count_as_local():
    assert is_local("tcp://127.0.0.1:5570") and is_local("tcp://127.9.9.9:1") and is_local("tcp://[::1]:5")
    assert is_local("tcp://localhost:5") and is_local("ipc:///run/pvhub/requests")
    for exposed in ("tcp://0.0.0.0:5570", "tcp://*:5570", "tcp://eth0:5570", "tcp://10.0.0.5:5570",
                    "tcp://beamline.example:5570", "tcp://[::]:5570"):
        assert not is_local(exposed), exposed


def test_listening_beyond_loopback_needs_curve_or_insecure_said():
    assert exposure_problem(Config(), "tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571") is None
    problem = exposure_problem(Config(), "tcp://0.0.0.0:5570", None)
    assert problem is not None and "insecure = true" in problem and "0.0.0.0" in problem
    assert exposure_problem(Config(), "tcp://127.0.0.1:5570", "tcp://0.0.0.0:5571") is not None
    assert exposure_problem(Config(insecure=True), "tcp://0.0.0.0:5570") is None
    secure = parse({"security": {"server_key": "/k/server.key_secret", "clients": "/k/clients"}})
    assert exposure_problem(secure, "tcp://0.0.0.0:5570") is None


def test_security_and_limits_sections_parse_and_are_checked():
    config = parse({"daemon": {"insecure": True},
                    "security": {"server_key": "/a.key_secret", "clients": "/c"},
                    "limits": {"max_pvs_per_client": 5, "max_request_rate": 2.5, "release_unconnected_s": 0}})
    assert config.insecure and config.security.clients == "/c"
    assert config.limits == Limits(max_pvs_per_client=5, max_request_rate=2.5, release_unconnected_s=0)
    for bad in ({"limits": {"max_pvs": 0}}, {"limits": {"max_pvs": 1.5}}, {"limits": {"nope": 1}},
                {"limits": {"max_pvs": True}}, {"security": {"server_key": "/a"}}, {"daemon": {"insecure": "yes"}},
                {"daemon": {"adress": "tcp://127.0.0.1:1"}}):
        with pytest.raises(ConfigError):
            parse(bad)


def test_a_reload_takes_access_limits_and_clients_and_names_what_needs_a_restart():
    old = parse({"security": {"server_key": "/s", "clients": "/c1"}})
    new = parse({"daemon": {"address": "tcp://127.0.0.1:9"}, "security": {"server_key": "/s", "clients": "/c2"},
                 "access": {"default": "none"}, "limits": {"max_pvs": 7, "max_message_bytes": 10}})
    merged, ignored = reloadable(old, new)
    assert merged.access == new.access and merged.limits.max_pvs == 7
    assert merged.security.clients == "/c2" and merged.address == old.address
    assert merged.limits.max_message_bytes == old.limits.max_message_bytes
    assert set(ignored) == {"address", "limits.max_message_bytes"}


# --- access and limits (clients.py Rule 2, routing.py Rule 6, placement.py Rule 5) ---------


def make_router(**config) -> Router:
    config.setdefault("pool_size", 0)
    return Router(Config(**config), READINGS)


def send(router: Router, message: p.Message, client: bytes = ALICE, now: float = 10.0, identity: str = "alice"):
    return router.client_message(client, message, p.encode(message), now, identity)


def error_of(effects) -> p.ErrorReply | None:
    errors = [e.message for e in effects if isinstance(e, ToClient) and isinstance(e.message, p.ErrorReply)]
    return errors[0] if errors else None


def test_reads_and_sets_are_refused_without_the_right_before_any_actor_sees_them():
    router = make_router(access=rules())
    effects = send(router, p.SetRequest(id=1, pv="SR:current", value=1.0))
    assert error_of(effects).code == "access_denied" and "may not write" in error_of(effects).message
    assert router.pvs == {}  # nothing opened for a refused request
    assert error_of(send(router, p.ReadRequest(id=2, pv="XF:x"), identity="mallory")).code == "access_denied"
    assert error_of(send(router, p.DescribeRequest(id=3, pv="XF:x"), identity="mallory")).code == "access_denied"
    effects = send(router, p.SetRequest(id=4, pv="BL1:mono:energy", value=1.0))
    assert error_of(effects) is None and "BL1:mono:energy" in router.pvs


def test_status_shows_a_restricted_identity_only_what_it_may_read():
    router = make_router(access=rules('[access]\ndefault = "none"\n[[access.rule]]\npvs = ["*"]\nwho = ["alice"]\n'
                                      'access = "write"\n[[access.rule]]\npvs = ["M:*"]\nwho = ["mallory"]\n'
                                      'access = "read"\n'))
    send(router, p.ReadRequest(id=1, pv="A:1"), client=ALICE)
    send(router, p.ReadRequest(id=2, pv="M:1"), client=ALICE)
    send(router, p.HelloRequest(id=3, client="mallory's"), client=BOB, identity="mallory")
    (reply,) = send(router, p.StatusRequest(id=4), client=BOB, identity="mallory")
    status = reply.message.status
    assert [entry["pv"] for entry in status["pvs"]] == ["M:1"] and status["actors"] == []
    assert [c["identity"] for c in status["clients"]] == ["mallory"]


def test_the_request_rate_of_one_client_is_bounded_and_others_go_on():
    router = make_router(limits=Limits(max_request_rate=5))
    codes = [getattr(error_of(send(router, p.ReadRequest(id=i, pv="X:a"), now=10.0)), "code", None)
             for i in range(8)]
    assert codes == [None] * 5 + ["limit"] * 3
    assert error_of(send(router, p.ReadRequest(id=9, pv="X:a"), client=BOB, now=10.0)) is None
    assert error_of(send(router, p.ReadRequest(id=10, pv="X:a"), now=10.5)) is None  # refilled


def test_token_bucket_refills_at_its_rate_up_to_one_seconds_worth():
    bucket = TokenBucket(2.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]


def test_requests_in_flight_per_client_are_bounded_and_freed_by_their_replies():
    router = make_router(limits=Limits(max_requests_in_flight=2))
    send(router, p.ReadRequest(id=1, pv="X:a"))
    send(router, p.ReadRequest(id=2, pv="X:a"))
    assert error_of(send(router, p.ReadRequest(id=3, pv="X:a"))).code == "limit"
    assert error_of(send(router, p.ReadRequest(id=4, pv="X:a"), client=BOB)) is None
    actor = router.pvs["X:a"].actor
    router.actor_message(actor, b"", p.ActorReady(actor=actor, pid=1), 11.0)
    router.actor_message(actor, ALICE, p.ErrorReply(id=1, code="disconnected", message="x"), 11.0)
    assert error_of(send(router, p.ReadRequest(id=5, pv="X:a"), now=11.0)) is None
    assert router.clients[ALICE].inflight == 2
    router.actor_exited(actor, 1, now=12.0)  # its death answers both
    assert router.clients[ALICE].inflight == 0


def test_pvs_per_client_and_per_daemon_are_bounded():
    router = make_router(limits=Limits(max_pvs_per_client=2, max_pvs=3))
    for i, pv in enumerate(("A:1", "A:2", "A:1")):
        assert error_of(send(router, p.ReadRequest(id=i, pv=pv))) is None
    refused = error_of(send(router, p.ReadRequest(id=9, pv="A:3")))
    assert refused.code == "limit" and "A:3" in refused.message
    assert error_of(send(router, p.ReadRequest(id=10, pv="A:3"), client=BOB)) is None
    refused = error_of(send(router, p.ReadRequest(id=11, pv="A:4"), client=BOB))
    assert refused.code == "limit" and "the daemon holds 3 PVs" in refused.message


def test_a_pv_that_never_connects_is_released_and_its_subscribers_told():
    router = make_router(limits=Limits(release_unconnected_s=30), start=("K:kept",))
    router.initial_actors(0.0)
    send(router, p.ReadRequest(id=1, pv="N:none"), now=10.0)
    send(router, p.ReadRequest(id=2, pv="C:conn"), now=10.0)
    for pv in ("N:none", "C:conn", "K:kept"):
        actor = router.pvs[pv].actor
        router.actor_message(actor, b"", p.ActorReady(actor=actor, pid=1, pvs=[pv]), 10.5)
    conn = router.pvs["C:conn"].actor
    router.actor_message(conn, b"", p.Heartbeat(stats={"C:conn": {"connected": True, "updates": 1}}), 11.0)
    router.actor_message(conn, b"", p.Heartbeat(stats={"C:conn": {"connected": False, "updates": 1}}), 12.0)
    assert not [e for e in router.tick(39.0) if isinstance(e, Release)]
    none_actor = router.pvs["N:none"].actor
    effects = router.tick(40.5)
    # Its process held nothing else: it is stopped for good rather than told to let go.
    assert [e.actor for e in effects if isinstance(e, RetireActor)] == [none_actor]
    assert not [e for e in effects if isinstance(e, Release)]
    (lost,) = [e for e in effects if isinstance(e, Announce)]
    assert lost.topic == p.topic("N:none") and "released" in lost.message.reason
    assert "N:none" not in router.pvs and "C:conn" in router.pvs and "K:kept" in router.pvs
    # Asked for again: adopted again, and searched for another 30 s.
    effects = send(router, p.ReadRequest(id=3, pv="N:none"), now=50.0)
    assert any(isinstance(e, ToActor) for e in effects) or router.actors[router.pvs["N:none"].actor].queued


def test_a_reply_the_broker_could_not_queue_is_named_in_the_next_pong():
    router = make_router()
    send(router, p.PingRequest(id=1, pvs=[]))
    router.reply_lost(ALICE, 42)
    (pong,) = send(router, p.PingRequest(id=2))
    assert pong.message.lost == [42]
    (pong,) = send(router, p.PingRequest(id=3))
    assert pong.message.lost is None


def test_a_new_identity_on_a_known_routing_id_is_a_new_client():
    router = make_router(limits=Limits(max_pvs_per_client=1))
    send(router, p.ReadRequest(id=1, pv="A:1"), identity="alice")
    assert error_of(send(router, p.ReadRequest(id=2, pv="A:2"), identity="bob")) is None
    assert router.clients[ALICE].identity == "bob"


# --- epochs, refusals ------------------------------------------------------------------------


def test_epochs_grow_even_when_the_wall_clock_goes_back():
    first = next_epoch(0, 2_000)
    second = next_epoch(first, 1_000)  # the clock was stepped back
    assert second > first
    assert next_epoch(second, 5_000) == 5_000


def test_a_channel_that_lost_its_daemon_takes_the_next_ones_smaller_epoch():
    class Hub:
        def resync(self, channel):
            pass

    channel = Channel(Hub(), "X:a")
    reading = p.Reading(value=1.0, timestamp=1.0)
    channel.apply(2_000, 5, True, reading, {}, from_stream=False)
    channel.apply(1_000, 1, True, p.Reading(value=9.0, timestamp=2.0), {}, from_stream=False)
    assert channel.reading.value == 1.0  # a smaller epoch is a dead actor's late word...
    channel.lose("the daemon went away", daemon_lost=True)
    channel.apply(1_000, 1, True, p.Reading(value=9.0, timestamp=2.0), {}, from_stream=False)
    assert channel.reading.value == 9.0 and channel.connected  # ...unless the daemon itself is new


def test_refusals_are_logged_at_a_bounded_rate_and_counted():
    now = [0.0]
    refusals = RefusalLog(clock=lambda: now[0])
    logged = [refusals.refused_connection("unknown_key", address="127.0.0.1") for _ in range(50)]
    assert sum(logged) == REFUSALS_PER_WINDOW and refusals.refused == 50
    now[0] = REFUSAL_WINDOW_S + 0.1
    assert refusals.refused_connection("unknown_key", address="127.0.0.1")
    assert refusals.refused_connection("handshake")  # each kind has its own budget


def test_equal_rules_compare_equal_whatever_each_has_cached():
    used, fresh = rules(), rules()
    used.may_read("alice", "BL1:mono:energy")
    assert used == fresh and used != parse_access(None)


def test_a_failed_handshake_is_named():
    from pvhub.daemon.security import handshake_error
    import zmq

    assert "wrong server key" in handshake_error(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
    assert "without CURVE" in handshake_error(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
    assert handshake_error(0x7) == "protocol error 0x7"


def test_status_which_walks_every_pv_is_rate_limited_per_identity():
    from pvhub.daemon.clients import STATUS_BURST_S, STATUS_PER_S, STATUS_PVS_PER_TOKEN

    router = make_router()
    for i in range(STATUS_PVS_PER_TOKEN):  # one token a status
        router.pvs[f"P:{i}"] = None  # type: ignore[assignment]  (only counted; never walked here)
    router.status = lambda now, viewer=None: {}  # type: ignore[method-assign]
    burst = int(STATUS_PER_S * STATUS_BURST_S)  # a few seconds' worth at once
    answers = [send(router, p.StatusRequest(id=i), now=10.0)[0].message for i in range(burst + 1)]
    assert all(isinstance(a, p.StatusReply) for a in answers[:-1])
    assert isinstance(answers[-1], p.ErrorReply) and answers[-1].code == "limit"
    # Another connection of the same identity pays from the same budget; another identity not.
    assert isinstance(send(router, p.StatusRequest(id=98), client=BOB, now=10.0)[0].message, p.ErrorReply)
    assert isinstance(send(router, p.StatusRequest(id=99), client=BOB, now=10.0, identity="bob")[0].message,
                      p.StatusReply)  # fmt: skip
    assert isinstance(send(router, p.StatusRequest(id=100), now=11.0)[0].message, p.StatusReply)


def test_a_status_of_many_pvs_costs_more():
    bucket = TokenBucket(50.0, now=0.0)
    cost = 10_000 / 200
    assert bucket.take(0.0, cost)  # the first, on credit
    assert not bucket.take(0.5, cost)
    assert bucket.take(1.1, cost)  # about one a second


def test_a_client_name_is_kept_short():
    from pvhub.daemon.clients import MAX_CLIENT_NAME

    router = make_router()
    send(router, p.HelloRequest(id=1, client="n" * 1_000_000))
    assert len(router.clients[ALICE].name) == MAX_CLIENT_NAME


def test_a_pv_released_while_its_actor_restarts_is_still_announced_to_its_subscribers():
    router = make_router(limits=Limits(release_unconnected_s=30))
    send(router, p.ReadRequest(id=1, pv="N:none"), now=10.0)  # its actor never says it is ready
    effects = router.tick(40.5)
    assert not [e for e in effects if isinstance(e, Release)]  # nobody to tell: it never adopted it
    assert [e.topic for e in effects if isinstance(e, Announce)] == [p.topic("N:none")]
    assert "N:none" not in router.pvs


def test_the_daemons_bound_on_pvs_holds_for_names_a_client_asked_for_before():
    router = make_router(limits=Limits(max_pvs=2, release_unconnected_s=30))
    for i, pv in enumerate(("A:1", "A:2")):
        assert error_of(send(router, p.ReadRequest(id=i, pv=pv), now=10.0)) is None
    router.tick(41.0)  # neither found an IOC: both released
    assert not router.pvs
    for i, pv in enumerate(("B:1", "B:2")):  # another client fills the daemon
        assert error_of(send(router, p.ReadRequest(id=i, pv=pv), client=BOB, now=42.0)) is None
    refused = error_of(send(router, p.ReadRequest(id=5, pv="A:1"), now=43.0))
    assert refused.code == "limit" and "the daemon holds 2 PVs" in refused.message
    assert "A:1" not in router.pvs


def test_names_the_daemon_released_no_longer_count_against_a_client():
    router = make_router(limits=Limits(max_pvs_per_client=2, release_unconnected_s=30))
    for i, pv in enumerate(("A:1", "A:2")):
        assert error_of(send(router, p.ReadRequest(id=i, pv=pv), now=10.0)) is None
    refused = error_of(send(router, p.ReadRequest(id=3, pv="A:3"), now=11.0))
    assert refused.code == "limit"
    router.tick(41.0)  # both released
    assert error_of(send(router, p.ReadRequest(id=4, pv="A:3"), now=42.0)) is None
    assert router.clients[ALICE].asked == {"A:3"}


def test_a_status_costs_the_clients_lists_of_followed_pvs_too():
    from pvhub.daemon.clients import STATUS_BURST_S, STATUS_PER_S, STATUS_PVS_PER_TOKEN

    router = make_router()
    many = [f"F:{i}" for i in range(5_000)]
    send(router, p.PingRequest(id=1, pvs=many), client=BOB)
    send(router, p.PingRequest(id=2, pvs=many[:10]), client=BOB)  # replaced, not added
    assert router.clients.followed == 10
    send(router, p.PingRequest(id=3, pvs=many), client=BOB)
    assert router.clients.followed == 5_000
    costs = []
    for i in range(200):
        reply = send(router, p.StatusRequest(id=100 + i), now=10.0)[0].message
        costs.append(isinstance(reply, p.ErrorReply))
    # Every status costs 5,000 / STATUS_PVS_PER_TOKEN tokens: refused once the burst is
    # spent, long before 200 in a row (without the followed lists, each would cost 1).
    burst = STATUS_PER_S * STATUS_BURST_S
    assert any(costs) and costs.index(True) == int(burst // (5_000 / STATUS_PVS_PER_TOKEN))
    router.client_gone(BOB)
    assert router.clients.followed == 0
