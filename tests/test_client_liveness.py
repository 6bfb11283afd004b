"""The client's sans-I/O cores: liveness (``pvhub.client.liveness``) and the request table
(``pvhub.client.requests``), with a fake clock and no sockets."""

from __future__ import annotations

import pytest

from pvhub import protocol as p
from pvhub.client.liveness import HELLO_RETRY, Liveness, Lose, Ping, SayHello
from pvhub.client.requests import RequestTable
from pvhub.errors import HubUnavailableError, PvhubTimeoutError

pytestmark = pytest.mark.timeout(10)

BEAT = p.CLIENT_HEARTBEAT_S


def nothing_else(_: object) -> bool:
    return False


def connected(now: float = 0.0) -> Liveness:
    live = Liveness()
    assert live.due(now, nothing_else) == SayHello()
    live.hello_sent(1, now)
    live.connected_at(now)
    return live


def test_hello_is_said_again_until_a_daemon_answers():
    live = Liveness()
    assert not live.connected.is_set()
    assert live.due(0.0, nothing_else) == SayHello()
    live.hello_sent(1, 0.0)
    assert live.due(HELLO_RETRY / 2, nothing_else) is None
    assert live.next_due() == pytest.approx(HELLO_RETRY)
    assert live.due(HELLO_RETRY, nothing_else) == SayHello()
    live.hello_sent(2, HELLO_RETRY)
    assert not live.is_current_hello(1) and live.is_current_hello(2)


def test_a_handshake_that_succeeds_asks_for_hello_at_once():
    live = Liveness()
    live.hello_sent(1, 10.0)
    assert live.due(10.01, nothing_else) is None
    live.handshake_succeeded()
    assert live.due(10.01, nothing_else) == SayHello()


def test_connected_pings_every_heartbeat_and_any_answer_makes_pings_moot():
    live = connected(100.0)
    assert live.connected.is_set()
    assert live.due(100.0 + BEAT / 2, nothing_else) is None
    assert live.due(100.0 + BEAT, nothing_else) == Ping()
    live.ping_sent(7, 100.0 + BEAT, sent=True, with_pvs=live.take_pvs_change(100.0 + BEAT, 10))
    live.ping_sent(8, 100.0 + 2 * BEAT, sent=True, with_pvs=live.take_pvs_change(100.0 + 2 * BEAT, 10))
    assert live.unanswered == 2
    assert live.heard(100.0 + 2 * BEAT) == {7, 8}
    assert live.unanswered == 0 and not live.pings


def test_lost_only_after_enough_unanswered_pings_and_enough_silence():
    live = connected(0.0)
    now = 0.0
    for request_id in range(p.LIVENESS):
        now += BEAT
        assert live.due(now, nothing_else) == Ping()
        live.ping_sent(request_id, now, sent=True, with_pvs=False)
    # Enough pings unanswered, but not yet silent long enough: no verdict.
    assert live.due(now, nothing_else) is None
    late = p.LIVENESS * BEAT + 0.5
    action = live.due(late, nothing_else)
    assert isinstance(action, Lose) and f"{p.LIVENESS} pings unanswered" in action.reason
    assert live.lost() and not live.connected.is_set() and live.losses == 1
    assert not live.lost()  # once only
    assert live.due(late, nothing_else) == SayHello()


def test_a_suspended_process_asks_again_before_it_judges():
    live = connected(0.0)
    live.ping_sent(1, BEAT, sent=True, with_pvs=False)
    # The process slept for a minute: silence is long, but one ping is not LIVENESS pings.
    assert live.due(60.0, nothing_else) == Ping()


def test_a_ping_that_could_not_be_sent_counts_and_keeps_its_pvs_for_the_next():
    live = connected(0.0)
    assert live.take_pvs_change(BEAT, 10)  # a new connection reports its PVs
    live.ping_sent(1, BEAT, sent=False, with_pvs=True)
    assert live.unanswered == 1 and not live.pings
    assert live.take_pvs_change(BEAT, 10)  # still to be said, at once
    live.ping_sent(2, 2 * BEAT, sent=True, with_pvs=True)
    assert not live.take_pvs_change(3 * BEAT, 10)  # nothing changed


