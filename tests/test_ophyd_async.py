"""ophyd-async Signals on pvhub's backend: the same types, values, DataKeys, errors and Bluesky
documents as ophyd-async's own Channel Access backend gives for the same PVs, with the event
loop never blocked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated as A
from typing import Any

import numpy as np
import pytest
from ophyd_async.core import (
    Array1D,
    NotConnectedError,
    SignalRW,
    StandardReadable,
    StandardReadableFormat,
    StrictEnum,
    SubsetEnum,
    observe_value,
)
from ophyd_async.epics.core import EpicsDevice, PvSuffix
from helpers import wait_until

from pvhub import protocol as p
from pvhub.client import close_hubs
from pvhub.client.ophyd_async import (
    PvhubSignalBackend,
    make_converter,
    make_reading,
    pvhub_signal_r,
    pvhub_signal_rw,
    pvhub_signal_x,
    signal_metadata,
)
from pvhub.errors import DisconnectedError, PVNotAllowedError
from pvhub.testing import SimulatedIOC, free_tcp_port

SCRIPT = Path(__file__).with_name("side_by_side_async.py")


def run(coroutine: Any, timeout: float = 30.0) -> Any:
    """``coroutine`` on a fresh event loop, failing it after ``timeout``."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


# --- the pure core: no sockets ----------------------------------------------------------------


def md(native: str, count: int = 1, **extra: Any) -> p.PVMetadata:
    return {"native_type": native, "count": count, **extra}  # type: ignore[typeddict-item]


class Mode(StrictEnum):
    OFF = "Off"
    ON = "On"


class Some(SubsetEnum):
    ON = "On"


@pytest.mark.parametrize(
    ("metadata", "raw", "datatype", "expected", "expected_type"),
    [
        (md("float"), 1.5, None, 1.5, float),
        (md("int"), 3, int, 3, int),
        (md("float", precision=0), 3.0, int, 3, int),
        (md("string"), "hi", str, "hi", str),
        (md("enum", enum_strs=["Off", "On"]), 1, None, "On", str),
        (md("enum", enum_strs=["Off", "On"]), 1, Mode, Mode.ON, Mode),
        (md("enum", enum_strs=["Off", "On", "Auto"]), 1, Some, Some.ON, Some),
        (md("enum", enum_strs=["Off", "On", "Auto"]), 2, Some, "Auto", str),
        (md("enum", enum_strs=["Off", "On"]), 1, bool, True, bool),
        (md("int"), 0, bool, False, bool),
        (md("char", 40), np.array([104, 105, 0, 7], dtype=np.uint8), str, "hi", str),
        (md("string", 3), ["a", "b", "c"], Sequence[str], ["a", "b", "c"], list),
        (md("enum", 2, enum_strs=["Off", "On"]), np.array([1, 0]), Sequence[str], ["On", "Off"], list),
        (md("float", 4), np.array([1.0, 2.0], dtype=">f4"), Array1D[np.float32], [1.0, 2.0], np.ndarray),
        (md("int", 4), np.array([7], dtype=np.int16), Array1D[np.int16], [7], np.ndarray),
        (md("float", 4), 5.0, None, [5.0], np.ndarray),  # one element arrives as a scalar
    ],
)
def test_values_convert_as_channel_access_gives_them(metadata, raw, datatype, expected, expected_type):
    converter = make_converter(datatype, {"PV": (metadata, raw)})
    value = converter.value(raw)
    assert type(value) is expected_type
    if isinstance(value, np.ndarray):
        assert value.tolist() == expected
        assert value.dtype.isnative
    else:
        assert value == expected


def test_each_array_read_is_an_array_of_its_own():
    raw = np.arange(4.0)
    converter = make_converter(None, {"PV": (md("float", 4), raw)})
    first, second = converter.value(raw), converter.value(raw)
    first[0] = 99.0
    assert raw[0] == second[0] == 0.0


