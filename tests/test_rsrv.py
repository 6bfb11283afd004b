"""pvhub against EPICS base's own Channel Access server (rsrv), the server beamlines run.

The IOC is ``tests/iocs/rsrv.py`` (pythonSoftIOC: EPICS base's IOC in a Python process);
every test has a daemon of its own in front of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import REPO_ROOT
from helpers import log_events, plain_search_socket, wait_until

from pvhub.client import EpicsSignal, EpicsSignalRO, ReadOnlyError, close_hubs, epics
from pvhub.errors import BadValueError
from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC, free_tcp_port

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

TIMEOUT = 10.0


@pytest.fixture
def rsrv_ioc(prefix: str) -> Iterator[SimulatedIOC]:
    """``tests/iocs/rsrv.py`` under ``prefix``, ready when ``{prefix}motor`` reads."""
    ioc = SimulatedIOC("tests.iocs.rsrv", prefix=prefix, ready_pv="motor", cwd=REPO_ROOT)
    with ioc:
        yield ioc
    assert ioc.process.poll() is not None, "the rsrv IOC outlived its fixture"


@pytest.fixture
def rsrv_hub(
    rsrv_ioc: SimulatedIOC,
    hub_factory: Callable[..., DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DaemonProcess]:
    """A daemon in front of ``rsrv_ioc``; ``$PVHUB_ADDRESS`` points the client at it."""
    daemon = hub_factory(rsrv_ioc)
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    yield daemon
    close_hubs()


def connected(signal):
    signal.wait_for_connection(timeout=TIMEOUT)
    return signal


def test_metadata_from_the_records_fields(rsrv_hub, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    assert motor.units == "mm"
    assert motor.precision == 3
    assert motor.limits == (-10.0, 10.0)  # DRVL / DRVH
    desc = motor.describe()["motor"]
    assert desc["dtype"] == "number" and desc["units"] == "mm" and desc["precision"] == 3
    assert (desc["lower_ctrl_limit"], desc["upper_ctrl_limit"]) == (-10.0, 10.0)
    assert desc["source"] == f"PV:{prefix}motor"

    temp = connected(EpicsSignalRO(f"{prefix}temp", name="temp"))
    assert temp.get() == 21.5
    assert temp.units == "degC" and temp.precision == 2

    mode = connected(EpicsSignal(f"{prefix}mode", name="mode", string=True))
    assert mode.enum_strs == ("Off", "On", "Auto")
    assert mode.describe()["mode"]["enum_strs"] == ("Off", "On", "Auto")
    assert mode.get() == "Off"

    count = connected(EpicsSignalRO(f"{prefix}count", name="count"))
    assert count.get() == 7
    assert count.describe()["count"]["dtype"] == "integer"


def test_puts_complete_on_every_kind_of_record(rsrv_hub, rsrv_ioc, prefix):
    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    motor.set(2.5).wait(TIMEOUT)
    assert motor.get() == 2.5
    assert rsrv_ioc.read("motor").data[0] == 2.5  # the record, not only the hub, has it

    mode = connected(EpicsSignal(f"{prefix}mode", name="mode", string=True))
    number = connected(EpicsSignal(f"{prefix}mode", name="number"))
    mode.set("Auto").wait(TIMEOUT)
    assert number.get() == 2
    number.set(1).wait(TIMEOUT)
    wait_until(lambda: mode.get() == "On", 5)

    text = connected(EpicsSignal(f"{prefix}text", name="text"))
    assert text.get() == "hello"
    text.set("goodbye").wait(TIMEOUT)
    assert text.get() == "goodbye"
    assert rsrv_ioc.read("text").data[0] == b"goodbye"

    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    np.testing.assert_array_equal(wave.get(), np.arange(16.0))
    assert wave.describe()["wave"]["shape"] == [16]
    wave.set(np.linspace(0.0, 1.0, 16)).wait(TIMEOUT)
    np.testing.assert_allclose(wave.get(), np.linspace(0.0, 1.0, 16))

    chars = connected(EpicsSignal(f"{prefix}chars", name="chars", string=True))
    assert chars.get() == "abc"
    chars.set("beamline").wait(TIMEOUT)
    assert chars.get() == "beamline"
    assert bytes(rsrv_ioc.read("chars").data).rstrip(b"\0") == b"beamline"


def test_text_comes_back_as_written_whatever_its_characters(rsrv_hub, rsrv_ioc, prefix, monkeypatch):
    """pvhub/text.py: text is written as UTF-8 and read back unchanged, on a string record and
    a char waveform alike; bytes that are not UTF-8 (a latin-1 client's) read as latin-1."""
    words = "20 °C, µm, 中文"
    text = connected(EpicsSignal(f"{prefix}text", name="text"))
    text.set(words).wait(TIMEOUT)
    assert text.get() == words
    assert rsrv_ioc.read("text").data[0] == words.encode()

    chars = connected(EpicsSignal(f"{prefix}chars", name="chars", string=True))
    chars.set(words).wait(TIMEOUT)
    assert chars.get() == words
    assert bytes(rsrv_ioc.read("chars").data) == words.encode() + b"\0"  # ended as caput -S ends it
    assert epics.caget(f"{prefix}chars", as_string=True) == words

    import caproto
    from caproto.sync.client import write  # another client, which writes latin-1

    monkeypatch.setattr(caproto, "bcast_socket", plain_search_socket)
    for name, value in rsrv_ioc.ca_env().items():
        monkeypatch.setenv(name, value)
    write(f"{prefix}text", "café", notify=True, timeout=TIMEOUT, repeater=False)
    assert rsrv_ioc.read("text").data[0] == b"caf\xe9"
    wait_until(lambda: text.get() == "café", TIMEOUT, message=lambda: repr(text.get()))


def test_a_set_reads_back_what_the_record_holds(rsrv_hub, rsrv_ioc, prefix):
    """actors/state.py Rule 6 on EPICS base's server, which answers a read sent behind a put
    before the put's completion: a value the record keeps as put is settled by its monitor
    update, one it clips to its drive limits or leaves unchanged (no update) by the read-back.
    Either way, get() after wait() is what the record holds."""
    motor = connected(EpicsSignal(f"{prefix}motor", name="motor", put_complete=True))
    for value in (1.25, 15.0, -3.5, -12.0, 1.25, 1.25):
        motor.set(value).wait(TIMEOUT)
        assert motor.get() == min(10.0, max(-10.0, value)), value
        assert rsrv_ioc.read("motor").data[0] == motor.get()


def test_a_record_that_refuses_writes(rsrv_hub, rsrv_ioc, prefix):
    locked = connected(EpicsSignal(f"{prefix}locked", name="locked"))
    assert locked.read_access and not locked.write_access  # access security group READONLY
    status = locked.set(5)
    with pytest.raises(ReadOnlyError):
        status.wait(TIMEOUT)
    assert isinstance(status.exception(), PermissionError)
    assert locked.get() == 42
    assert rsrv_ioc.read("locked").data[0] == 42

    readonly = connected(EpicsSignalRO(f"{prefix}count", name="count"))
    with pytest.raises(ReadOnlyError):
        readonly.set(3)


def test_a_subscriber_gets_every_count_in_order(rsrv_hub, rsrv_ioc, prefix):
    rate = connected(EpicsSignal(f"{prefix}fast_rate", name="rate"))
    fast = connected(EpicsSignalRO(f"{prefix}fast", name="fast"))
    seen: list[tuple[int, float]] = []
    lock = threading.Lock()

    def on_value(value, timestamp, **kwargs):
        with lock:
            seen.append((value, timestamp))

    fast.subscribe(on_value)
    wait_until(lambda: seen, 5, message="no first value")
    rate.set(200.0).wait(TIMEOUT)
    wait_until(lambda: len(seen) > 300, 15, message=lambda: f"only {len(seen)} updates")
    rate.set(0.0).wait(TIMEOUT)
    time.sleep(0.1)  # let a tick that read the old rate finish; the IOC is read after it
    last = int(rsrv_ioc.read("fast").data[0])
    wait_until(lambda: seen[-1][0] == last, 5, message=lambda: f"last seen {seen[-1]}, IOC at {last}")
    with lock:
        values = [v for v, _ in seen]
        stamps = [t for _, t in seen]
    assert values == list(range(values[0], last + 1)), "an update was lost or reordered"
    assert stamps == sorted(stamps)
    assert fast.missed_updates == 0


def test_the_ophyd_tutorials_plans(rsrv_hub, prefix):
    from bluesky import RunEngine
    from bluesky import plan_stubs as bps
    from bluesky.plans import count, list_scan

    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    temp = connected(EpicsSignalRO(f"{prefix}temp", name="temp"))
    documents: list[tuple[str, dict]] = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: documents.append((name, doc)))

    RE(count([temp, motor], num=3))
    events = [doc for name, doc in documents if name == "event"]
    assert len(events) == 3
    assert all(e["data"]["temp"] == 21.5 for e in events)
    (descriptor,) = [doc for name, doc in documents if name == "descriptor"]
    assert descriptor["data_keys"]["motor"]["units"] == "mm"
    assert [doc["exit_status"] for name, doc in documents if name == "stop"] == ["success"]

    documents.clear()
    RE(list_scan([temp], motor, [1.0, -2.25, 3.5]))
    assert [doc["data"]["motor"] for name, doc in documents if name == "event"] == [1.0, -2.25, 3.5]

    RE(bps.mv(motor, 4.125))
    assert motor.get() == 4.125


