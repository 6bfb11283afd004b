"""A client process with many Signals: what one nobody subscribed to costs, and that the
subscriptions that exist still see every update once, in order (a real daemon and IOC)."""

from __future__ import annotations

import threading

import pytest
from helpers import callbacks_done, wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO, Hub, get_hub

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


@pytest.fixture
def writer(hub):
    """A second connection to the daemon, for puts whose dispatches do not count here."""
    other = Hub(hub.address, name="writer")
    yield other
    other.close()


def wait_for_value(signal, value, timeout=10.0):
    wait_until(lambda: signal.get() == value, timeout, message=lambda: f"{signal.name} is {signal.get()}")


def test_a_thousand_signals_nobody_subscribed_to_dispatch_nothing_per_update(hub, prefix, writer):
    signals = [EpicsSignalRO(f"{prefix}motor", name=f"m{i}") for i in range(1000)]
    for signal in signals:
        signal.wait_for_connection(timeout=15)
    motor = EpicsSignal(f"{prefix}motor", name="motor", hub=writer)
    motor.wait_for_connection(timeout=15)
    client_hub = get_hub()
    callbacks_done()
    before = client_hub.dispatches
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        motor.set(value).wait(5)
        wait_for_value(signals[0], value)
    assert client_hub.dispatches == before  # five updates, a thousand Signals: nothing queued

    # One subscription (on the values) costs one dispatch per update it is called for, its
    # first call aside; one on "meta" alone costs nothing while only values change.
    seen = []
    signals[500].subscribe(lambda value, **kwargs: seen.append(value))
    signals[600].subscribe(lambda **kwargs: None, event_type="meta", run=False)
    wait_until(lambda: seen, 5)
    callbacks_done()
    assert seen[0] == 5.0
    before, first_calls = client_hub.dispatches, len(seen)
    for value in (6.0, 7.0, 8.0):
        motor.set(value).wait(5)
        wait_for_value(signals[0], value)
    wait_until(lambda: seen[-1] == 8.0, 5)
    callbacks_done()
    assert [6.0, 7.0, 8.0] == [v for v in seen if v > 5.0][:3]
    assert client_hub.dispatches == before + (len(seen) - first_calls) + 1  # +1: callbacks_done

    # Unsubscribed again, it costs nothing again.
    signals[500].unsubscribe_all()
    signals[600].unsubscribe_all()
    callbacks_done()
    before = client_hub.dispatches
    motor.set(9.0).wait(5)
    wait_for_value(signals[0], 9.0)
    assert client_hub.dispatches == before


def test_subscriptions_made_while_updates_flow_see_each_update_once_in_order(hub, prefix, writer):
    """Every later subscription sees exactly the tail of what the first one saw, from its
    first call on: nothing twice, nothing skipped, even when it subscribes mid-stream."""
    rate = EpicsSignal(f"{prefix}fast_rate", name="rate", hub=writer)
    rate.wait_for_connection(timeout=15)
    rate.set(0).wait(5)
    signals = [EpicsSignalRO(f"{prefix}fast", name=f"fast{i}") for i in range(20)]
    for signal in signals:
        signal.wait_for_connection(timeout=15)
    seen: list[list[int]] = [[] for _ in signals]
    threads: list[set[str]] = [set() for _ in signals]

    def recorder(i):
        def record(value, **kwargs):
            seen[i].append(value)
            threads[i].add(threading.current_thread().name)
        return record

    signals[0].subscribe(recorder(0))
    wait_until(lambda: seen[0], 5)
    rate.set(200).wait(5)
    for i, signal in enumerate(signals[1:], start=1):
        wait_until(lambda: len(seen[0]) > 5 * i, 10, message="fast does not count")
        signal.subscribe(recorder(i))
    rate.set(0).wait(5)
    # Until fast has stopped (updates already on their way still come), and every callback
    # queued so far has run.
    samples: list[int] = []

    def stopped() -> bool:
        samples.append(signals[0].get())
        return len(samples) >= 5 and len(set(samples[-5:])) == 1  # unchanged for 0.4 s

    wait_until(stopped, 10, interval=0.1, message="fast did not stop")
    callbacks_done()
    last = samples[-1]
    wait_until(lambda: all(s and s[-1] == last for s in seen), 10,
               message=lambda: f"not all at {last}: {[s[-1:] for s in seen]}")
    reference = seen[0]
    assert len(reference) > 50
    assert reference == sorted(set(reference))  # counting up: in order, none twice
    for i, values in enumerate(seen[1:], start=1):
        assert values[0] in reference, f"subscription {i} began with {values[0]}, never delivered"
        start = reference.index(values[0])
        assert values == reference[start:], f"subscription {i} differs from the stream"
        assert start > 0  # it did join mid-stream
    assert all(names == {"pvhub-callbacks"} for names in threads)


def test_once_connected_no_channel_waits_for_proof(hub, prefix):
    pvs = ("dt", "x", "motor", "count", "wave", "text", "mode", "slow", "ro", "reject", "chars")
    signals = [EpicsSignalRO(f"{prefix}{pv}", name=pv) for pv in pvs]
    client_hub = get_hub()
    for signal in signals:
        signal.wait_for_connection(timeout=15)
    # Each channel is proven once its first update arrives (the snapshot it asked to be
    # published); from then on a wake-up of the I/O thread does nothing for it.
    wait_until(lambda: client_hub.unproven == 0, 10, message=lambda: f"{client_hub.unproven} unproven")
    assert all(client_hub.channel(f"{prefix}{pv}").live for pv in pvs)
