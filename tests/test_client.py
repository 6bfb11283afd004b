"""The client library against a real daemon and a real IOC: what ophyd users expect."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from bluesky.protocols import Configurable, Movable, Readable, Subscribable, check_supports
from helpers import callbacks_done, wait_for_put_in_flight, wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO, Status, get_hub, wait
from pvhub.errors import (
    BadValueError,
    ConnectionTimeoutError,
    PutFailedError,
    ReadOnlyError,
    StatusTimeoutError,
)

pytestmark = pytest.mark.system


def connected(signal, timeout=15.0):
    signal.wait_for_connection(timeout=timeout)
    return signal


def test_tutorial_direct_use(hub, prefix):
    time_delta = connected(EpicsSignal(f"{prefix}dt", name="time_delta"))
    x = connected(EpicsSignalRO(f"{prefix}x", name="x"))

    reading = time_delta.read()
    assert list(reading) == ["time_delta"]
    assert reading["time_delta"]["value"] == 3.0
    assert reading["time_delta"]["timestamp"] > 1e9

    assert time_delta.describe() == {
        "time_delta": {
            "source": f"PV:{prefix}dt",
            "dtype": "number",
            "shape": [],
            "units": "",
            "lower_ctrl_limit": 0.0,
            "upper_ctrl_limit": 0.0,
            "precision": 0,
        }
    }
    time_delta.set(10).wait()
    assert time_delta.get() == 10.0
    time_delta.set(10).wait(timeout=1)
    status = time_delta.set(5)
    status.wait(timeout=1)
    assert status.done and status.success
    assert time_delta.read()["time_delta"]["value"] == 5.0

    status1 = time_delta.set(1)
    status2 = EpicsSignal(f"{prefix}motor", name="motor").set(1)
    wait(status1, status2, timeout=5)
    assert status1.success and status2.success

    assert isinstance(x.get(), float)


def test_signals_satisfy_bluesky_protocols(hub, prefix):
    rw = connected(EpicsSignal(f"{prefix}dt", name="rw"))
    ro = connected(EpicsSignalRO(f"{prefix}x", name="ro"))
    for signal in (rw, ro):
        check_supports(signal, Readable)
        check_supports(signal, Movable)
        check_supports(signal, Subscribable)
        check_supports(signal, Configurable)
    assert rw.hints == {"fields": ["rw"]}
    assert rw.read_configuration() == rw.read()
    assert rw.describe_configuration() == rw.describe()
    assert rw.trigger().done


def test_metadata_of_a_motor_like_pv(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    assert motor.units == "mm"
    assert motor.precision == 3
    assert motor.limits == (-10.0, 10.0)
    assert motor.enum_strs is None
    assert motor.connected and motor.write_access and motor.read_access
    desc = motor.describe()["m"]
    assert desc["units"] == "mm" and desc["precision"] == 3
    assert (desc["lower_ctrl_limit"], desc["upper_ctrl_limit"]) == (-10.0, 10.0)


def test_subscription_gets_current_value_then_updates(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    calls = []
    event = threading.Event()

    def accumulate(value, old_value, timestamp, sub_type, obj, **kwargs):
        calls.append((value, old_value, sub_type, obj, threading.current_thread().name))
        if value == 2.5:
            event.set()

    cid = motor.subscribe(accumulate)
    assert isinstance(cid, int)
    wait_until(lambda: calls, 5, message="no initial callback")
    motor.set(2.5).wait(5)
    assert event.wait(5)
    assert calls[0][0] == 0.0 and calls[0][2] == "value" and calls[0][3] is motor
    assert calls[-1][:2] == (2.5, 0.0)
    assert all(name == "pvhub-callbacks" for *_, name in calls)

    motor.unsubscribe(cid)
    before = len(calls)
    motor.set(3.5).wait(5)
    assert motor.get() == 3.5
    # A second subscription sees 3.5 first: anything the first one got after unsubscribing
    # would have been delivered before this one.
    seen = []
    motor.subscribe(lambda value, **kw: seen.append(value))
    wait_until(lambda: seen, 5)
    assert seen[0] == 3.5
    assert len(calls) == before


def test_clear_sub_and_meta_callbacks(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    values, metas = [], []

    def cb(value, **kwargs):
        values.append(value)

    motor.subscribe(cb, run=False)
    motor.subscribe(lambda **kw: metas.append(kw), event_type="meta")
    wait_until(lambda: metas, 5, message="no meta callback")
    assert metas[0]["connected"] is True and metas[0]["units"] == "mm"
    assert metas[0]["sub_type"] == "meta"
    motor.set(1.25).wait(5)
    wait_until(lambda: 1.25 in values, 5)
    assert values == [1.25]  # run=False: no initial call
    motor.clear_sub(cb)
    motor.set(0.5).wait(5)
    other = []
    motor.subscribe(lambda value, **kw: other.append(value))
    wait_until(lambda: other, 5)
    assert values == [1.25]


def test_waveform(hub, prefix):
    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    value = wave.get()
    assert isinstance(value, np.ndarray)
    assert value.shape == (16,)
    np.testing.assert_array_equal(value, np.arange(16.0))
    desc = wave.describe()["wave"]
    assert desc["dtype"] == "array" and desc["shape"] == [16]
    wave.set(np.linspace(0, 1, 16)).wait(5)
    np.testing.assert_allclose(wave.get(), np.linspace(0, 1, 16))
    with pytest.raises(BadValueError):
        wave.set(np.zeros(17)).wait(5)


def test_an_empty_waveform_is_a_value_like_any_other(hub, prefix):
    # An IOC may post an array of no elements (a waveform whose NORD is 0). Such a monitor
    # update once broke the actor's circuit: every PV of the IOC went disconnected.
    empty = connected(EpicsSignalRO(f"{prefix}empty", name="empty"))  # none from the start
    assert empty.get().shape == (0,)
    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    x = connected(EpicsSignalRO(f"{prefix}x", name="x"))
    lost = []
    x.subscribe(lambda **kw: lost.append(kw) if not kw["connected"] else None, event_type="meta", run=False)
    seen = []
    wave.subscribe(lambda value, **kw: seen.append(value), run=False)
    wave.set(np.array([], dtype=float)).wait(5)
    assert wave.get().shape == (0,)
    wait_until(lambda: any(len(v) == 0 for v in seen), 5)
    wave.set(np.arange(3.0)).wait(5)  # the circuit still carries puts and monitors
    wait_until(lambda: len(seen[-1]) == 3, 5)
    np.testing.assert_array_equal(wave.get(), np.arange(3.0))
    assert x.connected and wave.connected and not lost


def test_a_slow_callback_gets_the_newest_value_not_an_endless_queue(zoo_ioc, hub, prefix):
    # The callback queue is bounded (dispatcher.py Rule 5): past the bound, a reading takes
    # the place of its Signal's reading still waiting, so a callback slower than its PV
    # falls behind by at most the bound and still ends on the newest value.
    rate = connected(EpicsSignal(f"{prefix}fast_rate", name="rate"))
    fast = connected(EpicsSignalRO(f"{prefix}fast", name="fast"))
    get_hub()._dispatcher.max_backlog = 20  # small, so that a few seconds reach it
    seen: list[int] = []

    def slow(value, **kwargs):
        seen.append(value)
        time.sleep(0.01)  # 100 a second, against the IOC's 500

    rate.set(500.0).wait(5)
    fast.subscribe(slow)
    wait_until(lambda: get_hub().merged > 100, 20)
    rate.set(0.0).wait(5)
    # Once the IOC has stopped counting, its value is the newest there will be.
    wait_until(lambda: seen[-1] == zoo_ioc.read("fast").data[0], 10)
    callbacks_done()
    assert seen[-1] == fast.get() == zoo_ioc.read("fast").data[0]
    assert all(a < b for a, b in zip(seen, seen[1:]))  # fewer values, still in order
    assert len(seen) < seen[-1] - seen[0]  # some were merged away


def test_string_pv(hub, prefix):
    text = connected(EpicsSignal(f"{prefix}text", name="text"))
    assert text.get() == "hello"
    assert text.describe()["text"]["dtype"] == "string"
    text.set("goodbye").wait(5)
    assert text.get() == "goodbye"
    with pytest.raises(BadValueError, match="39 bytes"):
        text.set("x" * 60).wait(5)


def test_enum_numbers_and_labels(hub, prefix):
    mode = connected(EpicsSignal(f"{prefix}mode", name="mode"))
    label = connected(EpicsSignal(f"{prefix}mode", name="label", string=True))
    assert mode.get() == 0
    assert label.get() == "Off"
    assert mode.enum_strs == ("Off", "On", "Auto")
    assert label.describe()["label"]["enum_strs"] == ("Off", "On", "Auto")
    assert label.describe()["label"]["dtype"] == "string"
    assert mode.describe()["mode"]["dtype"] == "integer"
    label.set("Auto").wait(5)
    assert mode.get() == 2
    wait_until(lambda: label.get() == "Auto", 5)
    mode.set(1).wait(5)
    assert label.get() == "On"
    with pytest.raises(BadValueError):
        label.set("Sideways").wait(5)
    with pytest.raises(BadValueError):
        mode.set(7).wait(5)


def test_slow_put_times_out_the_wait_but_completes(hub, prefix):
    delay = connected(EpicsSignal(f"{prefix}slow_delay", name="delay"))
    delay.set(1.5).wait(5)
    slow = connected(EpicsSignal(f"{prefix}slow", name="slow"))
    status = slow.set(7)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        status.wait(timeout=0.5)
    assert isinstance(info.value, StatusTimeoutError)
    assert 0.4 < time.monotonic() - started < 1.4
    assert not status.done
    status.wait(timeout=10)
    assert status.success
    assert slow.get() == 7.0


def test_status_callbacks_and_and(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    dt = connected(EpicsSignal(f"{prefix}dt", name="dt"))
    done = threading.Event()
    both = motor.set(2) & dt.set(2)
    both.add_callback(lambda st: done.set())
    assert done.wait(5)
    assert both.success and both.exception() is None


def test_write_refused_by_ioc_fails_fast(hub, prefix):
    ro = connected(EpicsSignal(f"{prefix}ro", name="ro"))
    assert not ro.write_access
    started = time.monotonic()
    status = ro.set(3)
    with pytest.raises(ReadOnlyError):
        status.wait(5)
    assert time.monotonic() - started < 2
    assert isinstance(status.exception(), PermissionError)
    assert ro.get() == 1.5

    reject = connected(EpicsSignal(f"{prefix}reject", name="reject"))
    status = reject.set(-1)
    with pytest.raises(PutFailedError):
        status.wait(5)
    reject.set(4).wait(5)
    assert reject.get() == 4.0


def test_wrong_type_is_a_clear_error_and_changes_nothing(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    count = connected(EpicsSignal(f"{prefix}count", name="count"))
    with pytest.raises(BadValueError, match="not a number"):
        motor.set("fast").wait(5)
    with pytest.raises(BadValueError, match="not a number"):
        count.set("two").wait(5)
    count.set(2.7).wait(5)  # truncated, as Channel Access and ophyd convert it
    assert count.get() == 2
    status = motor.set(object())
    with pytest.raises(Exception) as info:
        status.wait(5)
    assert "cannot" in str(info.value)
    assert motor.get() == 0.0
    motor.set("1.5").wait(5)  # caput-style text that is a number is fine
    assert motor.get() == 1.5


def test_read_only_signal_refuses_set(hub, prefix):
    x = connected(EpicsSignalRO(f"{prefix}dt", name="x"))
    with pytest.raises(ReadOnlyError):
        x.set(1)
    with pytest.raises(PermissionError):
        x.put(1)
    assert x.get() == 3.0


def test_pv_that_nobody_serves_times_out(hub, prefix):
    ghost = EpicsSignal(f"{prefix}no_such_pv", name="ghost", connection_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        ghost.wait_for_connection(timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5
    assert isinstance(info.value, ConnectionTimeoutError)
    assert f"{prefix}no_such_pv" in str(info.value)
    assert not ghost.connected
    with pytest.raises(TimeoutError):
        ghost.read()


def test_daemon_that_does_not_answer(monkeypatch):
    from pvhub.testing import free_tcp_port

    monkeypatch.setenv("PVHUB_ADDRESS", f"tcp://127.0.0.1:{free_tcp_port()}")
    try:
        signal = EpicsSignal("nothing:here", name="s")
        with pytest.raises(TimeoutError, match="did not answer"):
            signal.wait_for_connection(timeout=0.5)
    finally:
        from pvhub.client import close_hubs

        close_hubs()


def test_put_with_wait_and_status_type(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    assert motor.put(4.5, wait=True, timeout=5) is None
    assert motor.get() == 4.5
    assert isinstance(motor.set(1), Status)


def test_write_pv_different_from_read_pv(hub, prefix):
    sig = EpicsSignal(f"{prefix}count", write_pv=f"{prefix}motor", name="pair")
    connected(sig)
    sig.set(2).wait(5)
    assert sig.describe()["pair"]["source"] == f"PV:{prefix}count"
    assert connected(EpicsSignal(f"{prefix}motor", name="m")).get() == 2.0


def test_signals_are_not_kept_alive_by_their_channel_unless_subscribed(hub, prefix):
    import gc
    import weakref

    first = connected(EpicsSignal(f"{prefix}motor", name="m"))
    gone = weakref.ref(first)
    del first
    callbacks_done()  # a callback still queued for it holds it until it has run
    gc.collect()
    assert gone() is None

    seen = []
    kept = connected(EpicsSignal(f"{prefix}motor", name="m2"))
    kept.subscribe(lambda value, **kw: seen.append(value))
    kept_ref = weakref.ref(kept)
    del kept
    gc.collect()
    assert kept_ref() is not None  # its subscription keeps it, as in ophyd
    EpicsSignal(f"{prefix}motor", name="m3").set(6.5).wait(5)
    wait_until(lambda: 6.5 in seen, 5)
    kept_ref().unsubscribe_all()
    callbacks_done()
    gc.collect()
    assert kept_ref() is None


def test_closing_the_hub_answers_what_is_in_flight(hub, prefix):
    from pvhub.client import close_hubs
    from pvhub.errors import HubUnavailableError

    delay = connected(EpicsSignal(f"{prefix}slow_delay", name="delay"))
    delay.set(30).wait(5)
    slow = connected(EpicsSignal(f"{prefix}slow", name="slow"))
    status = slow.set(1)
    wait_for_put_in_flight(hub, f"{prefix}slow")
    close_hubs()
    with pytest.raises(HubUnavailableError, match="closed; the outcome is unknown"):
        status.wait(5)
    with pytest.raises(ConnectionError):
        slow.set(2).wait(5)  # a closed connection refuses at once


def test_closing_the_hub_answers_what_it_has_not_sent_yet(hub, prefix):
    from pvhub.client import close_hubs, get_hub
    from pvhub.errors import HubUnavailableError

    slow = connected(EpicsSignal(f"{prefix}slow", name="slow"))
    # Hold the I/O thread, so that the put is queued for it but not sent when the hub closes.
    held, holding = threading.Event(), threading.Event()
    client_hub = get_hub()
    client_hub._call_soon(lambda: holding.set() or held.wait(10))
    assert holding.wait(5)
    status = slow.set(1)
    closer = threading.Thread(target=close_hubs)
    closer.start()
    wait_until(lambda: client_hub.closed, 5)
    held.set()
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(HubUnavailableError, match="closed; the request was not sent"):
        status.wait(5)


def test_a_set_waited_for_inside_a_subscription_callback_finishes(hub, prefix):
    """Subscription callbacks run on the callback thread; a Status is finished for its
    waiters by the I/O thread, so waiting inside a callback does not wait on itself."""
    count = connected(EpicsSignal(f"{prefix}count", name="count"))
    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    outcome: list = []
    done = threading.Event()

    def on_value(value, **kwargs):
        if done.is_set():
            return
        try:
            motor.set(2.5).wait(5)
            motor.put(3.5, wait=True, timeout=5)
            outcome.append(motor.get())
        except Exception as exc:  # the test reports it below
            outcome.append(exc)
        done.set()

    count.subscribe(on_value)
    assert done.wait(15), "the callback never finished"
    assert outcome == [3.5]


def test_a_float_as_string_is_written_at_the_pvs_precision(hub, prefix):
    # As ophyd (through pyepics) writes it: motor has PREC 3.
    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    motor.set(1.5).wait(5)
    assert motor.get(as_string=True) == "1.500"
    assert connected(EpicsSignal(f"{prefix}motor", name="m2", string=True)).get() == "1.500"


def test_an_array_as_string_is_what_ophyd_gives_through_pyepics(hub, prefix):
    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    assert wave.get(as_string=True) == "<array size=16, type=time_double>"
    assert isinstance(wave.get(), np.ndarray)
    assert connected(EpicsSignal(f"{prefix}chars", name="chars")).get(as_string=True) == "abc"


@pytest.mark.timeout(60)
def test_a_value_callback_gets_what_ophyds_epics_signal_gives_it(hub, prefix):
    """ophyd's EpicsSignal passes its value callbacks the PV's metadata besides the reading,
    and alarm status and severity as ``AlarmStatus``/``AlarmSeverity`` (subscriptions.py,
    Rule 3): a callback that names ``units`` or reads ``severity.name`` runs unchanged."""
    from pvhub.client.alarms import AlarmSeverity, AlarmStatus

    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    mode = connected(EpicsSignal(f"{prefix}mode", name="mode"))
    seen: list[dict] = []
    motor.subscribe(lambda **kwargs: seen.append(kwargs))
    mode.subscribe(lambda **kwargs: seen.append(kwargs))
    motor.set(1.25).wait(10)
    mode.set("Auto").wait(10)
    wait_until(lambda: any(k.get("value") == 1.25 for k in seen) and any(k.get("value") == 2 for k in seen), 10)
    moved = next(k for k in seen if k.get("value") == 1.25)
    assert (moved["units"], moved["precision"]) == ("mm", 3)
    assert (moved["lower_ctrl_limit"], moved["upper_ctrl_limit"]) == (-10.0, 10.0)
    assert type(moved["status"]) is AlarmStatus and type(moved["severity"]) is AlarmSeverity
    assert moved["severity"].name == "NO_ALARM"
    assert "enum_strs" not in moved
    switched = next(k for k in seen if k.get("value") == 2)
    assert switched["enum_strs"] == ("Off", "On", "Auto")
    metadata = mode.metadata
    assert type(metadata["status"]) is AlarmStatus and type(metadata["severity"]) is AlarmSeverity
    assert metadata["enum_strs"] == ("Off", "On", "Auto")
