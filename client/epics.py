"""pyepics' functions for scripts, through a pvhub daemon.

    from pvhub.client import epics     # was: import epics
    epics.caput("m1:VAL", 2.0, wait=True)
    epics.caget("m1:RBV")

Rule 1: the names, arguments and answers are pyepics' (``caget`` returns ``None`` when the PV
does not connect, ``caput`` returns 1, or -1 when ``wait`` ran out of time); ``PV`` is the
same class the ophyd layer uses. What only a daemon adds is keyword-only: ``address``.
Rule 2: PVs are made once per name (and form) and kept (``get_pv``), as pyepics' cache keeps
them, so a script that reads a PV in a loop pays for its connection once.
Rule 3: ``camonitor`` writes one line per update through ``writer`` (``print`` by default),
or calls ``callback``; callbacks run on the hub's callback thread, never on the I/O thread.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any, Callable

from pvhub.client.devices import Device, Motor, MotorException, MotorLimitException
from pvhub.client.pv import PV
from pvhub.client.pv_fields import format_time
from pvhub.client.registry import get_hub
from pvhub.errors import PutFailedError

__all__ = ["INVALID_ALARM", "MAJOR_ALARM", "MINOR_ALARM", "NO_ALARM", "PV", "Device", "Motor", "MotorException",
           "MotorLimitException", "caget", "caget_many", "cainfo", "camonitor", "camonitor_clear", "caput",
           "caput_many", "clear_pv_cache", "get_pv", "poll"]

# Alarm severities, as pyepics names them.
NO_ALARM = 0
MINOR_ALARM = 1
MAJOR_ALARM = 2
INVALID_ALARM = 3
ECA_NORMAL = 1  # what pyepics' poll returns when nothing failed

_MONITOR_INDEX = -999  # pyepics' own index for camonitor's callback
_monitors: dict[str, PV] = {}
_pv_cache: dict[tuple[str, str, str], PV] = {}  # Rule 2: by name, form and daemon
_pv_cache_lock = threading.Lock()


def get_pv(pvname: str, form: str = "time", connect: bool = False, context: Any = None,
           timeout: float = 5.0, connection_callback: Callable[..., Any] | None = None,
           access_callback: Callable[..., Any] | None = None,
           callback: Callable[..., Any] | None = None, *, address: str | None = None) -> PV:
    """The process's PV for ``pvname`` (made once per name and form, as pyepics caches it).

    Callbacks given here are added to a cached PV too. ``context`` is pyepics' CA context:
    there is none here, and only ``None`` is accepted."""
    if context is not None:
        raise ValueError("there is no Channel Access context with pvhub; pass context=None")
    hub = get_hub(address)
    key = (pvname.strip(), form.lower(), hub.address)
    with _pv_cache_lock:
        pv = _pv_cache.get(key)
        made = pv is None or not pv.listens_to(hub)
        if made:
            pv = _pv_cache[key] = PV(pvname, form=form, hub=hub, connection_callback=connection_callback,
                                     access_callback=access_callback)
    if not made:
        pv.join_callbacks(connection_callback, access_callback)
    if callback is not None:
        pv.add_callback(callback)
    if connect:
        pv.wait_for_connection(timeout)
    return pv


def clear_pv_cache() -> None:
    """Forget every cached PV (their callbacks stop)."""
    with _pv_cache_lock:
        pvs = list(_pv_cache.values())
        _pv_cache.clear()
    for pv in pvs:
        pv.disconnect()


def caput(pvname: str, value: Any, wait: bool = False, timeout: float = 60.0,
          connection_timeout: float = 5.0, *, address: str | None = None) -> int | None:
    """Write ``value`` to ``pvname``; with ``wait``, until the IOC reports the put complete.

    Returns 1, -1 if ``wait`` ran out of ``timeout``, ``None`` if the PV did not connect."""
    start = time.monotonic()
    pv = get_pv(pvname, connect=False, address=address)
    if not pv.wait_for_connection(connection_timeout):
        return None
    return pv.put(value, wait=wait, timeout=timeout - (time.monotonic() - start))


def caget(pvname: str, as_string: bool = False, count: int | None = None, as_numpy: bool = True,
          use_monitor: bool = True, timeout: float = 5.0, connection_timeout: float = 5.0,
          *, address: str | None = None) -> Any:
    """The value of ``pvname`` (a label or text with ``as_string``); ``None`` if it does not
    connect within ``connection_timeout`` or the read takes longer than ``timeout``."""
    start = time.monotonic()
    pv = get_pv(pvname, connect=False, address=address)
    if not pv.wait_for_connection(connection_timeout):
        return None
    return pv.get(count=count, as_string=as_string, as_numpy=as_numpy,
                  timeout=max(0.0, timeout - (time.monotonic() - start)), use_monitor=use_monitor)


def caget_many(pvlist: list[str], as_string: bool = False, as_numpy: bool = True,
               count: int | None = None, timeout: float = 1.0, connection_timeout: float = 5.0,
               conn_timeout: float | None = None, *, address: str | None = None) -> list[Any]:
    """The values of ``pvlist``, in order, ``None`` for a PV that did not connect within
    ``connection_timeout`` (for all of them together) or whose read took over ``timeout``."""
    if conn_timeout is not None:
        connection_timeout = conn_timeout
    pvs = [get_pv(name, connect=False, address=address) for name in pvlist]
    deadline = time.monotonic() + connection_timeout
    connected = [pv.wait_for_connection(max(0.0, deadline - time.monotonic())) for pv in pvs]
    return [pv.get(count=count, as_string=as_string, as_numpy=as_numpy, timeout=timeout) if up else None
            for pv, up in zip(pvs, connected)]


def caput_many(pvlist: list[str], values: list[Any], wait: bool | str = False,
               connection_timeout: float = 5.0, put_timeout: float = 60.0,
               *, address: str | None = None) -> list[int]:
    """Write ``values`` to ``pvlist``, in order: 1 for each put that went (or completed),
    -1 for one that did not. ``wait="each"`` waits for each put to complete before the next;
    ``wait="all"`` sends them all, then waits for all (``put_timeout`` in all), as pyepics."""
    if len(pvlist) != len(values):
        raise ValueError("List of PV names must be equal to list of values.")
    pvs = [get_pv(name, connect=False, address=address) for name in pvlist]
    deadline = time.monotonic() + connection_timeout
    for pv in pvs:
        pv.wait_for_connection(max(0.0, deadline - time.monotonic()))
    if wait != "all":
        return [_put_one(pv, value, wait == "each", put_timeout) for pv, value in zip(pvs, values)]
    sent = []
    for pv, value in zip(pvs, values):
        result = pv.put(value, use_complete=True)
        # Each put's end, however it ends: completed, failed by the IOC, or with its outcome
        # unknown (the daemon lost), which pyepics' put callback is never told of.
        sent.append(pv._last_put if result == 1 else None)
    futures.wait([outcome for outcome in sent if outcome is not None], timeout=put_timeout)
    return [1 if outcome is not None and outcome.done() and outcome.result() is None else -1
            for outcome in sent]


def _put_one(pv: PV, value: Any, wait: bool, timeout: float) -> int:
    """1 for a put sent (and, with ``wait``, completed); -1 for one that did not connect, ran
    out of time or that the IOC failed. A value the PV refuses still raises."""
    try:
        return 1 if pv.put(value, wait=wait, timeout=timeout) == 1 else -1
    except PutFailedError:
        return -1


def poll(evt: float = 1.0e-5, iot: float = 1.0) -> int:
    """pyepics' event pump: here callbacks arrive on their own thread, so this only waits
    ``evt`` seconds (as pyepics' ``pend_event`` does), which keeps a polling loop from
    spinning a core."""
    time.sleep(evt)
    return ECA_NORMAL


def cainfo(pvname: str, print_out: bool = True, timeout: float = 5.0,
           connection_timeout: float = 5.0, *, address: str | None = None) -> str | None:
    """pyepics' status paragraph about ``pvname``: printed, or returned with ``print_out=False``
    (``None`` if the PV does not connect)."""
    pv = get_pv(pvname, connect=False, address=address)
    if not pv.wait_for_connection(connection_timeout):
        return None
    text = pv.info
    if print_out:
        print(text)
        return None
    return text


def camonitor(pvname: str, writer: Callable[[str], Any] | None = None,
              callback: Callable[..., Any] | None = None, connection_timeout: float = 5.0,
              monitor_delta: float | None = None, *, address: str | None = None) -> None:
    """Report every update of ``pvname``: ``callback(**fields)`` if given, else a line
    ``"<pvname> <time> <value>"`` to ``writer`` (``print``). ``camonitor_clear`` stops it."""
    if writer is None:
        writer = print
    if callback is None:

        def callback(pvname: str | None = None, value: Any = None, char_value: str | None = None,
                     timestamp: float | None = None, **fields: Any) -> None:
            # pyepics hands a monitor callback every PV field by keyword; this one needs three.
            text = char_value if char_value is not None else repr(value)
            writer(f"{pvname:.32s} {format_time(timestamp or time.time())} {text}")

    pv = get_pv(pvname, connect=False, address=address)
    if not pv.wait_for_connection(connection_timeout):
        return
    pv.monitor_delta = monitor_delta
    pv.add_callback(callback, index=_MONITOR_INDEX, run_now=False)
    _monitors[pvname] = pv


def camonitor_clear(pvname: str) -> None:
    """Stop the monitor ``camonitor`` set on ``pvname``."""
    pv = _monitors.pop(pvname, None)
    if pv is not None:
        pv.remove_callback(_MONITOR_INDEX)
