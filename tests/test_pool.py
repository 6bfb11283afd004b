"""Pooled actors (``pvhub.daemon.placement``, Rules 2, 3 and 4): many PVs per actor process,
placed by device prefix, a pool that grows ahead of need, and quarantine of a PV that keeps
killing its process. No sockets and no clock: messages and ``now`` in, effects out."""

from __future__ import annotations

from pvhub import protocol as p
from pvhub.config import Config
from pvhub.daemon.effects import Adopt, Quarantined, Release, RetireActor, SpawnActor, ToActor, ToClient, coalesce
from pvhub.daemon.placement import QUARANTINE_STRIKES, TRUST_S, device_prefix, identity_of
from pvhub.daemon.routing import Router

READINGS = "tcp://127.0.0.1:5571"
ALICE = b"\x00alice"


def pooled(pool_size: int = 2, **config) -> Router:
    router = Router(Config(pool_size=pool_size, **config), READINGS)
    router.initial_actors(now=0.0)
    return router


def send(router: Router, message: p.Message, now: float = 1.0) -> list:
    return router.client_message(ALICE, message, p.encode(message), now)


def ready(router: Router, actor: str, now: float = 1.0, pid: int = 100) -> list:
    record = router.actors[actor]
    return router.actor_message(record.identity, b"", p.ActorReady(actor=record.identity, pid=pid), now)


def adopted(effects) -> list[tuple[str, list[str]]]:
    """(identity, pvs) of every adoption among ``effects``."""
    return [(effect.actor, list(effect.pvs)) for effect in effects if isinstance(effect, Adopt)]


def owner(router: Router, pv: str) -> str:
    return router.pvs[pv].actor


def test_the_pool_starts_with_the_daemon_and_a_new_pv_spawns_nothing():
    router = Router(Config(pool_size=3), READINGS)
    effects = router.initial_actors(now=0.0)
    assert effects == [SpawnActor(f"pool:{i}", f"pool:{i}") for i in range(3)]
    for actor in router.placement.pool:
        ready(router, actor)
    request = p.ReadRequest(id=1, pv="IOC1:m1")
    effects = send(router, request)
    actor = owner(router, "IOC1:m1")
    identity = router.actors[actor].identity
    # No process starts on the way of a request: the pooled one adopts the PV, then is asked.
    assert not [e for e in effects if isinstance(e, SpawnActor)]
    assert effects == [Adopt(identity, ("IOC1:m1",)), ToActor(identity, ALICE, p.encode(request))]


def test_pvs_of_one_device_prefix_share_a_process_and_new_prefixes_spread():
    router = pooled(2)
    for actor in router.placement.pool:
        ready(router, actor)
    for i, pv in enumerate(["IOC1:m1.VAL", "IOC1:m1.RBV", "IOC1:m2", "IOC2:x", "IOC2:y"]):
        send(router, p.ReadRequest(id=i, pv=pv))
    assert len({owner(router, pv) for pv in ["IOC1:m1.VAL", "IOC1:m1.RBV", "IOC1:m2"]}) == 1
    assert owner(router, "IOC2:x") == owner(router, "IOC2:y") != owner(router, "IOC1:m1.VAL")


def test_device_prefix():
    assert device_prefix("IOC:m1.RBV") == "IOC"
    assert device_prefix("BL1:mono:energy") == "BL1:mono"
    assert device_prefix("XF:31IDA-OP{Tbl-Ax:X1}Mtr.RBV") == "XF:31IDA-OP{Tbl-Ax"
    assert device_prefix("plain") == "plain"


def test_a_full_process_takes_no_more_and_the_pool_grows_ahead_of_the_next_pv():
    router = pooled(1, max_pvs_per_actor=3)
    ready(router, "pool:0")
    spawned = []
    for i in range(3):
        spawned += [e for e in send(router, p.ReadRequest(id=i, pv=f"A:{i}")) if isinstance(e, SpawnActor)]
    # The third PV took the last room: one more process starts now, before anyone needs it.
    assert spawned == [SpawnActor("pool:1", "pool:1")]
    assert len(router.actors["pool:0"].pvs) == 3
    ready(router, "pool:1")
    effects = send(router, p.ReadRequest(id=9, pv="A:3"))
    assert owner(router, "A:3") == "pool:1"
    assert not [e for e in effects if isinstance(e, SpawnActor)]


