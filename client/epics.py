"""pyepics' functions for scripts, through a pvhub daemon.

    from pvhub.client import epics     # was: import epics
    epics.caput("m1:VAL", 2.0, wait=True)
    epics.caget("m1:RBV")

Rule 1: the names, arguments and answers are pyepics' (``caget`` returns ``None`` when the PV
does not connect, ``caput`` returns 1, or -1 when ``wait`` ran out of time); ``PV`` is the
same class the ophyd layer uses. What only a daemon adds is keyword-only: ``address``.
Rule 2: PVs are made once per name (and form) and kept, as pyepics' cache keeps them, so a
script that reads a PV in a loop pays for its connection once.
Rule 3: ``camonitor`` writes one line per update through ``writer`` (``print`` by default),
or calls ``callback``; callbacks run on the hub's callback thread, never on the I/O thread.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pvhub.client.pv import PV, _format_time, clear_pv_cache, get_pv

__all__ = ["PV", "caget", "cainfo", "camonitor", "camonitor_clear", "caput", "clear_pv_cache", "get_pv"]

_MONITOR_INDEX = -999  # pyepics' own index for camonitor's callback
_monitors: dict[str, PV] = {}


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
            writer(f"{pvname:.32s} {_format_time(timestamp or time.time())} {text}")

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
