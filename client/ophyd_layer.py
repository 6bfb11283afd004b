"""An ophyd control layer whose PVs are served by a pvhub daemon.

    from pvhub.client import ophyd_layer
    ophyd_layer.install()            # or install(address="tcp://host:5570")
    import ophyd                     # every EpicsSignal, EpicsMotor, ... now uses the hub

Rule 1: ophyd chooses its transport through ``ophyd.cl``, a namespace of ``get_pv``,
``caget``, ``caput``, ``setup``, ``thread_class``, ``get_dispatcher``, ``release_pvs`` and
``name`` (ophyd's ``_pyepics_shim`` and ``_caproto_shim`` are the two it ships). This module
is a third one; ``install`` puts it in place, and ophyd's own code runs unchanged on top.
Rule 2: callbacks reach ophyd on ophyd's ``EventDispatcher`` threads, as with its shims:
connection and access callbacks on "metadata", monitors on "monitor", put completions on
"get_put", and metadata fetches on its utility threads. The hub's callback thread only queues
them there (ophyd's ``wrap_callback``), so ophyd's threads see the order the hub saw.
Rule 3: ``install`` changes only ``ophyd.cl`` (and starts the dispatcher); Signals made before
it keep the layer they were made with. ``uninstall`` restores the layer that was there.
"""

from __future__ import annotations

import atexit
import logging
import threading
import types
from typing import Any, Callable

from pvhub.client import epics
from pvhub.client.registry import get_hub
from pvhub.client.pv import PV

name = "pvhub"
thread_class = threading.Thread
module_logger = logging.getLogger(__name__)

_EXPORTS = ("setup", "caput", "caget", "get_pv", "thread_class", "name", "release_pvs", "get_dispatcher")
_dispatcher: Any = None
_address: str | None = None
_previous_cl: Any = None
_installed = False


def get_dispatcher() -> Any:
    """The ``EventDispatcher`` of this control layer (``None`` before ``setup``)."""
    return _dispatcher


