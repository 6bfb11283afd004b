"""Run the same Bluesky plans on one ophyd-async device built twice, with pvhub's backend and
with ophyd-async's own Channel Access backend (aioca), against one IOC; print both sides'
documents, reads, descriptions and values as JSON: ``{"pvhub": {...}, "ca": {...}}``.

Run as a subprocess by ``test_ophyd_async.py``: aioca's Channel Access context reads the
EPICS environment once per process, so the IOC it must find gets a process of its own.
Environment: ``EPICS_CA_*`` pointing at the IOC, ``PVHUB_ADDRESS`` at a daemon serving it,
``PREFIX`` the IOC's PV prefix.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import numpy as np
from ophyd_async.core import (
    Array1D,
    StandardReadable,
    StandardReadableFormat,
    StrictEnum,
    SubsetEnum,
    SupersetEnum,
)


class Mode(StrictEnum):
    OFF = "Off"
    ON = "On"
    AUTO = "Auto"


class Missing(StrictEnum):
    OFF = "Off"
    ON = "On"


class Partial(SubsetEnum):
    OFF = "Off"
    AUTO = "Auto"


class Extra(SubsetEnum):
    OFF = "Off"
    STANDBY = "Standby"


class Wider(SupersetEnum):
    OFF = "Off"
    ON = "On"
    AUTO = "Auto"
    STANDBY = "Standby"


# (PV suffix, datatype): what each backend makes of a Signal asked for as that datatype.
DATATYPE_CASES: list[tuple[str, Any]] = [
    ("motor", None), ("motor", float), ("motor", int), ("motor", str), ("motor", bool),
    ("count", None), ("count", int), ("count", float), ("count", str), ("count", bool),
    ("text", None), ("text", str), ("text", int), ("text", Sequence[str]),
    ("mode", None), ("mode", str), ("mode", int), ("mode", bool), ("mode", Mode),
    ("mode", Missing), ("mode", Partial), ("mode", Extra), ("mode", Wider),
    ("wave", None), ("wave", Array1D[np.float64]), ("wave", Array1D[np.int32]),
    ("wave", np.ndarray), ("wave", float), ("wave", Sequence[str]),
    ("chars", None), ("chars", str), ("chars", Array1D[np.uint8]),
]
# (PV suffix, datatype, value): puts that must fail.
BAD_PUTS: list[tuple[str, Any, Any]] = [
    ("mode", str, "Sideways"),
    ("mode", Partial, "Sideways"),
]


class Zoo(StandardReadable):
    """A float with units, precision and limits (hinted, and moved), an int, a float array,
    and, as configuration, an enum and a string: the Signals of ``pvhub_signal_*`` or of
    ``epics_signal_*``, whichever ``signal_r`` and ``signal_rw`` make."""

    def __init__(self, prefix: str, signal_r: Callable[..., Any], signal_rw: Callable[..., Any],
                 name: str = "") -> None:
        # Uncached: a caproto IOC may send a put's completion before its monitor update, so
        # that ophyd-async's Channel Access backend, reading a moved motor from its monitor
        # cache, can see the old position (pvhub's cannot: see test_cached_read_after_move).
        with self.add_children_as_readables(StandardReadableFormat.HINTED_UNCACHED_SIGNAL):
            self.motor = signal_rw(float, prefix + "motor")
        with self.add_children_as_readables():
            self.count = signal_rw(int, prefix + "count")
            self.wave = signal_r(Array1D[np.float64], prefix + "wave")
        with self.add_children_as_readables(StandardReadableFormat.CONFIG_SIGNAL):
            self.mode = signal_rw(Mode, prefix + "mode")
            self.text = signal_rw(str, prefix + "text")
        super().__init__(name=name)


def plain(value: Any) -> Any:
    """``value`` as JSON can hold it; numpy arrays keep their dtype beside their items."""
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Enum):
        return {"enum": type(value).__name__, "value": value.value}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def run_plans(RE: Any, signal_r: Callable[..., Any], signal_rw: Callable[..., Any], prefix: str) -> dict:
    from bluesky.plan_stubs import mv, rd
    from bluesky.plans import count, list_scan, scan
    from bluesky.run_engine import call_in_bluesky_event_loop

    zoo = Zoo(prefix, signal_r, signal_rw, name="zoo")
    call_in_bluesky_event_loop(zoo.connect(timeout=10))

    documents: list = []
    token = RE.subscribe(lambda name, doc: documents.append([name, plain(doc)]))
    try:
        RE(mv(zoo.motor, 1.5, zoo.count, 7, zoo.mode, Mode.OFF, zoo.text, "hello"))
        RE(count([zoo], num=2))
        RE(scan([zoo], zoo.motor, -1, 1, 3))
        RE(mv(zoo.mode, Mode.AUTO, zoo.text, "world", zoo.count, -3))
        RE(count([zoo]))
        RE(list_scan([zoo], zoo.motor, [2.5, -2.5]))

        values: dict = {}

        def read_back():
            for signal in (zoo.motor, zoo.count, zoo.mode, zoo.text, zoo.wave):
                values[signal.name] = plain((yield from rd(signal)))

        RE(read_back())
        described = {
            "describe": call_in_bluesky_event_loop(zoo.describe()),
            "describe_configuration": call_in_bluesky_event_loop(zoo.describe_configuration()),
            "read_configuration": call_in_bluesky_event_loop(zoo.read_configuration()),
            "locate": call_in_bluesky_event_loop(zoo.motor.locate()),
            "reading": call_in_bluesky_event_loop(zoo.motor.read(cached=False)),
        }
        RE(mv(zoo.motor, 0.0, zoo.count, 0, zoo.mode, Mode.OFF, zoo.text, "hello"))
    finally:
        RE.unsubscribe(token)
    return {"documents": documents, "values": values, **plain(described)}


def type_name(datatype: Any) -> str:
    return datatype.__name__ if isinstance(datatype, type) else repr(datatype)


def outcome(error: BaseException) -> dict:
    return {"error": type(error).__name__, "message": str(error)}


async def check_datatypes(prefix: str, signal_rw: Callable[..., Any]) -> dict:
    """What connecting, reading and describing gives (or which error) for each case, and
    what each bad put raises."""
    results: dict = {}
    for suffix, datatype in DATATYPE_CASES:
        key = f"{suffix} as {type_name(datatype)}"
        signal = signal_rw(datatype, prefix + suffix, name="s")
        try:
            await signal.connect(timeout=10)
        except Exception as exc:  # recorded: the errors are what is compared
            results[key] = outcome(exc)
            continue
        results[key] = plain({
            "value": await signal.get_value(),
            "type": type(await signal.get_value()).__name__,
            "describe": await signal.describe(),
        })
    for suffix, datatype, value in BAD_PUTS:
        key = f"put {value!r} to {suffix} as {type_name(datatype)}"
        signal = signal_rw(datatype, prefix + suffix, name="s")
        await signal.connect(timeout=10)
        try:
            await signal.set(value)
            results[key] = "no error"
        except Exception as exc:  # recorded: the errors are what is compared
            results[key] = outcome(exc)
    missing = signal_rw(float, prefix + "no_such_pv", name="s")
    try:
        await missing.connect(timeout=0.5)
        results["missing"] = "connected"
    except Exception as exc:  # recorded: the errors are what is compared
        results["missing"] = outcome(exc)
    return results


def main() -> int:
    prefix = os.environ["PREFIX"]
    from bluesky import RunEngine

    from pvhub.client import close_hubs
    from pvhub.client.ophyd_async import pvhub_signal_r, pvhub_signal_rw

    from bluesky.run_engine import call_in_bluesky_event_loop

    RE = RunEngine({})
    result = {"pvhub": run_plans(RE, pvhub_signal_r, pvhub_signal_rw, prefix)}
    result["pvhub"]["datatypes"] = call_in_bluesky_event_loop(check_datatypes(prefix, pvhub_signal_rw))
    # aioca only now, so that the pvhub side runs in a process that never spoke Channel Access.
    from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

    ca_r = lambda datatype, pv, **kw: epics_signal_r(datatype, "ca://" + pv, **kw)  # noqa: E731
    ca_rw = lambda datatype, pv, **kw: epics_signal_rw(datatype, "ca://" + pv, **kw)  # noqa: E731
    result["ca"] = run_plans(RE, ca_r, ca_rw, prefix)
    result["ca"]["datatypes"] = call_in_bluesky_event_loop(check_datatypes(prefix, ca_rw))
    close_hubs()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
