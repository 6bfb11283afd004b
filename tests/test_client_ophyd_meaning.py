"""pvhub's own ``EpicsSignal``/``EpicsSignalRO`` keep ophyd's meaning: tolerances, limits,
put completion, ``auto_monitor``, the keywords ophyd accepts (and no others), and the place of
a Signal in a device (a real daemon, the zoo IOC, and ophyd's own ``Device``)."""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO, Hub, get_hub
from pvhub.errors import StatusTimeoutError

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]


def connected(signal, timeout=15.0):
    signal.wait_for_connection(timeout=timeout)
    return signal


@pytest.fixture
def writer(hub):
    """A second connection to the daemon, to change PVs behind a Signal's back."""
    other = Hub(hub.address, name="writer")
    yield other
    other.close()


# --- keywords ----------------------------------------------------------------------------------


def test_an_unknown_keyword_is_a_type_error_everywhere(hub, prefix):
    with pytest.raises(TypeError):
        EpicsSignal(f"{prefix}motor", name="m", put_completion=True)  # misspelt
    with pytest.raises(TypeError):
        EpicsSignalRO(f"{prefix}motor", name="m", limits=True)  # a writer's keyword
    motor = connected(EpicsSignal(f"{prefix}motor", name="m"))
    ro = connected(EpicsSignalRO(f"{prefix}ro", name="ro"))
    with pytest.raises(TypeError):
        motor.get(as_strng=True)
    with pytest.raises(TypeError):
        motor.set(1.0, wait=True)
    with pytest.raises(TypeError):
        motor.put(1.0, settle_time=1)
    with pytest.raises(TypeError):
        ro.get(bogus=1)
    assert motor.get() == 0.0  # nothing was written


def test_the_keywords_ophyd_accepts_are_accepted(hub, prefix):
    motor = connected(EpicsSignal(
        f"{prefix}motor", write_pv=f"{prefix}motor", name="m", put_complete=True, limits=True,
        string=False, kind="normal", labels=["motors"], attr_name="m", tolerance=0.01,
        rtolerance=0.001, timeout=3.0, connection_timeout=10.0, write_timeout=5.0, auto_monitor=True,
    ))  # fmt: skip
    assert (motor.tolerance, motor.rtolerance, motor.use_limits, motor.put_complete) == (0.01, 0.001, True, True)
    assert motor.get(count=None, as_string=False, timeout=2.0, connection_timeout=2.0, form="time",
                     use_monitor=True) == 0.0
    motor.put(1.0, force=False, connection_timeout=5.0, callback=None, use_complete=True, timeout=5.0, wait=True)
    motor.set(2.0, timeout=5.0, settle_time=0.0).wait(5)
    assert motor.get() == 2.0
    wave = connected(EpicsSignalRO(f"{prefix}wave", name="wave"))
    assert list(wave.get(count=3)) == [0.0, 1.0, 2.0]


# --- limits ------------------------------------------------------------------------------------


def test_limits_true_raises_ophyds_limit_error_and_writes_nothing(hub, prefix):
    from ophyd.utils import LimitError

    motor = connected(EpicsSignal(f"{prefix}motor", name="m", limits=True))
    assert motor.limits == (-10.0, 10.0)
    with pytest.raises(LimitError, match=r"outside of range: \[-10.0, 10.0\]"):
        motor.set(10.5)
    with pytest.raises(LimitError):
        motor.put(-11)
    with pytest.raises(ValueError):  # LimitError is a ValueError, as in ophyd
        motor.set(100)
    with pytest.raises(ValueError, match="None"):
        motor.set(None)
    motor.set(10.0).wait(5)  # the limit itself is inside
    assert motor.get() == 10.0
    # Without limits=True the value goes to the IOC, which refuses it itself.
    free = connected(EpicsSignal(f"{prefix}motor", name="free"))
    with pytest.raises(Exception) as info:
        free.set(10.5).wait(5)
    assert not isinstance(info.value, LimitError)
    assert motor.get() == 10.0


def test_empty_limits_check_nothing(hub, prefix):
    count = connected(EpicsSignal(f"{prefix}count", name="count", limits=True))
    assert count.limits == (0, 0)
    count.set(123).wait(5)
    assert count.get() == 123


# --- when a set is done ------------------------------------------------------------------------


def test_with_a_tolerance_a_set_waits_for_the_readback_after_completion(hub, prefix, writer):
    # Reads count, writes motor: the put completes at once, the readback follows only when
    # count is changed (from elsewhere).
    pair = connected(EpicsSignal(f"{prefix}count", write_pv=f"{prefix}motor", name="pair", tolerance=0.5))
    count = connected(EpicsSignal(f"{prefix}count", name="count", hub=writer))
    status = pair.set(3.2)
    wait_until(lambda: connected(EpicsSignalRO(f"{prefix}motor", name="m", hub=writer)).get() == 3.2, 5)
    time.sleep(0.3)  # the put is complete; the readback is 0: the set must not be done
    assert not status.done
    count.set(3).wait(5)  # within 0.5 of 3.2
    status.wait(5)
    assert status.success

    # Never within tolerance: the set's timeout fails it.
    started = time.monotonic()
    status = pair.set(7.0, timeout=1.0)
    with pytest.raises(StatusTimeoutError):
        status.wait(5)
    assert 0.9 < time.monotonic() - started < 3.0


