"""pyepics' script API (``pvhub.client.epics``) against a real daemon and IOC."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import callbacks_done, wait_until

from pvhub.client import epics
from pvhub.errors import BadValueError, ReadOnlyError

pytestmark = pytest.mark.system


@pytest.fixture(autouse=True)
def fresh_cache(hub):
    """Each test's PVs are its own (the cache is per process, the daemon per test)."""
    epics.clear_pv_cache()
    yield
    epics.clear_pv_cache()


@pytest.mark.timeout(60)
def test_caput_wait_then_caget(prefix):
    assert epics.caput(prefix + "motor", 1.5, wait=True) == 1
    assert epics.caget(prefix + "motor") == 1.5
    assert epics.caget(prefix + "motor", use_monitor=False) == 1.5
    assert epics.caget(prefix + "motor", as_string=True) == "1.500"  # at the PV's precision


@pytest.mark.timeout(60)
def test_caget_of_each_kind(prefix):
    assert epics.caget(prefix + "mode") == 0
    assert epics.caget(prefix + "mode", as_string=True) == "Off"
    assert epics.caget(prefix + "text") == "hello"
    assert epics.caget(prefix + "chars", as_string=True) == "abc"
    wave = epics.caget(prefix + "wave")
    assert isinstance(wave, np.ndarray) and np.array_equal(wave, np.arange(16.0))
    assert epics.caget(prefix + "wave", count=4).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert epics.caget(prefix + "wave", as_numpy=False) == list(np.arange(16.0))
    assert epics.caget(prefix + "wave", as_string=True) == "<array size=16, type=time_double>"


@pytest.mark.timeout(60)
def test_caput_of_labels_and_text(prefix):
    assert epics.caput(prefix + "mode", "Auto", wait=True) == 1
    assert epics.caget(prefix + "mode") == 2
    assert epics.caput(prefix + "chars", "xyz", wait=True) == 1
    assert epics.caget(prefix + "chars", as_string=True) == "xyz"


@pytest.mark.timeout(60)
def test_many_pvs_at_once(prefix):
    names = [prefix + "motor", prefix + "count", prefix + "reject"]
    assert epics.caput_many(names, [1.5, 7, 2.0], wait="all") == [1, 1, 1]
    assert epics.caget_many(names) == [1.5, 7, 2.0]
    # A put the IOC fails is -1 when waited for; the others still go, in order.
    assert epics.caput_many(names, [2.5, 8, -1.0], wait="all", put_timeout=10) == [1, 1, -1]
    assert epics.caput_many(names, [3.5, 9, -2.0], wait="each", put_timeout=10) == [1, 1, -1]
    assert epics.caget_many(names)[:2] == [3.5, 9]
    assert epics.caput_many(names[:2], [4.5, 10]) == [1, 1]  # sent, not waited for
    wait_until(lambda: epics.caget_many(names[:2]) == [4.5, 10], 10)
    # One that never connects is None, and costs the connection timeout once, not per PV.
    started = time.monotonic()
    missing = [prefix + "nothing_here", prefix + "nor_here"]
    assert epics.caget_many([*missing, prefix + "text"], connection_timeout=1.0) == [None, None, "hello"]
    assert time.monotonic() - started < 2.5
    with pytest.raises(ValueError):
        epics.caput_many(names, [1.0])


@pytest.mark.timeout(60)
def test_caput_many_waiting_for_all_ends_a_put_whose_outcome_became_unknown(prefix, hub):
    """A daemon lost mid-put ends the wait for that put (-1) at once, not after
    ``put_timeout``: pyepics' put callback is never called then, so that is not what
    ``caput_many`` waits on."""
    names = [prefix + "slow", prefix + "motor"]
    assert epics.caput(prefix + "slow_delay", 30.0, wait=True) == 1
    results: list[list[int]] = []
    putting = threading.Thread(
        target=lambda: results.append(epics.caput_many(names, [1.0, 2.5], wait="all", put_timeout=40)))
    putting.start()
    # Both puts went (the motor's completes at once, the slow one is under way).
    wait_until(lambda: epics.caget(prefix + "motor", use_monitor=False) == 2.5, 10)
    started = time.monotonic()
    hub.process.kill()  # no goodbye: the client finds out by itself
    putting.join(20)
    assert not putting.is_alive(), "caput_many still waits for a put whose outcome is unknown"
    assert results == [[-1, 1]]
    assert time.monotonic() - started < 20


@pytest.mark.timeout(60)
def test_get_with_metadata_from_the_monitor_holds_every_field_as_pyepics(prefix):
    """pyepics answers from its monitor with a copy of all it holds: code that reads
    ``get_with_metadata()["units"]`` runs unchanged."""
    pv = epics.PV(prefix + "motor")
    assert pv.wait_for_connection(15)
    assert pv.auto_monitor is True  # as pyepics decides at connection
    md = pv.get_with_metadata()
    assert md["value"] == pv.get() and md["units"] == "mm" and md["precision"] == 3
    assert (md["lower_ctrl_limit"], md["upper_ctrl_limit"]) == (-10.0, 10.0)
    assert md["type"] == "time_double" and md["count"] == 1 and md["host"].startswith("127.0.0.1:")
    assert {"timestamp", "posixseconds", "nanoseconds", "status", "severity", "char_value",
            "read_access", "write_access"} <= md.keys()
    assert pv.get_with_metadata(as_string=True)["value"] == md["char_value"]
    # A fresh read, or another form, gives that read's fields, as pyepics' does.
    fresh = pv.get_with_metadata(use_monitor=False)
    assert "units" not in fresh and {"value", "timestamp", "status", "severity"} <= fresh.keys()