def test_a_pv_adopted_before_its_process_is_ready_is_adopted_with_the_ready():
    router = pooled(1)
    request = p.ReadRequest(id=1, pv="A:x")
    assert send(router, request) == []  # queued: the pooled process is still starting
    effects = ready(router, "pool:0")
    assert adopted(effects) == [("pool:0", ["A:x"])]
    assert effects[-1] == ToActor("pool:0", ALICE, p.encode(request))


def test_a_restarted_process_adopts_all_its_pvs_again_in_one_message():
    router = pooled(1)
    ready(router, "pool:0")
    for i in range(5):
        send(router, p.ReadRequest(id=i, pv=f"A:{i}"))
    router.actor_exited("pool:0", 1, now=100.0)
    effects = ready(router, "pool:0", now=100.5)
    assert adopted(effects) == [(identity_of("pool:0", 1), [f"A:{i}" for i in range(5)])]


def test_only_the_dead_processs_pvs_are_lost():
    router = pooled(2)
    for actor in router.placement.pool:
        ready(router, actor)
    send(router, p.ReadRequest(id=1, pv="A:x"))
    send(router, p.ReadRequest(id=2, pv="B:y"))
    victim = owner(router, "A:x")
    assert owner(router, "B:y") != victim
    effects = router.actor_exited(victim, 1, now=50.0)
    lost = [e.message.pv for e in effects if isinstance(getattr(e, "message", None), p.PvLost)]
    assert lost == ["A:x"]


def kill_young(router: Router, actor: str, now: float) -> list:
    """The process of ``actor`` dies right after it was ready (its restart is then due)."""
    ready(router, actor, now=now)
    effects = router.actor_exited(actor, 139, now=now + 0.1)
    record = router.actors.get(actor)
    if record is not None and record.restart_at is not None:
        router.tick(record.restart_at)
    return effects


def test_a_pv_that_keeps_killing_its_pooled_process_is_quarantined_alone():
    router = pooled(1)
    ready(router, "pool:0", now=0.0)
    for i in range(3):
        send(router, p.ReadRequest(id=i, pv=f"OLD:{i}"), now=0.0)
    router.actor_message("pool:0", b"", p.Heartbeat(sender="pool:0"), now=TRUST_S + 1)
    router.tick(TRUST_S + 1)  # these lived long enough: trusted
    send(router, p.ReadRequest(id=9, pv="BAD:pv"), now=TRUST_S + 1)
    effects = router.actor_exited("pool:0", 139, now=TRUST_S + 2)
    assert not [e for e in effects if isinstance(e, Quarantined)]  # one strike: it may be bad luck
    assert router.pvs["BAD:pv"].strikes == 1 and router.pvs["OLD:0"].strikes == 0
    effects = kill_young(router, "pool:0", TRUST_S + 3)
    assert [e for e in effects if isinstance(e, Quarantined)] == [Quarantined(("BAD:pv",), "pool:0", "pv:BAD:pv")]
    assert owner(router, "BAD:pv") == "pv:BAD:pv"
    assert router.pvs["BAD:pv"].quarantined
    assert SpawnActor("pv:BAD:pv", "pv:BAD:pv") in effects
    assert router.actors["pool:0"].pvs == {"OLD:0", "OLD:1", "OLD:2"}
    status = {entry["pv"]: entry for entry in router.status(20.0)["pvs"]}
    assert status["BAD:pv"]["quarantined"] is True and status["OLD:0"]["quarantined"] is False