PARENT = """
import subprocess, sys, time
ioc = subprocess.Popen([sys.executable, "-m", "tests.iocs.rsrv", "--prefix", sys.argv[1]])
print(ioc.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_the_ioc_dies_with_its_parent(prefix):
    """Killed parent, no IOC: the kernel's PR_SET_PDEATHSIG reaches it (SIGKILL, no cleanup)."""
    beacons = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # as SimulatedIOC holds it
    beacons.bind(("127.0.0.1", 0))
    port = free_tcp_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EPICS_")},
        "EPICS_CA_SERVER_PORT": str(port), "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1", "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CA_REPEATER_PORT": str(beacons.getsockname()[1]),
        "EPICS_CAS_BEACON_PORT": str(beacons.getsockname()[1]),
        "EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": "127.0.0.1",
    }  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", PARENT, prefix], cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    ioc: int | None = None
    try:
        ioc = int(parent.stdout.readline())

        def serving() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(serving, 30, interval=0.1, message="the IOC never listened")
        parent.kill()
        parent.wait(5)

        wait_until(lambda: _gone(ioc), 5, interval=0.05, message=f"the IOC {ioc} outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        if ioc is not None and not _gone(ioc):
            os.kill(ioc, signal.SIGKILL)  # the test failed: leave nothing behind
        beacons.close()


def test_an_empty_waveform_on_rsrv(rsrv_hub, rsrv_ioc, prefix):
    # A waveform whose NORD is 0: what rsrv sends for it must not cost the circuit (test_client
    # has the caproto IOC's side).
    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    motor = connected(EpicsSignalRO(f"{prefix}motor", name="motor"))
    seen = []
    wave.subscribe(lambda value, **kw: seen.append(value), run=False)
    wave.set(np.array([], dtype=float)).wait(TIMEOUT)
    assert wave.get().shape == (0,)
    wait_until(lambda: any(len(v) == 0 for v in seen), TIMEOUT)
    wave.set(np.arange(3.0)).wait(TIMEOUT)
    np.testing.assert_array_equal(wave.get(), np.arange(3.0))
    wait_until(lambda: len(seen[-1]) == 3, TIMEOUT)
    assert wave.connected and motor.connected


def test_a_waveform_that_holds_nothing_connects(rsrv_hub, rsrv_ioc, prefix):
    # NORD 0 until written: its monitor updates hold no element, which the actor reads off
    # its fast path. Dropped there, the PV would never have a value, so never connect.
    empty = connected(EpicsSignal(f"{prefix}empty", name="empty"))
    assert empty.get().shape == (0,)
    seen = []
    empty.subscribe(lambda value, **kw: seen.append(value))
    wait_until(lambda: seen and len(seen[-1]) == 0, TIMEOUT)
    empty.set(np.array([1.0, 2.0])).wait(TIMEOUT)
    wait_until(lambda: len(seen[-1]) == 2, TIMEOUT)
    np.testing.assert_array_equal(empty.get(), [1.0, 2.0])


def test_a_read_refused_for_lost_read_access_is_an_error_not_a_value(rsrv_hub, rsrv_ioc, prefix):
    # rsrv answers a read it may not serve with ECA_NORDACCESS and a payload of zeros; taken
    # as a reading, that would replace the PV's value for every client with an empty array.
    gate = connected(EpicsSignal(f"{prefix}gate", name="gate"))
    guarded = connected(EpicsSignal(f"{prefix}guarded", name="guarded"))
    fresh = connected(EpicsSignalRO(f"{prefix}guarded", name="fresh", auto_monitor=False))
    assert fresh.get() == guarded.get() == 3.5
    gate.set(0).wait(TIMEOUT)
    wait_until(lambda: not guarded.read_access and not guarded.write_access, TIMEOUT)
    with pytest.raises(Exception, match="could not be read"):
        fresh.get()
    assert guarded.get() == 3.5  # the last value read, not the zeros of a refusal
    gate.set(1).wait(TIMEOUT)
    wait_until(lambda: guarded.read_access and guarded.write_access, TIMEOUT)
    guarded.set(4.5).wait(TIMEOUT)
    assert fresh.get() == guarded.get() == 4.5


def test_a_pv_without_read_access_at_first_connects_once_it_has_it(rsrv_hub, rsrv_ioc, prefix):
    # Its control structure (units, precision) cannot be read at first: it is read again
    # when the access comes, and only then is the PV connected (actors/state.py Rule 3).
    gate = connected(EpicsSignal(f"{prefix}gate", name="gate"))
    gate.set(0).wait(TIMEOUT)
    guarded = EpicsSignalRO(f"{prefix}guarded", name="guarded")
    refused = lambda: [e for e in log_events(rsrv_hub, "metadata_read_failed") if e.get("pv") == guarded.pvname]  # noqa: E731
    wait_until(refused, TIMEOUT)
    assert "ECA_NORDACCESS" in refused()[0]["error"]
    assert not guarded.connected
    gate.set(1).wait(TIMEOUT)
    connected(guarded)
    assert guarded.get() == 3.5
    assert guarded.units == "V" and guarded.precision == 1


def test_a_number_beyond_the_native_width_is_refused_not_wrapped(rsrv_hub, rsrv_ioc, prefix):
    # CA's SHORT holds 16 bits and FLOAT is a float32: put there, 70000 would arrive as 4464
    # and 1e39 as infinity, each reported done (actors/coercion.py Rule 3).
    shorts = connected(EpicsSignal(f"{prefix}shorts", name="shorts"))
    floats = connected(EpicsSignal(f"{prefix}floats", name="floats"))
    shorts.set(np.array([1, -2, 32767, -32768])).wait(TIMEOUT)
    with pytest.raises(BadValueError, match="outside -32768..32767"):
        shorts.set(np.array([1, 70000])).wait(TIMEOUT)
    np.testing.assert_array_equal(rsrv_ioc.read("shorts").data, [1, -2, 32767, -32768])
    floats.set(np.array([1.5, 3e38])).wait(TIMEOUT)
    with pytest.raises(BadValueError, match="float32"):
        floats.set(np.array([1e39])).wait(TIMEOUT)
    assert list(rsrv_ioc.read("floats").data[:2]) == [1.5, np.float32(3e38)]
    # Named as the IOC serves them, as pyepics names them.
    assert shorts.get(as_string=True) == "<array size=4, type=time_short>"
    assert floats.get(as_string=True) == "<array size=2, type=time_float>"  # NORD 2 now


def test_a_two_state_record_with_one_label_takes_both_states(rsrv_hub, rsrv_ioc, prefix):
    half = connected(EpicsSignal(f"{prefix}half", name="half"))
    assert half.enum_strs == ("Off",)  # EPICS counts labels up to the last one set
    half.set(1).wait(TIMEOUT)
    assert rsrv_ioc.read("half").data[0] == 1
    half.set("Off").wait(TIMEOUT)
    assert rsrv_ioc.read("half").data[0] == 0
    with pytest.raises(BadValueError):
        half.set(2).wait(TIMEOUT)


def test_a_label_or_unit_changed_at_run_time_reaches_clients(rsrv_hub, rsrv_ioc, prefix):
    # rsrv posts a property event (DBE_PROPERTY) with the reading unchanged; the actor reads
    # the control structure again (actors/state.py Rule 7). Missed, a put of the label "Bee"
    # would be refused, and a put of "On" would write the state now called "Bee".
    mode = connected(EpicsSignal(f"{prefix}mode", name="mode", string=True))
    motor = connected(EpicsSignalRO(f"{prefix}motor", name="motor"))
    assert mode.enum_strs == ("Off", "On", "Auto") and motor.units == "mm"
    mode.set("Auto").wait(TIMEOUT)  # a put's read-back held first, as a beamline's mode has
    connected(EpicsSignal(f"{prefix}mode.ONST", name="onst", string=True)).set("Bee").wait(TIMEOUT)
    connected(EpicsSignal(f"{prefix}motor.EGU", name="egu", string=True)).set("um").wait(TIMEOUT)
    wait_until(lambda: mode.enum_strs == ("Off", "Bee", "Auto"), TIMEOUT)
    wait_until(lambda: motor.units == "um", TIMEOUT)
    mode.set("Bee").wait(TIMEOUT)
    assert rsrv_ioc.read("mode").data[0] == 1
    assert mode.get() == "Bee"


def test_arrays_in_native_byte_order_and_char_limits_as_numbers(rsrv_hub, rsrv_ioc, prefix):
    # Channel Access carries big-endian numbers; a direct client's arrays are in the host's
    # order (dtype == np.float64), and a CHAR PV's limits are numbers: as bytes, describe()
    # and the RunEngine's documents could not be written as JSON.
    wave = connected(EpicsSignal(f"{prefix}wave", name="wave"))
    shorts = connected(EpicsSignal(f"{prefix}shorts", name="shorts"))
    seen = []
    wave.subscribe(lambda value, **kw: seen.append(value))
    wait_until(lambda: seen, TIMEOUT)
    for value in (wave.get(), shorts.get(), seen[-1]):
        assert value.dtype.isnative, value.dtype
    assert wave.get().dtype == np.float64 and shorts.get().dtype == np.int16
    wave.set(np.arange(4.0)).wait(TIMEOUT)
    assert wave.get().dtype == np.float64  # the read-back too
    chars = connected(EpicsSignal(f"{prefix}chars", name="chars", string=True))
    description = chars.describe()
    assert isinstance(description["chars"].get("lower_ctrl_limit", 0), int)
    json.dumps(description)
    json.dumps(chars.read(), default=float)


def test_a_waveform_of_strings_takes_a_list(rsrv_hub, rsrv_ioc, prefix):
    texts = connected(EpicsSignal(f"{prefix}texts", name="texts"))
    texts.set(["alpha", "beta", "gamma"]).wait(TIMEOUT)
    assert list(texts.get()) == ["alpha", "beta", "gamma"]
    assert [bytes(b).rstrip(b"\0") for b in rsrv_ioc.read("texts").data] == [b"alpha", b"beta", b"gamma"]
    with pytest.raises(BadValueError):
        texts.set(["a", "b", "c", "d", "e"]).wait(TIMEOUT)  # five do not fit in four
    with pytest.raises(BadValueError):
        texts.set(["x" * 40]).wait(TIMEOUT)


def test_units_changed_on_a_scanned_record_reach_clients(rsrv_hub, rsrv_ioc, prefix):
    # Processed since its last posted value, the record's property event carries a newer
    # timestamp than the reading held (actors/state.py Rule 7).
    scanned = connected(EpicsSignalRO(f"{prefix}scanned", name="scanned"))
    egu = connected(EpicsSignal(f"{prefix}scanned.EGU", name="egu", string=True))
    assert scanned.units == "x"
    for units in ("u1", "u2", "u3", "u4", "u5"):
        egu.set(units).wait(TIMEOUT)
        wait_until(lambda units=units: scanned.units == units, TIMEOUT)


def test_alarms_are_ophyds_enums(rsrv_hub, rsrv_ioc, prefix):
    from ophyd.utils.epics_pvs import AlarmSeverity, AlarmStatus

    motor = connected(EpicsSignal(f"{prefix}motor", name="motor"))
    connected(EpicsSignal(f"{prefix}motor.HIGH", name="high")).set(5.0).wait(TIMEOUT)
    connected(EpicsSignal(f"{prefix}motor.HSV", name="hsv", string=True)).set("MINOR").wait(TIMEOUT)
    assert motor.alarm_severity is not None and motor.alarm_severity.name == "NO_ALARM"
    motor.set(6.0).wait(TIMEOUT)
    wait_until(lambda: motor.alarm_severity == AlarmSeverity.MINOR, TIMEOUT)
    assert motor.alarm_severity.name == "MINOR" and motor.alarm_status.name == "HIGH"
    assert motor.alarm_status == AlarmStatus.HIGH == 4
    motor.set(0.0).wait(TIMEOUT)