def test_rtolerance_alone_also_waits_for_the_readback(hub, prefix, writer):
    pair = connected(EpicsSignal(f"{prefix}count", write_pv=f"{prefix}motor", name="pair", rtolerance=0.1))
    count = connected(EpicsSignal(f"{prefix}count", name="count", hub=writer))
    status = pair.set(9.5, timeout=10)
    time.sleep(0.3)
    assert not status.done
    count.set(9).wait(5)  # |9.5 - 9| <= 1e-8 + 0.1 * 9
    status.wait(5)
    assert status.success


def test_without_a_tolerance_a_set_is_done_on_completion(hub, prefix):
    pair = connected(EpicsSignal(f"{prefix}count", write_pv=f"{prefix}motor", name="pair"))
    pair.set(4.0).wait(5)  # the readback (count) never changes: completion decides
    assert pair.get() == 0


def test_put_complete_false_is_done_when_the_readback_is_there_not_at_completion(hub, prefix):
    delay = connected(EpicsSignal(f"{prefix}slow_delay", name="delay"))
    delay.set(3.0).wait(5)
    # Writes slow (completes after 3 s), reads count, which is 0 already.
    early = connected(EpicsSignal(f"{prefix}count", write_pv=f"{prefix}slow", name="early", put_complete=False))
    started = time.monotonic()
    early.set(0).wait(5)
    assert time.monotonic() - started < 1.5
    # The same with put completion waits for the IOC.
    late = connected(EpicsSignal(f"{prefix}count", write_pv=f"{prefix}slow", name="late"))
    started = time.monotonic()
    late.set(0).wait(10)
    assert time.monotonic() - started >= 2.5


def test_put_complete_false_uses_the_precision_as_tolerance(hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="m", put_complete=False))
    assert motor.tolerance == pytest.approx(0.001)  # precision 3
    motor.set(1.25).wait(5)
    assert motor.get() == 1.25
    mode = connected(EpicsSignal(f"{prefix}mode", name="mode", string=True, put_complete=False))
    mode.set("Auto").wait(5)  # an enum compares by label
    assert mode.get() == "Auto"


def test_put_returns_at_once_and_its_callback_comes_with_completion(hub, prefix):
    delay = connected(EpicsSignal(f"{prefix}slow_delay", name="delay"))
    delay.set(1.5).wait(5)
    slow = connected(EpicsSignal(f"{prefix}slow", name="slow"))
    done = []
    started = time.monotonic()
    slow.put(2.0, use_complete=True, callback=lambda: done.append(time.monotonic() - started))
    assert time.monotonic() - started < 0.5 and not done
    wait_until(lambda: done, 10)
    assert done[0] >= 1.2
    started = time.monotonic()
    slow.put(3.0, use_complete=False)
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    slow.put(4.0, wait=True, timeout=10)
    assert time.monotonic() - started >= 1.2
    assert slow.get() == 4.0


# --- auto_monitor ------------------------------------------------------------------------------


def test_auto_monitor_false_asks_the_daemon_on_every_get(hub, prefix, writer, monkeypatch):
    monitored = connected(EpicsSignalRO(f"{prefix}count", name="monitored"))
    asking = connected(EpicsSignalRO(f"{prefix}count", name="asking", auto_monitor=False))
    client_hub = get_hub()
    requests = []
    original = client_hub.request

    def counting(build, handler=None, **kwargs):
        requests.append(build(0))
        return original(build, handler, **kwargs)

    monkeypatch.setattr(client_hub, "request", counting)
    assert monitored.get() == 0 and monitored.read()["monitored"]["value"] == 0
    assert requests == []  # from the channel's copy
    assert asking.get() == 0
    assert asking.read()["asking"]["value"] == 0
    assert [type(r).__name__ for r in requests] == ["ReadRequest", "ReadRequest"]
    assert all(r.pv == f"{prefix}count" and not r.publish for r in requests)
    assert monitored.get(use_monitor=False) == 0  # per call, as ophyd's use_monitor
    assert len(requests) == 3
    connected(EpicsSignal(f"{prefix}count", name="c", hub=writer)).set(5).wait(5)
    assert asking.get() in (0, 5)  # the daemon's actor may not have seen it yet...
    wait_until(lambda: asking.get() == 5, 5)  # ...but a fresh read does without any monitor


# --- a Signal in a device ----------------------------------------------------------------------


def test_ophyds_device_builds_pvhub_signals_with_their_place_in_it(hub, prefix):
    from ophyd import Component as Cpt
    from ophyd import Device

    class Stage(Device):
        motor = Cpt(EpicsSignal, "motor", limits=True, tolerance=0.01, labels={"motors"})
        ro = Cpt(EpicsSignalRO, "ro", kind="config")

    class Beamline(Device):
        table = Cpt(Stage, "")

    beamline = Beamline(prefix, name="bl")
    beamline.wait_for_connection(timeout=15)
    motor = beamline.table.motor
    assert isinstance(motor, EpicsSignal)
    assert motor.name == "bl_table_motor"
    assert motor.attr_name == "motor"
    assert motor.dotted_name == "table.motor"
    assert motor.parent is beamline.table and motor.root is beamline
    assert motor._ophyd_labels_ == {"motors"}
    assert "bl_table_motor" in beamline.read()
    assert "bl_table_ro" in beamline.read_configuration()
    beamline.table.motor.set(2.5).wait(5)
    assert beamline.table.motor.get() == 2.5
    from ophyd.utils import LimitError

    with pytest.raises(LimitError):
        motor.set(11)
    alone = EpicsSignalRO(f"{prefix}ro", name="alone")
    assert (alone.dotted_name, alone.attr_name, alone.parent, alone._ophyd_labels_) == ("", "", None, set())