def test_a_quarantined_pv_released_and_asked_for_again_goes_to_a_process_of_its_own():
    from pvhub.config import Limits
    from pvhub.daemon import placement

    router = pooled(1, limits=Limits(release_unconnected_s=5))
    ready(router, "pool:0", now=0.0)
    send(router, p.ReadRequest(id=1, pv="BAD:pv"), now=0.0)
    send(router, p.ReadRequest(id=2, pv="ODD:pv"), now=0.0)
    router.actor_exited("pool:0", 139, now=1.0)
    kill_young(router, "pool:0", 2.0)  # two strikes each: split between two probation processes
    kill_young(router, owner(router, "BAD:pv"), 3.0)  # BAD's dies again: alone, quarantined
    assert router.pvs["BAD:pv"].quarantined and owner(router, "BAD:pv") == "pv:BAD:pv"
    odd_strikes = router.pvs["ODD:pv"].strikes
    assert odd_strikes == QUARANTINE_STRIKES
    for actor in list(router.actors):
        ready(router, actor, now=4.0)
    router.tick(9.5)  # neither found an IOC: both released, before their trial was over
    assert "BAD:pv" not in router.pvs and "ODD:pv" not in router.pvs
    # Asked for again: not back into the pool it killed, and status still says so.
    effects = send(router, p.ReadRequest(id=3, pv="BAD:pv"), now=70.0)
    assert [e.actor for e in effects if isinstance(e, SpawnActor)] == ["pv:BAD:pv"]
    assert owner(router, "BAD:pv") == "pv:BAD:pv" and router.pvs["BAD:pv"].quarantined
    status = {entry["pv"]: entry for entry in router.status(70.0)["pvs"]}
    assert status["BAD:pv"]["quarantined"] is True
    # One that had strikes only goes back to the pool with them.
    send(router, p.ReadRequest(id=4, pv="ODD:pv"), now=70.0)
    assert owner(router, "ODD:pv").startswith("pool:") and router.pvs["ODD:pv"].strikes == odd_strikes
    # After SUSPECT_MEMORY_S, a name starts over.
    router.tick(100.0)
    later = 100.0 + placement.SUSPECT_MEMORY_S
    send(router, p.ReadRequest(id=5, pv="BAD:pv"), now=later)
    assert owner(router, "BAD:pv").startswith("pool:") and not router.pvs["BAD:pv"].quarantined


def test_a_trusted_pvs_old_strikes_are_not_carried_into_its_next_life():
    from pvhub.config import Limits

    router = pooled(1, limits=Limits(release_unconnected_s=30))
    ready(router, "pool:0", now=0.0)
    send(router, p.ReadRequest(id=1, pv="X:pv"), now=0.0)
    router.actor_exited("pool:0", 139, now=1.0)  # one strike: bad luck, perhaps
    ready(router, "pool:0", now=1.5)
    router.tick(1.5 + TRUST_S + 1)  # then it lived its trial out: trusted
    assert router.pvs["X:pv"].trusted and router.pvs["X:pv"].strikes == 1
    router.tick(40.0)  # released, never connected
    assert "X:pv" not in router.pvs and router.placement.suspects_remembered == 0
    send(router, p.ReadRequest(id=2, pv="X:pv"), now=50.0)
    assert router.pvs["X:pv"].strikes == 0  # a new killer beside it would not push it out


def test_the_strikes_of_released_pvs_are_remembered_for_a_bounded_number_of_names(monkeypatch):
    from pvhub.config import Limits
    from pvhub.daemon import placement

    monkeypatch.setattr(placement, "MAX_SUSPECTS", 5)
    router = pooled(1, limits=Limits(release_unconnected_s=5))
    ready(router, "pool:0", now=0.0)
    names = [f"S{i}:pv" for i in range(20)]
    for i, pv in enumerate(names):
        send(router, p.ReadRequest(id=i, pv=pv), now=0.0)
    router.actor_exited("pool:0", 139, now=1.0)  # one strike each
    ready(router, "pool:0", now=1.5)
    router.tick(6.0)  # released before their trial was over
    assert not router.pvs
    assert router.placement.suspects_remembered == 5


