"""Readings in batches (``actors/loop.py`` Rule 6, ``protocol`` Rule 4): a PV that changes
faster than the actor's window sends several updates in one message, in seq order and none
missing; a quiet PV's change is sent alone, without waiting for the window.

Rule: a bare SUB and DEALER against a real daemon and the zoo IOC, whose ``fast`` counts at
500 Hz (faster than the 5 ms window) and whose ``count`` changes only when put.
"""

from __future__ import annotations

import time

import pytest
import zmq

from pvhub import protocol as p
from pvhub.actors.loop import SNAPSHOT_SPACING_S
from helpers import readings_in, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]


class Peer:
    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.connect(address)
        self.ids = iter(range(1, 1_000_000))
        self.frames: list[int] = []  # payload frames of each readings message
        self.readings = self.ask(p.HelloRequest(id=next(self.ids), client="batches")).readings
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(self.readings)

    def ask(self, message: p.Message) -> p.Message:
        self.dealer.send(p.encode(message))
        assert self.dealer.poll(10_000), "no reply"
        return p.decode(self.dealer.recv())

    def follow(self, pv: str) -> None:
        self.sub.setsockopt(zmq.SUBSCRIBE, p.topic(pv))

        def connected() -> bool:
            reply = self.ask(p.ReadRequest(id=next(self.ids), pv=pv))
            return isinstance(reply, p.Snapshot) and reply.connected

        wait_until(connected, timeout=20, interval=0.05, message=f"{pv} did not connect")

    def messages(self, seconds: float) -> list[tuple[float, list[p.Update]]]:
        """(arrival time, its updates) of each readings message within ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sub.poll(int(left * 1000) + 1):
                _, *payloads = self.sub.recv_multipart()
                self.frames.append(len(payloads))
                got.append((time.monotonic(), readings_in(payloads)))
        return got

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def peer(hub):
    peer = Peer(hub.address)
    yield peer
    peer.close()


def test_a_fast_pvs_updates_come_several_to_a_message_in_order(peer, prefix):
    peer.follow(f"{prefix}fast")
    messages = peer.messages(2.0)
    changes = [u for _, updates in messages for u in updates if not u.snapshot]
    assert len(changes) > 200, f"only {len(changes)} updates of a 500 Hz counter in 2 s"
    assert max(len(updates) for _, updates in messages) > 1, "no message carried more than one update"
    assert len(messages) < len(changes), "as many messages as updates: nothing was batched"
    # A message's updates come back to back in one frame (protocol Rule 8): a client reads
    # one frame per message, not one per update.
    assert set(peer.frames) == {1}, f"frames per message: {sorted(set(peer.frames))}"
    seqs = [u.seq for u in changes]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "updates out of order or missing"
    values = [u.reading.value for u in changes]
    assert values == sorted(values), "the counter went backwards"


def test_a_quiet_pvs_change_is_sent_alone_and_at_once(peer, prefix):
    pv = f"{prefix}count"
    peer.follow(pv)
    peer.messages(0.2)  # the snapshot the follow asked for
    for value in (11, 12, 13):
        sent = time.monotonic()
        reply = peer.ask(p.SetRequest(id=next(peer.ids), pv=pv, value=value))
        while isinstance(reply, p.SetAccepted):
            assert peer.dealer.poll(10_000), "no SetDone"
            reply = p.decode(peer.dealer.recv())
        assert isinstance(reply, p.SetDone), reply
        arrivals = [(at, updates) for at, updates in peer.messages(1.0)
                    if any(u.reading is not None and u.reading.value == value for u in updates)]  # fmt: skip
        assert len(arrivals) == 1, f"the change to {value} came in {len(arrivals)} messages"
        at, updates = arrivals[0]
        assert [u.reading.value for u in updates] == [value]
        # Put, completed and monitored within a round trip or two: far inside a second, and
        # never held for another PV's window.
        assert at - sent < 0.5


def test_a_burst_of_snapshot_requests_publishes_a_few_snapshots(peer, prefix):
    # Clients proving their subscriptions (client hub.py Rule 4) each ask for a published
    # snapshot; a hundred at once, as after a daemon restart, must not cost a hundred
    # snapshots each sent to every subscriber.
    pv = f"{prefix}count"
    peer.follow(pv)
    peer.messages(0.2)  # the snapshot the follow asked for
    started = time.monotonic()
    for _ in range(100):
        peer.dealer.send(p.encode(p.ReadRequest(id=next(peer.ids), pv=pv, publish=True)))
    replies = []
    while len(replies) < 100:
        assert peer.dealer.poll(10_000), f"{len(replies)} of 100 answered"
        replies.append(p.decode(peer.dealer.recv()))
    took = time.monotonic() - started
    assert all(isinstance(reply, p.Snapshot) and reply.connected for reply in replies)  # each answered
    published = [u for _, updates in peer.messages(0.5) for u in updates if u.snapshot]
    assert 1 <= len(published) <= took / SNAPSHOT_SPACING_S + 2, (len(published), took)
    assert len({(u.epoch, u.seq) for u in published}) == 1  # the one state, nothing new