@pytest.mark.parametrize(
    ("metadata", "raw", "datatype", "message"),
    [
        (md("float", precision=3), 1.5, int, "PV with inferred datatype float cannot be coerced to int"),
        (md("int"), 1, float, "PV with inferred datatype int cannot be coerced to float"),
        (md("string"), "a", Sequence[str], "PV with inferred datatype str cannot be coerced to Sequence[str]"),
        (md("enum", enum_strs=["A", "B", "C"]), 0, bool, "PV has 3 choices, can't map to bool"),
        (md("enum", enum_strs=["A"]), 0, int,
         "PV with inferred datatype str | SubsetEnum | StrictEnum cannot be coerced to int"),
        (md("enum", enum_strs=["Off", "On", "Auto"]), 0, Mode,
         "PV has choices ('Off', 'On', 'Auto'), but <enum 'Mode'> requested ['Off', 'On'] "
         "to be strictly equal to them."),
        (md("float", 3), np.zeros(3), Array1D[np.int32],
         "PV with inferred datatype Array1D[np.float64] cannot be coerced to Array1D[np.int32]"),
        (md("float", 3), np.zeros(3), np.ndarray,
         "PV with inferred datatype Array1D[np.float64] cannot be coerced to ndarray"),
    ],
)
def test_datatype_mismatches_raise_channel_access_errors(metadata, raw, datatype, message):
    with pytest.raises(TypeError) as caught:
        make_converter(datatype, {"PV": (metadata, raw)})
    assert str(caught.value) == message


def test_read_and_write_pvs_of_different_types_are_refused():
    with pytest.raises(TypeError, match="Differing datatypes and element_count"):
        make_converter(float, {"R": (md("float"), 1.0), "W": (md("int"), 1)})


def test_metadata_keeps_what_channel_access_keeps():
    metadata = md(
        "float", units="mm", precision=3, lower_ctrl_limit=-10.0, upper_ctrl_limit=10.0,
        lower_disp_limit=0.0, upper_disp_limit=0.0, lower_alarm_limit=None, upper_alarm_limit=5.0,
        lower_warning_limit=None, upper_warning_limit=None,
    )
    assert signal_metadata(float, metadata, {}) == {
        "units": "mm",
        "precision": 3,
        "limits": {"control": {"low": -10.0, "high": 10.0}, "alarm": {"low": None, "high": 5.0}},
    }
    assert signal_metadata(bool, metadata, {}) == {"precision": 3}
    assert "precision" not in signal_metadata(int, metadata, {})
    # A string's control structure has none of these; a char PV's limits come as bytes.
    assert signal_metadata(None, md("string", units=None, precision=None), {}) == {}
    chars = md("char", 40, units="", lower_ctrl_limit=b"\x00", upper_ctrl_limit=b"\x00")
    assert signal_metadata(str, chars, {}) == {}


def test_a_reading_carries_severity_as_channel_access_reports_it():
    converter = make_converter(float, {"PV": (md("float"), 1.0)})
    assert make_reading(converter, p.Reading(2.5, 1234.5, severity=2)) == {
        "value": 2.5, "timestamp": 1234.5, "alarm_severity": 2,
    }
    assert make_reading(converter, p.Reading(2.5, 1.0, severity=3))["alarm_severity"] == -1


def test_sources_say_pvhub():
    backend = PvhubSignalBackend(float, "pvhub://A:read", "ca://A:write")
    assert backend.source("s", read=True) == "pvhub://A:read"
    assert backend.source("s", read=False) == "pvhub://A:write"
    assert PvhubSignalBackend(float, "A", "A").source("s", read=True) == "pvhub://A"
    with pytest.raises(ValueError, match="not pva://"):
        PvhubSignalBackend(float, "pva://A", "A")


def test_mock_mode_needs_no_daemon():
    from ophyd_async.core import set_mock_value

    async def scenario():
        stage = Stage("mock:", name="stage")
        await stage.connect(mock=True)
        set_mock_value(stage.motor, 3.5)
        await stage.motor.set(4.5)
        return await stage.read(), stage.motor.source

    reading, source = run(scenario())
    assert reading["stage-motor"]["value"] == 4.5
    assert source == "mock+pvhub://mock:motor"


# --- side by side with ophyd-async's Channel Access backend, on one IOC --------------------------


def runs(documents: list) -> list[list]:
    grouped: list[list] = []
    for name, doc in documents:
        if name == "start":
            grouped.append([])
        grouped[-1].append((name, doc))
    return grouped


def without_source(data_keys: dict) -> dict:
    return {name: {k: v for k, v in key.items() if k != "source"} for name, key in data_keys.items()}


