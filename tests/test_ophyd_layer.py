"""ophyd's own EPICS classes, unchanged, on pvhub's control layer against a real daemon and IOC."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from helpers import wait_until

pytestmark = pytest.mark.system

ophyd = pytest.importorskip("ophyd")

from ophyd import Component as Cpt  # noqa: E402
from ophyd import Device, EpicsSignal, EpicsSignalRO  # noqa: E402
from ophyd.utils.errors import ReadOnlyError  # noqa: E402

from pvhub.client import ophyd_layer  # noqa: E402
from pvhub.client.pv_fields import as_native, char_value, dbr_name, dbr_type  # noqa: E402
from pvhub.errors import BadValueError  # noqa: E402


@pytest.fixture
def layer(hub):
    """pvhub installed as ophyd's control layer for this test's daemon; the old one after."""
    ophyd_layer.install(address=hub.address)
    made = []
    yield made
    for obj in made:
        obj.destroy()
    ophyd_layer.uninstall()


def connected(layer, obj, timeout=15.0):
    layer.append(obj)
    obj.wait_for_connection(timeout=timeout)
    return obj


@pytest.mark.timeout(60)
def test_install_makes_ophyd_use_the_hub(layer, hub):
    assert ophyd.cl.name == "pvhub"
    assert ophyd.cl.get_dispatcher() is ophyd_layer.get_dispatcher()
    signal = EpicsSignal("anything:at:all", name="s")
    layer.append(signal)
    assert signal.cl.name == "pvhub"
    assert type(signal._read_pv).__module__ == "pvhub.client.ophyd_layer"


@pytest.mark.timeout(60)
def test_read_write_describe_a_float(layer, prefix):
    motor = connected(layer, EpicsSignal(prefix + "motor", name="motor"))
    motor.put(2.5, wait=True)
    assert motor.get() == 2.5
    assert motor.read()["motor"]["value"] == 2.5
    desc = motor.describe()["motor"]
    assert desc["source"] == f"PV:{prefix}motor"
    assert (desc["dtype"], desc["shape"], desc["units"], desc["precision"]) == ("number", [], "mm", 3)
    assert (desc["lower_ctrl_limit"], desc["upper_ctrl_limit"]) == (-10.0, 10.0)
    assert motor.set(-1.25).wait(10) is None
    assert motor.get() == -1.25
    assert motor.metadata["units"] == "mm"
    assert motor.tolerance == 0.001


@pytest.mark.timeout(60)
def test_callbacks_arrive_on_ophyds_dispatcher_threads(layer, prefix):
    motor = connected(layer, EpicsSignal(prefix + "motor", name="motor", auto_monitor=True))
    seen = []
    motor.subscribe(lambda value, **kw: seen.append((value, threading.current_thread().name)))
    motor.put(7.0, wait=True)
    wait_until(lambda: (7.0, "monitor") in seen, 10, message=lambda: f"seen {seen}")
    threads = {name for _, name in seen}
    assert threads <= {"monitor", "MainThread"}, threads  # MainThread: ophyd's own put echo
    meta = []
    motor.subscribe(lambda **kw: meta.append(threading.current_thread().name), event_type="meta")
    wait_until(lambda: meta, 10)
    assert set(meta) <= {"monitor", "metadata", "MainThread"}


@pytest.mark.timeout(60)
def test_put_completion_runs_on_get_put_thread(layer, prefix):
    slow = connected(layer, EpicsSignal(prefix + "slow", name="slow", put_complete=True))
    delay = connected(layer, EpicsSignal(prefix + "slow_delay", name="delay"))
    delay.put(0.3, wait=True)
    done = []
    status = slow.set(1.5)
    status.add_callback(lambda st: done.append(threading.current_thread().name))
    assert not status.done  # completion takes the IOC 0.3 s
    status.wait(10)
    assert status.success
    wait_until(lambda: done, 5)
    assert slow.get() == 1.5


@pytest.mark.timeout(60)
def test_enum_as_string_and_as_index(layer, prefix):
    mode = connected(layer, EpicsSignal(prefix + "mode", name="mode", string=True))
    assert mode.get() == "Off"
    assert mode.describe()["mode"]["enum_strs"] == ("Off", "On", "Auto")
    assert mode.describe()["mode"]["dtype"] == "string"
    mode.put("Auto", wait=True)
    assert mode.get() == "Auto"
    assert ophyd.cl.get_pv(prefix + "mode").get(use_monitor=False) == 2
    mode.put(1, wait=True)
    assert mode.get() == "On"


@pytest.mark.timeout(60)
def test_char_waveform_as_string(layer, prefix):
    chars = connected(layer, EpicsSignal(prefix + "chars", name="chars", string=True))
    assert chars.get() == "abc"
    chars.put("hello world", wait=True)
    assert chars.get() == "hello world"
    raw = ophyd.cl.get_pv(prefix + "chars").get(use_monitor=False)
    assert bytes(np.asarray(raw, dtype=np.uint8)).startswith(b"hello world")


@pytest.mark.timeout(60)
def test_arrays_strings_and_integers(layer, prefix):
    wave = connected(layer, EpicsSignalRO(prefix + "wave", name="wave"))
    assert np.array_equal(wave.get(), np.arange(16.0))
    assert wave.describe()["wave"]["shape"] == [16]
    text = connected(layer, EpicsSignal(prefix + "text", name="text"))
    text.put("bye", wait=True)
    assert text.get() == "bye"
    assert text.describe()["text"]["dtype"] == "string"
    count = connected(layer, EpicsSignal(prefix + "count", name="count"))
    count.put(42, wait=True)
    assert count.get() == 42 and isinstance(count.get(), int)


@pytest.mark.timeout(60)
def test_access_rights(layer, prefix):
    ro = connected(layer, EpicsSignalRO(prefix + "ro", name="ro"))
    assert ro.get() == 1.5
    assert ro.read_access and not ro.write_access
    writable_class_on_ro = connected(layer, EpicsSignal(prefix + "ro", name="ro2"))
    assert not writable_class_on_ro.write_access
    with pytest.raises(ReadOnlyError):
        writable_class_on_ro.put(2.0)
    with pytest.raises(ReadOnlyError):
        ro.put(2.0)


@pytest.mark.timeout(60)
def test_a_bad_value_is_refused_at_once(layer, prefix):
    count = connected(layer, EpicsSignal(prefix + "count", name="count"))
    with pytest.raises(BadValueError):
        count.put("not a number", wait=True)


@pytest.mark.timeout(60)
def test_a_device_of_signals(layer, prefix):
    class Stage(Device):
        motor = Cpt(EpicsSignal, "motor", kind="hinted")
        mode = Cpt(EpicsSignal, "mode", string=True, kind="config")
        ro = Cpt(EpicsSignalRO, "ro")

    stage = connected(layer, Stage(prefix, name="stage"))
    stage.motor.set(1.0).wait(10)
    reading = stage.read()
    assert reading["stage_motor"]["value"] == 1.0
    assert reading["stage_ro"]["value"] == 1.5
    assert stage.read_configuration()["stage_mode"]["value"] == "Off"
    assert stage.describe()["stage_motor"]["units"] == "mm"


@pytest.mark.timeout(60)
def test_pv_fields_as_pyepics(layer, prefix):
    pv = ophyd.cl.get_pv(prefix + "motor")
    assert pv.wait_for_connection(timeout=15)
    ctrl = pv.get_with_metadata(form="ctrl")
    assert ctrl["units"] == "mm" and ctrl["precision"] == 3
    assert (ctrl["lower_ctrl_limit"], ctrl["upper_ctrl_limit"]) == (-10.0, 10.0)
    timed = pv.get_with_metadata(form="time", use_monitor=False)
    assert {"value", "timestamp", "status", "severity"} <= timed.keys()
    assert pv.type == "time_double" and pv.typefull == "time_double" and pv.ftype == 20
    assert (pv.count, pv.nelm) == (1, 1)
    assert pv.read_access and pv.write_access
    assert pv.host.startswith("127.0.0.1:")
    md = pv.get_all_metadata_blocking(timeout=5)
    assert md["units"] == "mm" and "value" not in md
    got = []
    pv.get_all_metadata_callback(lambda name, md: got.append((name, threading.current_thread().name)), timeout=5)
    wait_until(lambda: got, 5)
    assert got[0][0] == prefix + "motor" and got[0][1].startswith("util")
    ophyd.cl.release_pvs(pv)


@pytest.mark.timeout(60)
def test_caget_caput_of_the_layer(layer, prefix):
    assert ophyd.cl.caput(prefix + "count", 5, wait=True) == 1
    assert ophyd.cl.caget(prefix + "count") == 5
    assert ophyd.cl.caget(prefix + "mode", as_string=True) == "Off"


@pytest.mark.timeout(90)
def test_a_lost_ioc_disconnects_the_signal_and_its_return_reconnects_it(layer, prefix, zoo_ioc):
    motor = connected(layer, EpicsSignal(prefix + "motor", name="motor"))
    motor.put(4.0, wait=True)
    states = []
    motor.subscribe(lambda connected=None, **kw: states.append(connected), event_type="meta", run=False)
    zoo_ioc.stop()
    wait_until(lambda: not motor.connected, 20, message="the signal still says it is connected")
    wait_until(lambda: False in states, 10, message=lambda: f"meta callbacks {states}")
    zoo_ioc.start()
    motor.wait_for_connection(timeout=30)
    assert motor.get() == 0.0  # a new IOC process: its initial value
    wait_until(lambda: states[-1] is True, 10, message=lambda: f"meta callbacks {states}")


# --- the PV's pure helpers: no daemon, no IOC ---------------------------------------------------


def test_dbr_types_as_pyepics_names_them():
    assert (dbr_type("float", "native"), dbr_type("float", "time"), dbr_type("float", "ctrl")) == (6, 20, 34)
    assert [dbr_name(dbr_type(kind, "time")) for kind in ("int", "enum", "string", "char")] == [
        "time_long", "time_enum", "time_string", "time_char"]
    assert dbr_name(None) == "unknown" and dbr_type("nonsense", "time") is None
    # A PV the IOC serves as SHORT or FLOAT is named so (its values travel as LONG and DOUBLE).
    assert (dbr_name(dbr_type("int", "time", 16)), dbr_name(dbr_type("float", "ctrl", 32))) == (
        "time_short", "ctrl_float")
    assert dbr_type("int", "time", 16) == 15 and dbr_type("float", "time", 32) == 16
    assert dbr_type("int", "time", 32) == 19 and dbr_type("float", "time", 64) == 20


def test_char_value_as_pyepics_writes_it():
    assert char_value(1.23456, {"native_type": "float", "precision": 3}, 1) == "1.235"
    assert char_value(123456.0, {"native_type": "float", "precision": 2}, 1) == "1.2e+05"
    assert char_value(2, {"native_type": "enum", "enum_strs": ["a", "b", "c"]}, 1) == "c"
    assert char_value(7, {"native_type": "enum", "enum_strs": ["a"]}, 1) == "7"
    assert char_value(np.frombuffer(b"hi\0junk", np.uint8), {"native_type": "char"}, 7) == "hi"
    assert char_value("text", {"native_type": "string"}, 1) == "text"
    assert char_value(np.zeros(4), {"native_type": "float"}, 4) == "<array size=4, type=time_double>"


def test_values_are_converted_to_the_native_type_as_ca_clients_do():
    assert as_native(3.7, {"native_type": "int"}) == 3
    assert as_native(-2.5, {"native_type": "int"}) == -2
    assert as_native(1.0, {"native_type": "enum"}) == 1
    assert as_native("On", {"native_type": "enum"}) == "On"
    assert as_native(3.7, {"native_type": "float"}) == 3.7
    assert math.isnan(as_native(float("nan"), {"native_type": "int"}))  # left for the daemon to refuse
    assert as_native(np.array([1.5, -1.5]), {"native_type": "int"}).tolist() == [1, -1]
    assert as_native([1.9, 2.1], {"native_type": "int"}) == [1, 2]


def test_shipped_runner_reads_junit_and_knows_its_differences(tmp_path):
    from ophyd_shipped.runner import known_difference, outcomes

    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="test_signal" name="test_a[caproto]"/>'
        '<testcase classname="test_signal" name="test_b[caproto]"><failure message="x"/></testcase>'
        '<testcase classname="test_signal" name="test_c[caproto]"><skipped message="y"/></testcase>'
        '<testcase classname="test_signal.TestK" name="test_d[caproto]"/>'
        '<testcase classname="test_signal.TestK" name="test_d[caproto]"><error message="teardown"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert outcomes(report, "test_signal.py") == {
        "test_signal.py::test_a[caproto]": "passed",
        "test_signal.py::test_b[caproto]": "failed",
        "test_signal.py::test_c[caproto]": "skipped",
        "test_signal.py::TestK::test_d[caproto]": "error",
    }
    # Nothing is excused any more: the alarm tests pass since reads without monitor are fresh.
    assert known_difference("test_signal.py::test_epicssignal_alarm_status[caproto-1-1]") is None
    assert known_difference("test_signal.py::test_epicssignal_set[caproto-True]") is None
