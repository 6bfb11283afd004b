"""A client's copy of one PV (``pvhub.client.hub.Channel``): the Clone rules for snapshots and
published updates, its listeners, and losing the PV; and the schedule by which the hub asks
for snapshots until a channel is live (``ProofSchedule``). No sockets: the hub is a stub that
records the snapshots the channel asks for (``resync``), the only thing a Channel asks of it.
"""

from __future__ import annotations

import gc
import logging
import threading

import pytest

from pvhub import protocol as p
from pvhub.client.channel import Channel, ProofSchedule

EPOCH = 1_700_000_000_000_000_000
METADATA: p.PVMetadata = {"units": "mm", "precision": 3, "write_access": True}


class StubHub:
    def __init__(self) -> None:
        self.resyncs: list[Channel] = []

    def resync(self, channel: Channel) -> None:
        self.resyncs.append(channel)


class Listener:
    """What a Signal hands its channel: a bound method, held weakly."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []

    def on_change(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        new = channel.reading.value if channel.reading is not None else None
        self.calls.append((kind, new, old.value if old is not None else None))


def reading(value: float) -> p.Reading:
    return p.Reading(value=value, timestamp=1000.0 + value)


def make_channel() -> tuple[StubHub, Channel]:
    hub = StubHub()
    return hub, Channel(hub, "X:a")  # type: ignore[arg-type]


def snapshot(channel: Channel, seq: int, value: float | None = 1.0, *, epoch: int = EPOCH,
             connected: bool = True, metadata: p.PVMetadata | None = METADATA) -> None:
    channel.apply(epoch, seq, connected, None if value is None else reading(value), metadata,
                  from_stream=False)


def update(channel: Channel, seq: int, value: float | None, *, epoch: int = EPOCH,
           connected: bool = True, metadata: p.PVMetadata | None = None) -> None:
    """A message from the subscription, as the hub applies it: the channel is live after."""
    channel.apply(epoch, seq, connected, None if value is None else reading(value), metadata,
                  from_stream=True)


def attached(seq: int = 5, value: float = 1.0) -> tuple[StubHub, Channel, Listener]:
    """A channel whose subscription is live and whose snapshot came: ready, its value told."""
    hub, channel = make_channel()
    channel.live = True  # as after a first message of the subscription that brought nothing newer
    snapshot(channel, seq, value)
    listener = Listener()
    channel.add_listener(listener.on_change)
    return hub, channel, listener


# --- the Clone rules ---------------------------------------------------------------------------


def test_a_new_channel_is_neither_attached_nor_ready():
    _, channel = make_channel()
    assert (channel.attached, channel.connected, channel.live, channel.ready) == (False, False, False, False)
    assert (channel.reading, channel.metadata, channel.gaps, channel.missed) == (None, {}, 0, 0)


def test_a_snapshot_attaches_the_channel_and_the_subscriptions_first_message_makes_it_ready():
    hub, channel = make_channel()
    snapshot(channel, 5, 2.5)
    assert (channel.epoch, channel.seq) == (EPOCH, 5)
    assert channel.attached and channel.connected and not channel.ready  # the stream may start later
    assert channel.reading == reading(2.5)
    assert channel.metadata == METADATA and channel.metadata is not METADATA
    update(channel, 5, 2.5)  # the actor's published copy of that snapshot: nothing newer
    assert channel.live and channel.ready and channel.seq == 5
    assert hub.resyncs == []


@pytest.mark.parametrize(
    ("connected", "value"), [(False, 1.0), (True, None)], ids=["disconnected", "no-reading"]
)
def test_a_channel_is_ready_only_connected_and_with_a_reading(connected, value):
    _, channel = make_channel()
    snapshot(channel, 5, value, connected=connected)
    assert channel.attached and not channel.ready


@pytest.mark.parametrize("seq", [3, 5], ids=["older", "same"])
@pytest.mark.parametrize("from_stream", [True, False], ids=["stream", "snapshot"])
def test_what_is_not_newer_in_the_same_epoch_is_dropped(seq, from_stream):
    hub, channel, listener = attached(seq=5, value=1.0)
    channel.apply(EPOCH, seq, False, reading(9.0), {"units": "m"}, from_stream=from_stream)
    assert (channel.seq, channel.connected, channel.reading, channel.metadata) == (5, True, reading(1.0), METADATA)
    assert listener.calls == [] and hub.resyncs == [] and channel.gaps == 0


def test_the_next_update_from_the_stream_is_applied_without_a_gap():
    hub, channel, listener = attached(seq=5, value=1.0)
    update(channel, 6, 2.0)
    assert (channel.seq, channel.reading) == (6, reading(2.0))
    assert (channel.gaps, channel.missed, hub.resyncs) == (0, 0, [])
    assert listener.calls == [("value", 2.0, 1.0)]


def test_a_gap_in_the_stream_is_counted_and_asks_for_a_snapshot(caplog):
    hub, channel, listener = attached(seq=5, value=1.0)
    channel.live = True  # something arrived on the subscription before (the hub sets it)
    with caplog.at_level(logging.WARNING, logger="pvhub.client"):
        update(channel, 9, 2.0)
    assert (channel.gaps, channel.missed) == (1, 3)
    assert hub.resyncs == [channel]
    assert (channel.seq, channel.reading) == (9, reading(2.0))  # still applied: it is newer
    assert listener.calls == [("value", 2.0, 1.0)]
    assert "readings_missed" in caplog.text and "missed=3" in caplog.text
    update(channel, 11, 3.0)
    assert (channel.gaps, channel.missed, len(hub.resyncs)) == (2, 4, 2)


def test_a_jump_at_a_subscriptions_first_message_is_no_loss_but_asks_for_a_snapshot(caplog):
    # The snapshot (seq 5) was answered before the subscription reached the daemon: seq 6 was
    # published to others only, and seq 7 is the subscription's first message.
    hub, channel = make_channel()
    snapshot(channel, 5, 1.0)
    listener = Listener()
    channel.add_listener(listener.on_change)
    assert not channel.live and not channel.ready
    with caplog.at_level(logging.WARNING, logger="pvhub.client"):
        update(channel, 7, 2.0)
    assert (channel.gaps, channel.missed, hub.resyncs) == (0, 0, [channel])
    assert (channel.seq, channel.reading) == (7, reading(2.0))
    # The snapshot's 1.0 was held, never told: a subscriber's first value is the stream's,
    # the start of an unbroken run (Rule 2), not 1.0 with 6's value missing after it.
    assert channel.ready and listener.calls == [("meta", 2.0, 1.0), ("value", 2.0, None)]
    assert "readings_missed" not in caplog.text
    update(channel, 9, 3.0)  # a jump once the subscription is live: counted
    assert (channel.gaps, channel.missed) == (1, 1)


def test_a_snapshot_that_jumps_ahead_is_no_gap():
    hub, channel, _ = attached(seq=5)
    snapshot(channel, 50, 2.0)
    assert channel.seq == 50
    assert (channel.gaps, channel.missed, hub.resyncs) == (0, 0, [])


def test_a_new_epoch_on_the_stream_is_accepted_at_any_seq_and_asks_for_a_snapshot():
    hub, channel, listener = attached(seq=50, value=1.0)
    update(channel, 0, 2.0, epoch=EPOCH + 1)
    assert (channel.epoch, channel.seq, channel.reading) == (EPOCH + 1, 0, reading(2.0))
    assert hub.resyncs == [channel]
    assert (channel.gaps, channel.missed) == (0, 0)
    assert listener.calls == [("value", 2.0, 1.0)]


def test_a_snapshot_of_a_new_epoch_is_accepted_at_any_seq_without_a_resync():
    hub, channel, _ = attached(seq=50)
    snapshot(channel, 1, 2.0, epoch=EPOCH + 1)
    assert (channel.epoch, channel.seq, channel.reading) == (EPOCH + 1, 1, reading(2.0))
    assert (hub.resyncs, channel.gaps) == ([], 0)


def test_an_update_without_metadata_keeps_the_metadata():
    _, channel, _ = attached(seq=5)
    update(channel, 6, 2.0, metadata=None)
    assert channel.metadata == METADATA


def test_a_stream_update_does_not_attach_a_channel():
    hub, channel = make_channel()
    update(channel, 5, 1.0)
    assert (channel.seq, channel.reading, channel.connected) == (5, reading(1.0), True)
    assert not channel.attached and not channel.ready
    update(channel, 9, 2.0)  # no gap before the snapshot: the snapshot is still to come
    assert (channel.seq, channel.gaps, channel.missed, hub.resyncs) == (9, 0, 0, [])


def test_a_stream_update_before_the_first_snapshot_does_not_lose_the_snapshots_metadata():
    _, channel = make_channel()
    update(channel, 5, 1.0)  # published just before the actor answered our ReadRequest
    listener = Listener()
    channel.add_listener(listener.on_change)
    snapshot(channel, 5, 1.0)
    assert channel.metadata == METADATA
    assert channel.attached and channel.ready and channel.seq == 5
    assert listener.calls == [("meta", 1.0, 1.0)]


def test_a_snapshot_overtaken_by_the_stream_keeps_the_streams_newer_state():
    hub, channel = make_channel()
    update(channel, 7, 3.0, connected=False)
    snapshot(channel, 5, 1.0, connected=True)  # taken before seq 6 and 7 were published
    assert (channel.seq, channel.reading, channel.connected) == (7, reading(3.0), False)
    assert channel.attached and channel.metadata == METADATA
    assert (channel.gaps, hub.resyncs) == (0, [])


def test_an_overtaken_snapshot_that_changes_nothing_a_listener_sees_tells_no_one():
    _, channel = make_channel()
    update(channel, 5, 1.0, connected=False)
    listener = Listener()
    channel.add_listener(listener.on_change)
    snapshot(channel, 5, 1.0, connected=False, metadata=None)
    assert channel.attached and not channel.ready
    assert listener.calls == []


def test_once_attached_the_stream_counts_gaps_from_the_overtaken_snapshots_seq():
    hub, channel = make_channel()
    update(channel, 5, 1.0)
    snapshot(channel, 5, 1.0)
    update(channel, 7, 2.0)
    assert (channel.gaps, channel.missed, hub.resyncs) == (1, 1, [channel])


def test_an_older_overtaken_snapshot_does_not_undo_newer_metadata_from_the_stream():
    _, channel = make_channel()
    newer = {**METADATA, "units": "um"}
    update(channel, 6, 1.0, metadata=newer)  # the metadata changed after the snapshot was taken
    snapshot(channel, 5, 1.0, metadata=METADATA)
    assert channel.metadata == newer


@pytest.mark.parametrize("seq", [0, 5, 99], ids=["lower-seq", "same-seq", "higher-seq"])
@pytest.mark.parametrize("from_stream", [True, False], ids=["stream", "snapshot"])
def test_anything_from_an_older_epoch_is_dropped(seq, from_stream):
    hub, channel, listener = attached(seq=5, value=1.0)
    channel.apply(EPOCH - 1, seq, False, reading(9.0), {"units": "m"}, from_stream=from_stream)
    assert (channel.epoch, channel.seq, channel.connected) == (EPOCH, 5, True)
    assert (channel.reading, channel.metadata) == (reading(1.0), METADATA)
    assert listener.calls == [] and hub.resyncs == [] and channel.gaps == 0


def test_a_lost_pv_ignores_a_late_snapshot_of_its_replaced_actor():
    _, channel, _ = attached(seq=5, value=1.0)
    snapshot(channel, 0, 2.0, epoch=EPOCH + 1)  # a new actor
    channel.lose("actor died")
    snapshot(channel, 6, 3.0, epoch=EPOCH)  # a late answer from the actor before it
    assert not channel.attached and channel.epoch == EPOCH + 1
    assert channel.reading == reading(2.0)


# --- listeners ---------------------------------------------------------------------------------


def test_the_first_snapshot_tells_meta_and_the_subscriptions_first_message_the_value():
    _, channel = make_channel()
    listener = Listener()
    channel.add_listener(listener.on_change)
    snapshot(channel, 5, 1.0)
    assert listener.calls == [("meta", 1.0, None)]  # connected; its value held (Rule 2)
    update(channel, 5, 1.0)  # the subscription's first message: nothing newer
    assert listener.calls[1:] == [("meta", 1.0, 1.0), ("value", 1.0, None)]  # ready, and the value
    update(channel, 6, 2.0)
    assert listener.calls[3:] == [("value", 2.0, 1.0)]


def test_the_first_snapshot_on_a_live_subscription_tells_meta_then_value():
    _, channel = make_channel()
    update(channel, 4, None, connected=False)  # the subscription's first message came first
    listener = Listener()
    channel.add_listener(listener.on_change)
    snapshot(channel, 5, 1.0)
    assert listener.calls == [("meta", 1.0, None), ("value", 1.0, None)]


def test_a_change_of_metadata_alone_is_meta_only():
    _, channel, listener = attached(seq=5, value=1.0)
    update(channel, 6, None, metadata={**METADATA, "units": "um"})
    assert listener.calls == [("meta", 1.0, 1.0)]
    assert channel.metadata["units"] == "um"


def test_a_disconnection_is_meta_only_and_its_reconnection_meta_and_value():
    _, channel, listener = attached(seq=5, value=1.0)
    update(channel, 6, 1.0, connected=False)
    assert listener.calls == [("meta", 1.0, 1.0)]
    assert not channel.ready
    update(channel, 7, 2.0, connected=True)
    assert listener.calls[1:] == [("meta", 2.0, 1.0), ("value", 2.0, 1.0)]


def test_every_listener_is_told():
    _, channel, first = attached(seq=5, value=1.0)
    second = Listener()
    channel.add_listener(second.on_change)
    update(channel, 6, 2.0)
    assert first.calls == second.calls == [("value", 2.0, 1.0)]


def test_a_removed_listener_is_not_told():
    _, channel, listener = attached(seq=5)
    channel.remove_listener(listener.on_change)
    update(channel, 6, 2.0)
    assert listener.calls == []


def test_listeners_are_held_weakly_and_pruned_once_gone():
    _, channel, kept = attached(seq=5, value=1.0)
    dropped = Listener()
    channel.add_listener(dropped.on_change)
    calls = dropped.calls
    del dropped
    gc.collect()
    update(channel, 6, 2.0)
    assert calls == []
    assert kept.calls == [("value", 2.0, 1.0)]
    assert len(channel._listeners) == 1


# --- losing the PV -----------------------------------------------------------------------------


def test_losing_a_connected_pv_disconnects_it_and_tells_meta_listeners(caplog):
    _, channel, listener = attached(seq=5, value=1.0)
    channel.live = True
    with caplog.at_level(logging.WARNING, logger="pvhub.client"):
        channel.lose("the actor owning X:a exited (code -9)")
    assert (channel.connected, channel.attached, channel.live, channel.ready) == (False, False, False, False)
    assert channel.reading == reading(1.0)  # the last value is kept, marked disconnected
    assert listener.calls == [("meta", 1.0, 1.0)]
    assert "pv_lost" in caplog.text and "code -9" in caplog.text


def test_losing_a_pv_that_was_not_connected_tells_no_one(caplog):
    _, channel, listener = attached(seq=5, value=1.0)
    update(channel, 6, 1.0, connected=False)
    listener.calls.clear()
    with caplog.at_level(logging.WARNING, logger="pvhub.client"):
        channel.lose("gone")
        channel.lose("gone again")
    assert listener.calls == []
    assert "pv_lost" not in caplog.text
    assert not channel.attached


def test_a_lost_pv_reattaches_from_its_new_actors_snapshot():
    hub, channel, listener = attached(seq=50, value=1.0)
    channel.lose("actor died")
    snapshot(channel, 0, 2.0, epoch=EPOCH + 1)
    assert channel.attached and not channel.ready and channel.seq == 0
    assert listener.calls[1:] == [("meta", 2.0, 1.0)]  # connected again; its value held
    update(channel, 0, 2.0, epoch=EPOCH + 1)  # the new actor's published copy
    assert channel.ready and listener.calls[2:] == [("meta", 2.0, 2.0), ("value", 2.0, 1.0)]
    assert hub.resyncs == []


def test_losing_a_pv_forgets_its_seq_but_not_its_epoch():
    _, channel, _ = attached(seq=5, value=1.0)
    channel.lose("no answer for 3.1 s")
    assert (channel.epoch, channel.seq) == (EPOCH, -1)


def test_a_lost_pv_reattaches_from_a_snapshot_of_the_same_actor_at_the_same_seq():
    _, channel, listener = attached(seq=5, value=1.0)
    channel.lose("no answer for 3.1 s")
    snapshot(channel, 5, 1.0)
    update(channel, 5, 1.0)
    assert channel.attached and channel.connected and channel.ready
    assert listener.calls[0] == ("meta", 1.0, 1.0)  # the loss
    assert listener.calls[1:] == [("meta", 1.0, 1.0)] * 2  # connected again, then ready: the value told already


def test_a_lost_pv_reattaches_from_an_earlier_snapshot_of_the_same_actor():
    _, channel, _ = attached(seq=5, value=1.0)
    channel.lose("no answer for 3.1 s")
    snapshot(channel, 3, 0.5)  # any seq: nothing is known any more
    update(channel, 3, 0.5)
    assert channel.attached and channel.ready and (channel.seq, channel.reading) == (3, reading(0.5))


def test_a_lost_pv_is_not_reattached_by_the_stream_alone():
    hub, channel, _ = attached(seq=5, value=1.0)
    channel.lose("no answer for 3.1 s")
    update(channel, 6, 2.0)
    assert not channel.attached and not channel.ready
    assert channel.reading == reading(2.0) and hub.resyncs == []
    snapshot(channel, 6, 2.0)  # overtaken by the stream, and still the one that attaches
    assert channel.attached and channel.ready and channel.metadata == METADATA


# --- waiting -----------------------------------------------------------------------------------


def test_wait_returns_at_once_when_the_predicate_holds():
    _, channel, _ = attached(seq=5)
    assert channel.wait(lambda: channel.ready, timeout=0) is True


def test_wait_times_out_false():
    _, channel = make_channel()
    assert channel.wait(lambda: channel.ready, timeout=0.01) is False


def waiting_for(channel: Channel, predicate, io: threading.Thread) -> bool:
    """``channel.wait(predicate)`` with ``io`` started once the waiter holds the lock: whatever
    ``io`` does to the channel lands while the waiter waits, so only a notify can wake it."""

    def starting_io() -> bool:
        if io.ident is None:
            io.start()
        return predicate()

    try:
        return channel.wait(starting_io, timeout=10)
    finally:
        io.join(timeout=10)


def test_wait_wakes_when_the_io_thread_applies_a_snapshot_and_the_stream_starts():
    _, channel = make_channel()
    io = threading.Thread(target=lambda: (snapshot(channel, 5, 1.0), update(channel, 5, 1.0)))
    assert waiting_for(channel, lambda: channel.ready, io) is True


def test_wait_wakes_when_an_overtaken_snapshot_attaches_the_channel():
    _, channel = make_channel()
    update(channel, 5, 1.0)
    io = threading.Thread(target=snapshot, args=(channel, 5, 1.0))
    assert waiting_for(channel, lambda: channel.ready, io) is True


def test_wait_wakes_when_the_pv_is_lost():
    _, channel, _ = attached(seq=5)
    io = threading.Thread(target=channel.lose, args=("actor died",))
    assert waiting_for(channel, lambda: not channel.connected, io) is True


def test_a_new_actors_first_reading_equal_to_the_one_held_is_not_a_new_value():
    hub, channel, listener = attached(seq=5, value=1.0)
    channel.lose("the actor owning X:a exited")
    update(channel, 1, 1.0, epoch=EPOCH + 1)  # the same value and timestamp, from a new actor
    assert [kind for kind, *_ in listener.calls] == ["meta", "meta"]  # lost, then back
    update(channel, 2, 2.0, epoch=EPOCH + 1)
    assert listener.calls[-1] == ("value", 2.0, 1.0)


# --- versions: what a subscriber has already seen ----------------------------------------------


class VersionListener(Listener):
    """Records the channel's version as each listener call sees it."""

    def on_change(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        self.calls.append((kind, channel.version, channel.value_version))


def test_every_change_listeners_hear_of_gets_the_next_version_and_both_events_of_one_share_it():
    _, channel = make_channel()
    listener = VersionListener()
    channel.add_listener(listener.on_change)
    assert (channel.version, channel.value_version, channel.previous) == (0, 0, None)
    channel.live = True
    snapshot(channel, 5, 1.0)
    update(channel, 6, 2.0)
    update(channel, 7, 2.0, metadata={"units": "m"})  # metadata only
    assert listener.calls == [("meta", 1, 1), ("value", 1, 1), ("value", 2, 2), ("meta", 3, 2)]
    assert channel.previous == reading(1.0)  # what the last new value replaced


def test_what_changes_nothing_takes_no_version():
    _, channel, _ = attached(seq=5, value=1.0)
    version = channel.version
    update(channel, 5, 3.0)  # not newer
    update(channel, 4, 3.0, epoch=EPOCH - 1)  # an older actor
    snapshot(channel, 5, 1.0)  # the same again
    assert channel.version == version


def test_losing_a_pv_takes_a_version_and_its_return_a_greater_one_at_a_lower_seq():
    _, channel, _ = attached(seq=50, value=1.0)
    before = channel.version
    channel.lose("actor died")
    assert channel.version == before + 1
    snapshot(channel, 0, 2.0, epoch=EPOCH + 1)
    assert channel.version == before + 2 and channel.value_version < before + 2  # connected; value held
    update(channel, 0, 2.0, epoch=EPOCH + 1)  # the subscription's first message: ready, value told
    assert channel.version == before + 3 and channel.value_version == before + 3
    channel.lose("again")
    channel.lose("and again")  # was not connected: nobody is told, no version
    assert channel.version == before + 4


# --- the proof schedule: which channels the hub asks again, and when ---------------------------


def schedule() -> ProofSchedule:
    return ProofSchedule(interval=0.1, timeout=5.0)


def test_an_answered_channel_that_is_not_live_is_asked_again_after_the_interval():
    proofs = schedule()
    _, channel = make_channel()
    proofs.sent(channel, 1, now=10.0)
    assert proofs.due(10.05) == ([], [])
    assert proofs.answered(channel, 1)
    snapshot(channel, 5, 1.0)  # attached, but nothing came on the subscription yet
    assert proofs.due(10.09) == ([], [])
    assert proofs.due(10.1) == ([channel], [])
    assert len(proofs) == 0  # until the hub sends again


def test_a_channel_refused_for_a_limit_asks_again_ever_later():
    # Ten times a second, a thousand such channels would spend the connection's whole
    # request budget, and the process's puts and reads would be refused for it.
    proofs = schedule()
    _, channel = make_channel()
    now = 0.0
    for request_id, wait in enumerate([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0], start=1):
        proofs.sent(channel, request_id, now)
        assert proofs.answered(channel, request_id, limited=True)
        assert proofs.due(now + wait - 1e-6) == ([], []), wait
        assert proofs.due(now + wait) == ([channel], []), wait
        now += wait
    proofs.sent(channel, 10, now)
    assert proofs.answered(channel, 10)  # anything but a limit: the interval again
    assert channel.limited == 0
    assert proofs.due(now + 0.1) == ([channel], [])


def test_a_live_and_attached_channel_is_no_longer_looked_at():
    proofs = schedule()
    _, channel = make_channel()
    proofs.sent(channel, 1, now=10.0)
    assert proofs.answered(channel, 1)
    snapshot(channel, 5, 1.0)
    channel.live = True
    assert len(proofs) == 1  # a stale entry, dropped when due
    assert proofs.due(100.0) == ([], [])
    assert len(proofs) == 0


def test_a_wake_up_pops_only_what_is_due_however_many_channels_wait():
    proofs = schedule()
    channels = [Channel(StubHub(), f"X:{i}") for i in range(10_000)]  # type: ignore[arg-type]
    for i, channel in enumerate(channels):
        proofs.sent(channel, i, now=float(i))
    assert len(proofs) == 10_000
    ask, given_up = proofs.due(5.0 + 2.5)  # timeout 5: requests sent at 0, 1 and 2 are overdue
    assert ask == channels[:3] and given_up == [(c, i) for i, c in enumerate(channels[:3])]
    assert all(c.proof_request is None for c in channels[:3])
    assert channels[3].proof_request == 3


def test_an_answer_to_a_request_given_up_or_overtaken_does_not_count():
    proofs = schedule()
    _, channel = make_channel()
    proofs.sent(channel, 1, now=0.0)
    assert proofs.due(5.0) == ([channel], [(channel, 1)])
    proofs.sent(channel, 2, now=5.0)
    assert not proofs.answered(channel, 1)
    assert channel.proof_request == 2
    assert proofs.answered(channel, 2)


def test_a_lost_pv_is_asked_for_at_once_and_its_old_answer_is_ignored():
    proofs = schedule()
    _, channel, _ = attached(seq=5)
    proofs.sent(channel, 1, now=0.0)
    channel.lose("actor died")
    proofs.lost(channel, now=1.0)
    assert not proofs.answered(channel, 1)
    assert proofs.due(1.0) == ([channel], [])


def test_a_request_that_could_not_be_sent_is_tried_again_after_the_interval():
    proofs = schedule()
    _, channel = make_channel()
    proofs.not_sent(channel, now=3.0)
    assert channel.proof_request is None
    assert proofs.due(3.05) == ([], [])
    assert proofs.due(3.1) == ([channel], [])


def test_an_outstanding_request_is_not_asked_again_before_its_timeout():
    proofs = schedule()
    _, channel = make_channel()
    proofs.not_sent(channel, now=0.0)  # due at 0.1
    proofs.sent(channel, 7, now=0.05)  # sooner entry kept; the request is outstanding then
    assert proofs.due(0.1) == ([], [])
    assert len(proofs) == 1  # looked at again when it is overdue
    assert proofs.due(5.05) == ([channel], [(channel, 7)])


def test_a_refused_pv_is_not_looked_at():
    proofs = schedule()
    _, channel = make_channel()
    channel.error = PermissionError("not allowed")
    proofs.lost(channel, now=0.0)
    assert len(proofs) == 0 and proofs.due(1.0) == ([], [])


def test_alarm_enums_are_ophyds_and_any_number_is_kept():
    from ophyd.utils.epics_pvs import AlarmSeverity, AlarmStatus

    from pvhub.client import alarms

    assert [(m.name, m.value) for m in alarms.AlarmSeverity] == [(m.name, m.value) for m in AlarmSeverity]
    assert [(m.name, m.value) for m in alarms.AlarmStatus] == [(m.name, m.value) for m in AlarmStatus]
    assert alarms.status_of(4) is alarms.AlarmStatus.HIGH and alarms.severity_of(2).name == "MAJOR"
    assert alarms.status_of(99) == 99 and alarms.severity_of(7) == 7  # an IOC's own numbers