@pytest.mark.system
@pytest.mark.timeout(180)
def test_documents_match_channel_access(hub, zoo_ioc, prefix):
    env = {**os.environ, **zoo_ioc.ca_env(), "PVHUB_ADDRESS": hub.address, "PREFIX": prefix}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stderr[-4000:]
    both = json.loads(result.stdout)
    ca, ours = both["ca"], both["pvhub"]

    # Sources differ, and say which way the value came.
    for name, key in ours["describe"].items():
        assert key["source"] == ca["describe"][name]["source"].replace("ca://", "pvhub://")
    assert without_source(ours["describe"]) == without_source(ca["describe"])
    assert without_source(ours["describe_configuration"]) == without_source(ca["describe_configuration"])
    assert ours["values"] == ca["values"]
    assert ours["locate"] == ca["locate"]
    strip_time = lambda readings: {k: {**v, "timestamp": None} for k, v in readings.items()}  # noqa: E731
    assert strip_time(ours["read_configuration"]) == strip_time(ca["read_configuration"])
    assert strip_time(ours["reading"]) == strip_time(ca["reading"])

    ca_runs, our_runs = runs(ca["documents"]), runs(ours["documents"])
    assert len(our_runs) == len(ca_runs) == 4
    events = 0
    for number, (theirs, mine) in enumerate(zip(ca_runs, our_runs)):
        assert [n for n, _ in mine] == [n for n, _ in theirs], f"run {number}"
        for (name, a), (_, b) in zip(theirs, mine):
            if name == "start":
                assert b["plan_name"] == a["plan_name"]
            elif name == "descriptor":
                assert without_source(b["data_keys"]) == without_source(a["data_keys"]), f"run {number}"
                assert b["object_keys"] == a["object_keys"], f"run {number}"
                assert b["hints"] == a["hints"], f"run {number}"
                assert b["name"] == a["name"], f"run {number}"
                for device, config in a["configuration"].items():
                    mine_config = b["configuration"][device]
                    assert without_source(mine_config["data_keys"]) == without_source(config["data_keys"])
                    assert mine_config["data"] == config["data"], f"run {number}"
            elif name == "event":
                events += 1
                assert b["data"] == a["data"], f"run {number}"
                assert b["seq_num"] == a["seq_num"]
            elif name == "stop":
                assert b["exit_status"] == a["exit_status"] == "success"
                assert b["num_events"] == a["num_events"], f"run {number}"
    assert events == 2 + 3 + 1 + 2

    # Every datatype asked for gives what Channel Access gives: the value, its type and its
    # DataKey, or the same error in the same words; so does every refused put.
    ca_types, our_types = ca["datatypes"], ours["datatypes"]
    assert our_types.keys() == ca_types.keys()
    differences = {}
    for case, theirs in ca_types.items():
        mine = our_types[case]
        if isinstance(mine, dict) and "describe" in mine and "describe" in theirs:
            mine, theirs = {**mine, "describe": without_source(mine["describe"])}, {
                **theirs, "describe": without_source(theirs["describe"])}
        if mine != theirs:
            differences[case] = (mine, theirs)
    # The two differences there are, and why (docs/ophyd.md says the same):
    # a missing PV's error names its source; and pvhub's metadata calls DBR_SHORT and
    # DBR_LONG both "int", so a bool on a LONG is taken where Channel Access refuses it.
    assert set(differences) == {"missing", "count as bool"}, differences
    mine, theirs = differences["missing"]
    assert mine["error"] == theirs["error"] == "NotConnectedError"
    assert mine["message"] == theirs["message"].replace("ca://", "pvhub://")
    mine, theirs = differences["count as bool"]
    assert theirs["error"] == "TypeError" and mine["value"] is False


# --- pvhub's backend alone, in this process ------------------------------------------------------


class Stage(StandardReadable):
    """A motor read from ophyd-async's monitor cache (the default for a hinted Signal)."""

    def __init__(self, prefix: str, name: str = "") -> None:
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.motor = pvhub_signal_rw(float, prefix + "motor")
        super().__init__(name=name)


@pytest.mark.system
@pytest.mark.timeout(120)
def test_a_cached_read_after_a_move_sees_the_new_position(hub, prefix):
    from bluesky import RunEngine
    from bluesky.plans import scan
    from bluesky.run_engine import call_in_bluesky_event_loop

    RE = RunEngine({})
    stage = Stage(prefix, name="stage")
    call_in_bluesky_event_loop(stage.connect(timeout=15))
    events = []
    RE(scan([stage], stage.motor, -5, 5, 21), lambda name, doc: events.append(doc) if name == "event" else None)
    positions = [event["data"]["stage-motor"] for event in events]
    assert positions == [-5 + 0.5 * i for i in range(21)]