def test_many_suspects_are_halved_until_the_bad_one_is_alone():
    router = pooled(1)
    ready(router, "pool:0", now=0.0)
    suspects = [f"NEW:{i}" for i in range(8)]
    for i, pv in enumerate(suspects):
        send(router, p.ReadRequest(id=i, pv=pv), now=0.0)
    bad = "NEW:5"
    router.actor_exited("pool:0", 139, now=1.0)
    effects = kill_young(router, "pool:0", 2.0)  # second strike for all 8: split in two
    moved = [e for e in effects if isinstance(e, Quarantined)]
    assert sorted(pv for e in moved for pv in e.pvs) == suspects
    assert not router.actors["pool:0"].pvs
    now, deaths = 3.0, 2
    while not router.pvs[bad].quarantined:
        holder = owner(router, bad)
        kill_young(router, holder, now)  # whatever holds the bad PV dies
        now, deaths = now + 1.0, deaths + 1
        assert deaths < 10
    assert owner(router, bad) == f"pv:{bad}"
    # The others were never quarantined; every one has an owner that is not the bad one's.
    assert all(not router.pvs[pv].quarantined and owner(router, pv) != owner(router, bad)
               for pv in suspects if pv != bad)
    assert deaths <= 2 + 3  # log2(8) more deaths


def test_a_group_stays_whole_however_often_it_dies():
    router = pooled(0, groups={"motion": ("M:1", "M:2")})
    for now in (1.0, 2.0, 3.0):
        kill_young(router, "group:motion", now)
    assert router.actors["group:motion"].pvs == {"M:1", "M:2"}
    assert QUARANTINE_STRIKES <= 3


def test_heartbeats_carry_only_changed_pvs_and_status_keeps_the_others():
    router = pooled(1)
    ready(router, "pool:0")
    for i in range(3):
        send(router, p.ReadRequest(id=i, pv=f"A:{i}"))
    stats = {f"A:{i}": {"connected": True, "updates": 1, "last_update": 5.0} for i in range(3)}
    router.actor_message("pool:0", b"", p.Heartbeat(sender="pool:0", stats=stats), now=2.0)
    router.actor_message("pool:0", b"", p.Heartbeat(sender="pool:0", stats={"A:1": {"connected": False, "updates": 2}}), now=2.5)
    status = {entry["pv"]: entry for entry in router.status(3.0)["pvs"]}
    assert [status[f"A:{i}"]["connected"] for i in range(3)] == [True, False, True]
    assert status["A:1"]["updates"] == 2 and status["A:0"]["updates"] == 1


def test_a_bad_heartbeat_is_ignored():
    router = pooled(1)
    ready(router, "pool:0")
    send(router, p.ReadRequest(id=1, pv="A:1"))
    for stats in ({"A:1": "nonsense"}, {"A:1": {"updates": "many"}}, {"nobody:pv": {"updates": 3}}):
        assert router.actor_message("pool:0", b"", p.Heartbeat(sender="pool:0", stats=stats), now=2.0) == []
    assert router.status(3.0)["pvs"][0]["updates"] == 0


def test_isolated_pvs_get_a_process_of_their_own():
    router = pooled(2, isolate=("FRAGILE:*",))
    effects = send(router, p.ReadRequest(id=1, pv="FRAGILE:x"))
    assert effects == [SpawnActor("pv:FRAGILE:x", "pv:FRAGILE:x")]
    assert owner(router, "FRAGILE:x") == "pv:FRAGILE:x"