def test_the_pv_list_goes_at_most_once_per_second_per_thousand_channels():
    live = connected(0.0)
    assert live.take_pvs_change(1.0, 20_000)  # the first, at once: 20 s until the next
    live.pvs_changed()
    assert not live.take_pvs_change(2.0, 20_000)
    assert not live.take_pvs_change(20.9, 20_000)
    assert live.take_pvs_change(21.0, 20_000)
    live.pvs_changed()
    live.pvs_changed(wanted=True)  # the daemon forgot this client: at once
    assert live.take_pvs_change(22.0, 20_000)
    live.pvs_changed()  # a few channels: a second apart
    assert not live.take_pvs_change(22.5, 5)


def test_a_stopping_daemon_is_lost_once_it_owes_only_pings():
    live = connected(0.0)
    table = RequestTable("tcp://127.0.0.1:1")
    live.ping_sent(9, 0.05, sent=True, with_pvs=False)  # owed, but only a ping
    table.add(9, lambda message: True, 0.05)
    table.add(5, lambda message: True, 0.05)  # a set in flight
    live.stopping_announced()
    assert live.due(0.1, table.waiting_besides) is None
    table.discard(5)  # the set was answered
    assert live.due(0.1, table.waiting_besides) == Lose("the daemon stopped")
    live.lost()
    assert not live.stopping


def replies_to(table: RequestTable, request_id: int, final_after: int = 1) -> list:
    seen: list = []

    def handler(message: p.Message) -> bool:
        seen.append(message)
        return len(seen) >= final_after

    table.add(request_id, handler, now=0.0)
    return seen


def test_each_reply_reaches_its_request_until_the_final_one():
    table = RequestTable("tcp://127.0.0.1:1")
    seen = replies_to(table, 3, final_after=2)
    accepted, done = p.SetAccepted(id=3, pv="X:a"), p.SetDone(id=3, pv="X:a", reading=None, epoch=1, seq=1)
    assert table.answer(accepted) and 3 in table
    assert table.answer(done) and 3 not in table
    assert seen == [accepted, done]
    assert not table.answer(p.SetDone(id=3, pv="X:a", reading=None, epoch=1, seq=2))  # late: nobody


def test_a_handler_that_raises_counts_as_answered():
    table = RequestTable("tcp://127.0.0.1:1")

    def broken(message: p.Message) -> bool:
        raise RuntimeError("user code")

    table.add(1, broken, now=0.0)
    assert table.answer(p.Pong(id=1))
    assert len(table) == 0


def test_deadlines_fail_with_a_timeout_and_only_what_expired():
    table = RequestTable("tcp://127.0.0.1:1")
    short: list = []
    longer: list = []
    none = replies_to(table, 3)
    table.add(1, lambda m: short.append(m) or True, now=0.0, timeout=1.0, what="read X:a")
    table.add(2, lambda m: longer.append(m) or True, now=0.0, timeout=5.0, what="status")
    assert table.next_deadline == 1.0
    assert table.expire(0.99) == 0
    assert table.expire(1.0) == 1
    assert short[0].code == PvhubTimeoutError.code and "read X:a" in short[0].message
    assert not longer and not none and 2 in table and 3 in table
    assert table.expire(1000.0) == 1  # request 3 has no deadline
    assert 3 in table


def test_fail_all_and_lost_replies_answer_every_waiter():
    table = RequestTable("tcp://127.0.0.1:1")
    a, b, c = replies_to(table, 1), replies_to(table, 2), replies_to(table, 3)
    table.fail_lost([2, "not an id", 99])
    assert b and b[0].code == HubUnavailableError.code and "could not deliver" in b[0].message
    assert not a and not c
    table.fail_all("the daemon went away")
    assert a[0].message == c[0].message == "the daemon went away"
    assert len(table) == 0 and table.next_deadline is None


def test_waiting_besides_looks_past_the_given_ids():
    table = RequestTable("tcp://127.0.0.1:1")
    replies_to(table, 1)
    replies_to(table, 2)
    assert table.waiting_besides({1})
    assert not table.waiting_besides({1, 2})
    assert not table.waiting_besides({1, 2, 9})