@pytest.mark.system
@pytest.mark.timeout(60)
def test_monitor_starts_with_the_current_value_and_runs_on_the_loop(hub, prefix):
    async def scenario():
        motor = pvhub_signal_rw(float, prefix + "motor", name="motor")
        await motor.connect(timeout=15)
        await motor.set(1.0)
        loop_thread = threading.current_thread()
        seen: list = []
        threads = set()
        targets = [2.0, 3.0, 4.0]

        def on_reading(reading):
            seen.append((reading["motor"]["value"], reading["motor"]["timestamp"]))
            threads.add(threading.current_thread())

        motor.subscribe_reading(on_reading)
        while not seen:
            await asyncio.sleep(0.01)
        for target in targets:
            await motor.set(target)
        async for value in observe_value(motor, timeout=10):
            if value == targets[-1]:
                break
        motor.clear_sub(on_reading)
        return seen, threads, loop_thread

    seen, threads, loop_thread = run(scenario())
    assert threads == {loop_thread}
    # Never back in time, though the actor may publish a Channel Access monitor event that
    # reached it after the put's read-back; the same value may come twice (read-back and
    # monitor, at two times).
    assert all(later[1] >= earlier[1] for earlier, later in zip(seen, seen[1:])), seen
    values = [value for i, (value, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != value]
    assert values == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_monitor_never_goes_back_in_time_under_quick_puts(hub, prefix):
    async def scenario():
        motor = pvhub_signal_rw(float, prefix + "motor", name="motor")
        await motor.connect(timeout=15)
        seen: list = []
        motor.subscribe_reading(lambda reading: seen.append(
            (reading["motor"]["value"], reading["motor"]["timestamp"])))
        for i in range(150):
            await motor.set(float(i % 7))
        async for value in observe_value(motor, timeout=10):
            if value == 149 % 7:
                break
        return seen

    seen = run(scenario())
    back = [(earlier, later) for earlier, later in zip(seen, seen[1:]) if later[1] < earlier[1]]
    assert not back, f"{len(back)} readings older than one before them: {back[:3]}"
    assert seen[-1][0] == 149 % 7


class LoopWatch:
    """The longest the event loop went without running a 5 ms ticker."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.longest = max(self.longest, now - last)
            last = now

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.mark.system
@pytest.mark.timeout(60)
def test_puts_wait_for_completion_or_not_and_never_block_the_loop(hub, prefix):
    async def scenario():
        delay = pvhub_signal_rw(float, prefix + "slow_delay")
        waited = pvhub_signal_rw(float, prefix + "slow")
        unwaited = pvhub_signal_rw(float, prefix + "slow", wait=False)
        for signal in (delay, waited, unwaited):
            await signal.connect(timeout=15)
        await delay.set(1.0)
        with LoopWatch() as watch:
            start = time.monotonic()
            await waited.set(1.0, timeout=10)
            with_wait = time.monotonic() - start
            start = time.monotonic()
            await unwaited.set(2.0)
            without_wait = time.monotonic() - start
            # The put goes on in the IOC: its completion reaches the value.
            async for value in observe_value(waited, timeout=10):
                if value == 2.0:
                    break
        return with_wait, without_wait, watch.longest

    with_wait, without_wait, longest = run(scenario())
    assert with_wait >= 0.9
    assert without_wait < 0.5
    assert longest < 0.25, f"the event loop stalled for {longest:.3f} s"


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_pv_that_never_connects_fails_with_not_connected_in_its_time(hub, prefix):
    async def scenario():
        signal = pvhub_signal_r(float, prefix + "no_such_pv", name="missing")
        with LoopWatch() as watch:
            start = time.monotonic()
            with pytest.raises(NotConnectedError) as caught:
                await signal.connect(timeout=0.5)
            took = time.monotonic() - start
        return caught.value, took, watch.longest

    error, took, longest = run(scenario())
    assert str(error) == f" pvhub://{prefix}no_such_pv\n"
    assert "could not connect within 0.5 s" in str(error.__cause__)
    assert 0.5 <= took < 2.0
    assert longest < 0.25, f"the event loop stalled for {longest:.3f} s"


@pytest.mark.timeout(30)
def test_no_daemon_fails_with_not_connected_saying_so():
    address = f"tcp://127.0.0.1:{free_tcp_port()}"

    async def scenario():
        signal = pvhub_signal_r(float, "anything", address=address)
        with pytest.raises(NotConnectedError) as caught:
            await signal.connect(timeout=0.3)
        return caught.value

    try:
        error = run(scenario())
    finally:
        close_hubs()
    assert "did not answer within 0.3 s" in str(error.__cause__)


@pytest.mark.system
@pytest.mark.timeout(60)
def test_signal_x_puts_back_the_value_it_connected_with(hub, prefix):
    async def scenario():
        reset = pvhub_signal_x(prefix + "count")
        count = pvhub_signal_rw(int, prefix + "count")
        await count.connect(timeout=15)
        await count.set(5)
        await reset.connect(timeout=15)
        await count.set(9)
        await reset.trigger()
        return await count.get_value()

    assert run(scenario()) == 5


@pytest.mark.system
@pytest.mark.timeout(60)
def test_a_refused_pv_fails_at_once_naming_which_pv(zoo_ioc, hub_factory, prefix, tmp_path, monkeypatch):
    config = tmp_path / "pvhub.toml"
    config.write_text(f'[pvs]\nallow = ["{prefix}*"]\n')
    daemon = hub_factory(zoo_ioc, args=["--config", str(config)])
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)

    async def scenario():
        # Read and write PVs connect together; the error names the one that failed.
        signal = pvhub_signal_rw(float, prefix + "motor", "elsewhere:motor")
        start = time.monotonic()
        with pytest.raises(NotConnectedError) as caught:
            await signal.connect(timeout=10)
        return caught.value, time.monotonic() - start

    try:
        error, took = run(scenario())
    finally:
        close_hubs()
    assert set(error.sub_errors) == {"write_pv"}
    refused = error.sub_errors["write_pv"]
    assert isinstance(refused, NotConnectedError) and str(refused) == " pvhub://elsewhere:motor\n"
    assert isinstance(refused.__cause__, PVNotAllowedError)
    assert took < 5.0  # refused, not timed out


@pytest.mark.system
@pytest.mark.timeout(90)
def test_a_lost_ioc_fails_reads_at_once_and_the_monitor_resumes_on_its_return(hub, zoo_ioc, prefix):
    async def scenario():
        motor = pvhub_signal_rw(float, prefix + "motor", name="motor")
        await motor.connect(timeout=15)
        await motor.set(4.0)
        seen: asyncio.Queue = asyncio.Queue()
        motor.subscribe_reading(lambda reading: seen.put_nowait(reading["motor"]["value"]))
        assert await seen.get() == 4.0
        await asyncio.to_thread(zoo_ioc.stop)
        deadline = time.monotonic() + 20
        while True:  # until the actor has noticed (caproto sees the circuit close)
            try:
                await motor.get_value(cached=False)  # not from the monitor's cache
            except DisconnectedError:
                break
            assert time.monotonic() < deadline, "reads still succeed with the IOC gone"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(zoo_ioc.start)
        returned = await asyncio.wait_for(seen.get(), 30)  # a new IOC starts from 0.0
        return returned, await motor.get_value(cached=False), seen.qsize()

    returned, value, more = run(scenario(), timeout=80)
    assert returned == value == 0.0
    assert more == 0


class Declared(StandardReadable, EpicsDevice):
    """Signals made by ophyd-async from annotations, as its own devices make them."""

    motor: A[SignalRW[float], PvSuffix("motor"), StandardReadableFormat.HINTED_SIGNAL]
    mode: A[SignalRW[str], PvSuffix("mode"), StandardReadableFormat.CONFIG_SIGNAL]


@pytest.mark.system
@pytest.mark.timeout(90)
def test_install_serves_the_signals_ophyd_async_makes_itself(hub, prefix):
    from bluesky import RunEngine
    from bluesky.plans import scan
    from bluesky.run_engine import call_in_bluesky_event_loop
    from ophyd_async.epics.core import epics_signal_r

    from pvhub.client import ophyd_async as pvhub_ophyd_async

    pvhub_ophyd_async.install()
    try:
        declared = Declared(prefix, name="declared")
        wave = epics_signal_r(Array1D[np.float64], prefix + "wave", name="wave")
    finally:
        pvhub_ophyd_async.uninstall()
    after = epics_signal_r(float, prefix + "motor")

    RE = RunEngine({})
    call_in_bluesky_event_loop(declared.connect(timeout=15))
    call_in_bluesky_event_loop(wave.connect(timeout=15))
    documents = []
    RE(scan([declared, wave], declared.motor, 1, 2, 2), lambda name, doc: documents.append((name, doc)))
    descriptor = next(doc for name, doc in documents if name == "descriptor")
    events = [doc["data"] for name, doc in documents if name == "event"]

    assert isinstance(declared.motor._connector.backend, PvhubSignalBackend)
    assert descriptor["data_keys"]["declared-motor"]["source"] == f"pvhub://{prefix}motor"
    assert descriptor["data_keys"]["wave"]["source"] == f"pvhub://{prefix}wave"
    assert descriptor["configuration"]["declared"]["data"] == {"declared-mode": "Off"}
    assert [e["declared-motor"] for e in events] == [1.0, 2.0]
    assert events[0]["wave"].tolist() == list(range(16))
    # uninstall() gave ophyd-async its own backend back (nothing here speaks Channel Access).
    assert after.source == f"ca://{prefix}motor"


@pytest.fixture
def motor_ioc(prefix: str):
    """caproto's fake motor records: ``mtr3`` moves at 3 units/s within 0..30."""
    ioc = SimulatedIOC("caproto.ioc_examples.fake_motor_record", prefix=prefix, ready_pv="mtr3")
    with ioc:
        yield ioc


@pytest.mark.timeout(90)
def test_ophyd_async_motor_moves_reads_and_stops_through_the_daemon(motor_ioc, hub_factory, prefix, monkeypatch):
    """ophyd-async's own ``Motor`` (its Signals made inside the library) against a motor
    record, unchanged, through ``install()``. caproto's fake motor record completes a put at
    once and then moves (ophyd-async's own backend sees the same), so the moves are waited
    for by their readback, and are made with ``Motor.set``, not a plan: at a plan's end the
    RunEngine stops every motor it moved, and the fake record then either stops at once or
    ignores the stop, by the tick of its 10 Hz loop the stop falls in (a real motor record
    completes the put when the move is done, before that stop)."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky.run_engine import call_in_bluesky_event_loop
    from ophyd_async.epics.motor import Motor

    from pvhub.client import ophyd_async as pvhub_ophyd_async

    monkeypatch.setenv("PVHUB_ADDRESS", hub_factory(motor_ioc).address)
    pvhub_ophyd_async.install()
    try:
        motor = Motor(prefix + "mtr3", name="motor")
    finally:
        pvhub_ophyd_async.uninstall()
    RE = RunEngine({})
    call_in_bluesky_event_loop(motor.connect(timeout=15))
    assert isinstance(motor.user_readback._connector.backend, PvhubSignalBackend)

    def position() -> float:
        return call_in_bluesky_event_loop(motor.user_readback.get_value())

    async def move(target: float) -> None:
        await motor.set(target)

    call_in_bluesky_event_loop(move(1.5))
    wait_until(lambda: position() == pytest.approx(1.5), 10, message=lambda: f"at {position()}")
    assert motor_ioc.read("mtr3.RBV").data[0] == pytest.approx(1.5)
    located = call_in_bluesky_event_loop(motor.locate())
    assert located == {"setpoint": 1.5, "readback": pytest.approx(1.5)}
    reading = call_in_bluesky_event_loop(motor.read())
    assert reading["motor"]["value"] == pytest.approx(1.5)
    described = call_in_bluesky_event_loop(motor.describe())["motor"]
    assert described["source"] == f"pvhub://{prefix}mtr3.RBV" and described["precision"] == 2
    documents: list[tuple[str, dict]] = []
    RE(count([motor]), lambda name, doc: documents.append((name, doc)))
    (event,) = [doc for name, doc in documents if name == "event"]
    assert event["data"]["motor"] == pytest.approx(1.5)

    call_in_bluesky_event_loop(move(30.0))  # 9.5 s at 3 units/s: stopped on the way
    wait_until(lambda: position() > 3.0, 10, message=lambda: f"at {position()}")
    call_in_bluesky_event_loop(motor.stop(success=False))
    wait_until(lambda: motor_ioc.read("mtr3.DMOV").data[0] == 1, 10, message="never done moving")
    stopped_at = position()
    assert 3.0 < stopped_at < 30.0
    assert motor_ioc.read("mtr3.RBV").data[0] == pytest.approx(stopped_at)
    close_hubs()