def test_time_fields_come_from_a_fresh_read(prefix):
    pv = epics.PV(prefix + "motor")
    assert pv.wait_for_connection(15)
    assert epics.caput(prefix + "motor", 3.25, wait=True) == 1
    timevars = pv.get_timevars()
    assert set(timevars) == {"status", "severity", "timestamp", "posixseconds", "nanoseconds"}
    assert abs(timevars["timestamp"] - time.time()) < 60 and timevars["severity"] == 0


def test_pyepics_constants_and_poll():
    assert (epics.NO_ALARM, epics.MINOR_ALARM, epics.MAJOR_ALARM, epics.INVALID_ALARM) == (0, 1, 2, 3)
    started = time.monotonic()
    assert epics.poll(evt=0.05) == 1
    assert time.monotonic() - started >= 0.05  # a polling loop waits, as pend_event does


@pytest.mark.timeout(60)
def test_control_fields_are_those_of_the_pvs_type(prefix):
    """pyepics' get_ctrlvars holds what a DBR_CTRL read of the type holds, no more."""
    limits = {"upper_disp_limit", "lower_disp_limit", "upper_alarm_limit", "lower_alarm_limit",
              "upper_warning_limit", "lower_warning_limit", "upper_ctrl_limit", "lower_ctrl_limit"}
    alarm = {"status", "severity"}
    expected = {
        "motor": limits | alarm | {"units", "precision"},
        "count": limits | alarm | {"units"},
        "mode": alarm | {"enum_strs"},
        "text": alarm,
    }
    for name, keys in expected.items():
        pv = epics.PV(prefix + name)
        assert pv.wait_for_connection(15)
        assert set(pv.get_with_metadata(form="ctrl")) == keys | {"value"}, name
        if name == "text":  # pyepics gives a string's time fields here
            keys = keys | {"timestamp", "posixseconds", "nanoseconds"}
        assert set(pv.get_ctrlvars()) == keys, name
    assert epics.PV(prefix + "mode").get_ctrlvars()["enum_strs"] == ("Off", "On", "Auto")


@pytest.mark.timeout(60)
def test_a_pv_counts_the_elements_of_its_latest_value(prefix):
    """pyepics' ``count`` is the element count of the latest update (a waveform's NORD);
    ``nelm`` is the most the PV holds."""
    wave = epics.PV(prefix + "wave")
    assert wave.wait_for_connection(15)
    wait_until(lambda: wave.count == 16, 10, message=lambda: f"count {wave.count}")
    assert wave.nelm == 16 and wave.type == "time_double"
    counts = []
    wave.add_callback(lambda count, **kw: counts.append(count))
    assert wave.put([1.0, 2.0, 3.0], wait=True) == 1
    wait_until(lambda: 3 in counts, 10, message=lambda: f"counts {counts}")
    assert (wave.count, wave.nelm) == (3, 16)
    assert epics.PV(prefix + "wave", count=2).count <= 2


@pytest.mark.timeout(60)
def test_caput_without_wait_returns_before_completion(prefix):
    epics.caput(prefix + "slow_delay", 1.0, wait=True)
    pv = epics.PV(prefix + "slow")
    assert pv.wait_for_connection(15)
    pv.put(3.0, use_complete=True)
    assert pv.put_complete is False  # the IOC takes a second to complete it
    wait_until(lambda: pv.put_complete, 10)
    assert pv.get() == 3.0


@pytest.mark.timeout(60)
def test_caput_wait_times_out_as_pyepics(prefix):
    epics.caput(prefix + "slow_delay", 2.0, wait=True)
    assert epics.caput(prefix + "slow", 4.0, wait=True, timeout=0.2) == -1
    wait_until(lambda: epics.caget(prefix + "slow", use_monitor=False) == 4.0, 10)


@pytest.mark.timeout(60)
def test_a_float_put_to_an_integer_pv_is_truncated_as_over_ca(prefix):
    assert epics.caput(prefix + "count", 3.7, wait=True) == 1
    assert epics.caget(prefix + "count") == 3
    assert epics.caput(prefix + "count", -2.5, wait=True) == 1
    assert epics.caget(prefix + "count", use_monitor=False) == -2
    assert epics.caput(prefix + "mode", 1.0, wait=True) == 1
    assert epics.caget(prefix + "mode", as_string=True) == "On"


@pytest.mark.timeout(60)
def test_refused_puts_raise(prefix):
    with pytest.raises(ReadOnlyError):
        epics.caput(prefix + "ro", 2.0)
    with pytest.raises(BadValueError):
        epics.caput(prefix + "mode", "Sideways")