class OphydPV(PV):
    """A ``PV`` as ophyd's control layers hand it out: callbacks on ophyd's threads, plus the
    two metadata calls ophyd makes of its shims."""

    def __init__(
        self,
        pvname: str,
        callback: Callable[..., Any] | None = None,
        form: str = "time",
        verbose: bool = False,
        auto_monitor: bool | int | None = None,
        count: int | None = None,
        connection_callback: Callable[..., Any] | None = None,
        connection_timeout: float | None = None,
        access_callback: Callable[..., Any] | None = None,
        monitor_delta: float | None = None,
        *,
        address: str | None = None,
    ) -> None:
        super().__init__(
            pvname,
            callback=callback,
            form=form,
            verbose=verbose,
            auto_monitor=auto_monitor,
            count=count,
            connection_callback=connection_callback,
            connection_timeout=connection_timeout,
            access_callback=access_callback,
            monitor_delta=monitor_delta,
            address=address,
        )
        self._reference_count = 0

    def _deliver(self, kind: str, callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
        from ophyd._dispatch import wrap_callback

        if callback is None or _dispatcher is None:
            return callback
        return wrap_callback(_dispatcher, kind, callback)

    def get_all_metadata_blocking(self, timeout: float) -> dict[str, Any]:
        """Every field ophyd keeps of a PV (time and control), without the value."""
        md = self.get_timevars(timeout=timeout) or {}
        md.update(self.get_ctrlvars(timeout=timeout) or {})
        md.update(read_access=self.read_access, write_access=self.write_access)
        return md

    def get_all_metadata_callback(self, callback: Callable[[str, dict[str, Any]], Any], *,
                                  timeout: float) -> None:
        """``callback(pvname, metadata)`` from one of ophyd's utility threads."""

        def fetch(pvname: str) -> None:
            callback(pvname, self.get_all_metadata_blocking(timeout=timeout))

        _dispatcher.schedule_utility_task(fetch, pvname=self.pvname)

    def clear_callbacks(self, with_access_callback: bool = True,
                        with_connect_callback: bool = True) -> None:
        """As ophyd's shims: all callbacks, access and connection ones too."""
        super().clear_callbacks(with_access_callback, with_connect_callback)

    def release(self) -> None:
        """ophyd is done with one reference: the last one disconnects the PV. ophyd's Signals
        count their references in ``_reference_count`` themselves, as with its own shims."""
        self._reference_count -= 1
        if self._reference_count <= 0:
            self.disconnect()


def get_pv(
    pvname: str,
    form: str = "time",
    connect: bool = False,
    context: Any = None,
    timeout: float = 5.0,
    connection_callback: Callable[..., Any] | None = None,
    access_callback: Callable[..., Any] | None = None,
    callback: Callable[..., Any] | None = None,
    auto_monitor: bool | int | None = None,
    count: int | None = None,
    connection_timeout: float | None = None,
    verbose: bool = False,
    monitor_delta: float | None = None,
) -> OphydPV:
    """A new PV for each caller (ophyd counts references on it; ``release_pvs`` ends it).
    Every PV of one name shares the hub's one channel, so this costs no second monitor."""
    if context is not None:
        raise ValueError("context must be None")
    pv = OphydPV(
        pvname,
        form=form,
        connection_callback=connection_callback,
        access_callback=access_callback,
        callback=callback,
        auto_monitor=auto_monitor,
        count=count,
        connection_timeout=connection_timeout,
        verbose=verbose,
        monitor_delta=monitor_delta,
        address=_address,
    )
    if connect:
        pv.wait_for_connection(timeout=timeout)
    return pv


def release_pvs(*pvs: OphydPV) -> None:
    """ophyd is done with ``pvs`` (a Signal was destroyed or collected)."""
    for pv in pvs:
        pv.release()


def caget(pvname: str, as_string: bool = False, count: int | None = None, as_numpy: bool = True,
          use_monitor: bool = False, timeout: float = 5.0,
          connection_timeout: float = 5.0) -> Any:
    """pyepics' ``caget`` through the daemon this layer uses."""
    return epics.caget(pvname, as_string=as_string, count=count, as_numpy=as_numpy,
                       use_monitor=use_monitor, timeout=timeout,
                       connection_timeout=connection_timeout, address=_address)


def caput(pvname: str, value: Any, wait: bool = False, timeout: float = 60.0,
          connection_timeout: float = 5.0) -> int | None:
    """pyepics' ``caput`` through the daemon this layer uses."""
    return epics.caput(pvname, value, wait=wait, timeout=timeout,
                       connection_timeout=connection_timeout, address=_address)


def setup(logger: logging.Logger) -> Any:
    """Start ophyd's event dispatcher for this layer (once per process)."""
    global _dispatcher
    if _dispatcher is not None:
        logger.debug("ophyd already setup")
        return _dispatcher
    from ophyd._dispatch import EventDispatcher

    _dispatcher = EventDispatcher(context=None, logger=logger)
    return _dispatcher


def _stop_dispatcher() -> None:
    global _dispatcher
    dispatcher, _dispatcher = _dispatcher, None
    if dispatcher is not None and dispatcher.is_alive():
        dispatcher.stop()


atexit.register(_stop_dispatcher)


def install(address: str | None = None) -> types.SimpleNamespace:
    """Make pvhub ophyd's control layer: EPICS objects made from now on go through the daemon
    at ``address`` (``$PVHUB_ADDRESS``, or ``tcp://127.0.0.1:5570``). Returns ``ophyd.cl``."""
    global _address, _previous_cl, _installed
    import ophyd

    _address = get_hub(address).address
    if not _installed:
        _previous_cl = ophyd.cl
        _installed = True
    setup(logging.getLogger("ophyd"))
    module = globals()
    ophyd.cl = types.SimpleNamespace(**{key: module[key] for key in _EXPORTS})
    return ophyd.cl


def uninstall() -> None:
    """Give ophyd back the control layer it had before ``install``."""
    global _installed, _previous_cl
    import ophyd

    if _installed:
        ophyd.cl = _previous_cl
        _installed, _previous_cl = False, None
