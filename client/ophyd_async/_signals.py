"""``pvhub_signal_r/rw/w/x``, and ``install()`` for the Signals ophyd-async makes itself.

Rule 1: each factory has the signature of its ``epics_signal_*`` twin (plus a keyword-only
``address``), so a device written for Channel Access changes its import line and nothing else.
Rule 2: devices whose Signals ophyd-async makes inside the library (its ``Motor``,
areaDetector drivers, declarative ``EpicsDevice``s) have no import line to change;
``install()`` swaps the backend ophyd-async picks for Channel Access, and ``uninstall()``
swaps it back. Both act on Signals made afterwards only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ophyd_async.core import DEFAULT_TIMEOUT, SignalDatatypeT, SignalR, SignalRW, SignalW, SignalX
from ophyd_async.epics.core import EpicsOptions

from pvhub.client.ophyd_async._backend import PvhubSignalBackend


def pvhub_signal_rw(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    write_pv: str | None = None,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
    *,
    address: str | None = None,
) -> SignalRW[SignalDatatypeT]:
    """A ``SignalRW`` backed by 1 or 2 PVs served by pvhub (``epics_signal_rw``'s twin).

    :param datatype: Check that the PV is of this type
    :param read_pv: The PV to read and monitor
    :param write_pv: If given, use this PV to write to, otherwise use read_pv
    :param name: The name of the signal (defaults to empty string)
    :param timeout: A timeout to be used when reading (not connecting) this signal
    :param address: The daemon (default: ``$PVHUB_ADDRESS``)
    """
    backend = PvhubSignalBackend(
        datatype, read_pv, write_pv or read_pv, EpicsOptions(wait=wait), address=address
    )
    return SignalRW(backend, name=name, timeout=timeout, attempts=attempts)


def pvhub_signal_r(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    *,
    address: str | None = None,
) -> SignalR[SignalDatatypeT]:
    """A ``SignalR`` backed by 1 PV served by pvhub (``epics_signal_r``'s twin)."""
    backend = PvhubSignalBackend(datatype, read_pv, read_pv, address=address)
    return SignalR(backend, name=name, timeout=timeout)


def pvhub_signal_w(
    datatype: type[SignalDatatypeT],
    write_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
    *,
    address: str | None = None,
) -> SignalW[SignalDatatypeT]:
    """A ``SignalW`` backed by 1 PV served by pvhub (``epics_signal_w``'s twin)."""
    backend = PvhubSignalBackend(
        datatype, write_pv, write_pv, EpicsOptions(wait=wait), address=address
    )
    return SignalW(backend, name=name, timeout=timeout, attempts=attempts)


def pvhub_signal_x(
    write_pv: str, name: str = "", timeout: float = DEFAULT_TIMEOUT, *, address: str | None = None
) -> SignalX:
    """A ``SignalX`` whose trigger puts the PV's value at connection back (``epics_signal_x``'s
    twin; ophyd-async deprecates both for ``TriggerableCommand``)."""
    backend = PvhubSignalBackend(None, write_pv, write_pv, address=address)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SignalX(backend, name=name, timeout=timeout)


_replaced: dict[str, Any] = {}


def install() -> None:
    """Serve ophyd-async's Channel Access Signals through pvhub, made after this call.

    ophyd-async's own devices (``ophyd_async.epics.motor.Motor``, areaDetector drivers) and
    declarative ``EpicsDevice``s make their Signals with ``epics_signal_*`` inside the
    library, where no import line can be changed. Those calls pick their backend by
    protocol through the module ``ophyd_async.epics.core._signal`` (0.21); this puts
    ``PvhubSignalBackend`` there in place of ``CaSignalBackend``, and makes Channel Access
    the protocol of PVs named without one. ``pva://`` PVs and triggerable commands are left
    as they are. ``uninstall()`` puts ophyd-async's own back.
    """
    from ophyd_async.epics.core import _signal as epics_signal

    if _replaced:
        return
    _replaced.update(CaSignalBackend=epics_signal.CaSignalBackend,
                     _default_epics_protocol=epics_signal._default_epics_protocol)
    epics_signal.CaSignalBackend = PvhubSignalBackend
    epics_signal._default_epics_protocol = epics_signal.EpicsProtocol.CA


def uninstall() -> None:
    """Undo ``install()`` for Signals made after this call."""
    from ophyd_async.epics.core import _signal as epics_signal

    for name, value in _replaced.items():
        setattr(epics_signal, name, value)
    _replaced.clear()