@pytest.mark.timeout(60)
def test_unknown_pv_gives_none():
    assert epics.caget("no:such:pv", connection_timeout=0.5) is None
    assert epics.caput("no:such:pv", 1.0, connection_timeout=0.5) is None


@pytest.mark.timeout(60)
def test_camonitor_writes_each_update_until_cleared(prefix):
    lines = []
    epics.camonitor(prefix + "count", writer=lines.append)
    for n in (1, 2, 3):
        epics.caput(prefix + "count", n, wait=True)
    # The value it had may come first, from the monitor's start: wait for the last put's.
    wait_until(lambda: lines and lines[-1].split()[-1] == "3", 10, message=lambda: f"lines {lines}")
    assert [line.split()[-1] for line in lines[-3:]] == ["1", "2", "3"]
    assert all(line.startswith(prefix + "count ") for line in lines)
    epics.camonitor_clear(prefix + "count")
    before = len(lines)
    epics.caput(prefix + "count", 4, wait=True)
    callbacks_done()
    assert len(lines) == before


@pytest.mark.timeout(60)
def test_camonitor_callback_gets_pyepics_fields(prefix):
    got = []
    epics.camonitor(prefix + "motor", callback=lambda **kw: got.append((kw, threading.current_thread().name)))
    epics.caput(prefix + "motor", 2.0, wait=True)
    wait_until(lambda: any(kw["value"] == 2.0 for kw, _ in got), 10)
    fields, thread = next((kw, t) for kw, t in got if kw["value"] == 2.0)
    assert thread == "pvhub-callbacks"
    assert fields["pvname"] == prefix + "motor"
    assert fields["char_value"] == "2.000"
    assert fields["units"] == "mm" and fields["precision"] == 3
    assert fields["severity"] == 0 and fields["timestamp"] > 0
    assert fields["cb_info"][0] == -999
    epics.camonitor_clear(prefix + "motor")


@pytest.mark.timeout(60)
def test_cainfo(prefix, capsys):
    text = epics.cainfo(prefix + "motor", print_out=False)
    assert f"== {prefix}motor  (time_double) ==" in text
    assert "units      = mm" in text
    assert "upper_ctrl_limit= 10.0" in text or "upper_ctrl_limit = 10.0" in text
    assert epics.cainfo(prefix + "motor") is None
    assert prefix + "motor" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_pv_object(prefix):
    conns, access, values = [], [], []
    pv = epics.PV(prefix + "motor", form="ctrl",
                  connection_callback=lambda **kw: conns.append(kw["conn"]),
                  access_callback=lambda r, w, pv: access.append((r, w)),
                  callback=lambda value, **kw: values.append(value))
    assert pv.wait_for_connection(15)
    wait_until(lambda: conns == [True] and access == [(True, True)], 5,
               message=lambda: f"{conns} {access}")
    assert pv.typefull == "ctrl_double" and pv.type == "ctrl_double"  # pyepics names both so
    assert pv.units == "mm" and pv.precision == 3
    assert (pv.lower_ctrl_limit, pv.upper_ctrl_limit) == (-10.0, 10.0)
    md = pv.get_with_metadata()
    assert md["units"] == "mm" and md["upper_ctrl_limit"] == 10.0
    assert pv.put(5.0, wait=True) == 1
    wait_until(lambda: 5.0 in values, 10)
    assert pv.value == 5.0 and pv.char_value == "5.000"
    done = []
    pv.put(6.0, callback=lambda **kw: done.append(kw), callback_data="mine")
    wait_until(lambda: done, 10)
    assert done[0] == {"pvname": prefix + "motor", "data": "mine"}
    assert repr(pv) == f"<PV '{prefix}motor', count=1, type=ctrl_double, access=read/write>"
    index = pv.add_callback(lambda **kw: None)
    pv.remove_callback(index)
    assert index not in pv.callbacks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cached", [False, True], ids=["new-pv-on-a-live-channel", "cached-pv"])
def test_get_pv_calls_a_connection_callback_once_when_the_pv_is_already_connected(prefix, cached):
    """pyepics calls ``get_pv``'s connection callback once for a connected PV. The channel may
    be connected before the PV is made (another form of the same name holds it), or the PV
    may come from the cache."""
    first = epics.get_pv(prefix + "motor", form="ctrl" if not cached else "time", connect=True)
    assert first.connected
    conns = []
    pv = epics.get_pv(prefix + "motor", form="time", connection_callback=lambda **kw: conns.append(kw["conn"]))
    assert (pv is first) is cached
    wait_until(lambda: conns, 10)
    callbacks_done()
    assert conns == [True]


@pytest.mark.timeout(60)
def test_connection_callback_sees_the_ioc_go(prefix, zoo_ioc):
    conns = []
    pv = epics.PV(prefix + "motor", connection_callback=lambda pvname, conn, pv: conns.append(conn))
    assert pv.wait_for_connection(15)
    wait_until(lambda: conns == [True], 5)
    zoo_ioc.stop()
    wait_until(lambda: conns == [True, False], 20, message=lambda: f"{conns}")
    assert not pv.connected
    assert pv.get(timeout=0.2) is None