def test_an_isolated_pv_released_stops_its_process_and_a_new_request_starts_a_fresh_one():
    from pvhub.config import Limits

    router = pooled(1, isolate=("FRAGILE:*",), limits=Limits(release_unconnected_s=30))
    send(router, p.ReadRequest(id=1, pv="FRAGILE:x"), now=1.0)
    ready(router, "pv:FRAGILE:x", now=1.5)
    ready(router, "pool:0", now=1.5)
    send(router, p.ReadRequest(id=2, pv="A:1"), now=1.0)
    effects = router.tick(32.0)  # neither found an IOC
    (retired,) = [e for e in effects if isinstance(e, RetireActor)]
    assert retired.actor == "pv:FRAGILE:x" and "released" in retired.reason
    assert [e for e in effects if isinstance(e, Release)] == [Release("pool:0", ("A:1",))]  # the pool stays
    assert "pv:FRAGILE:x" not in router.actors and "pool:0" in router.actors
    assert router.actor_exited("pv:FRAGILE:x", 0, now=33.0) == []  # its exit is no death
    # Asked for again: a process of its own again, under the next incarnation's identity (the
    # old process may still be on its way out), and it serves.
    assert send(router, p.ReadRequest(id=3, pv="FRAGILE:x"), now=40.0) == [
        SpawnActor("pv:FRAGILE:x", "pv:FRAGILE:x 1")]
    effects = ready(router, "pv:FRAGILE:x", now=40.5)
    assert ("pv:FRAGILE:x 1", ["FRAGILE:x"]) in adopted(effects)
    assert any(isinstance(e, ToActor) for e in effects)
    # Long after, the name starts over.
    router.tick(80.0)
    router.tick(111.0)
    assert "pv:FRAGILE:x" not in router.actors
    assert send(router, p.ReadRequest(id=4, pv="FRAGILE:x"), now=112.0) == [SpawnActor("pv:FRAGILE:x", "pv:FRAGILE:x")]


def test_placements_of_devices_whose_pvs_all_went_are_forgotten():
    from pvhub.config import Limits
    from pvhub.daemon.placement import HOMES_SLACK

    router = pooled(2, limits=Limits(release_unconnected_s=30))
    for actor in list(router.placement.pool):
        ready(router, actor)
    now = 1.0
    for batch in range(3):  # thousands of devices asked for once, none found, all released
        for i in range(HOMES_SLACK):
            send(router, p.ReadRequest(id=i, pv=f"DEV{batch}x{i}:pv"), now=now)
        now += 31.0
        router.tick(now)
        assert not router.pvs
        assert len(router.placement.homes) <= 2 * len(router.pvs) + HOMES_SLACK + 1
    send(router, p.ReadRequest(id=1, pv="KEPT:a"), now=now)
    send(router, p.ReadRequest(id=2, pv="KEPT:b"), now=now)
    assert owner(router, "KEPT:a") == owner(router, "KEPT:b")  # one device, one process still


def test_a_request_is_answered_once_its_pooled_process_is_ready_even_after_a_death():
    router = pooled(1)
    ready(router, "pool:0")
    request = p.SetRequest(id=4, pv="A:1", value=1.0)
    send(router, request)
    effects = router.actor_exited("pool:0", 1, now=3.0)
    (reply,) = [e for e in effects if isinstance(e, ToClient)]
    assert reply.message.code == "actor_died" and "outcome is unknown" in reply.message.message


def test_a_burst_of_new_pvs_is_adopted_in_one_message_per_actor_before_its_requests():
    router = pooled(2)
    for actor in router.placement.pool:
        ready(router, actor)
    requests = [p.ReadRequest(id=i, pv=f"{'AB'[i % 2]}:{i}") for i in range(6)]
    effects = coalesce([e for r in requests for e in send(router, r)])
    adoptions = [e for e in effects if isinstance(e, Adopt)]
    assert len(adoptions) == 2 and sorted(pv for a in adoptions for pv in a.pvs) == sorted(r.pv for r in requests)
    for request in requests:  # each request comes after the adoption of its PV
        at = next(i for i, e in enumerate(effects) if isinstance(e, ToActor) and e.payload == p.encode(request))
        assert any(isinstance(e, Adopt) and request.pv in e.pvs for e in effects[:at])


def test_a_process_killed_as_hung_gives_its_pvs_no_strike():
    router = pooled(1)
    ready(router, "pool:0", now=0.0)
    send(router, p.ReadRequest(id=1, pv="A:x"), now=0.0)
    kills = [e for e in router.tick(5.0) if type(e).__name__ == "KillActor"]  # silent: hung
    assert kills
    router.actor_exited("pool:0", -9, now=5.1)
    assert router.pvs["A:x"].strikes == 0
