"""``PV``: pyepics' PV object, with a pvhub daemon behind it instead of Channel Access.

Rule 1: a PV never speaks Channel Access. It reads its channel (kept current by the hub from
the PV's published readings), asks its actor for a fresh snapshot when told not to use the
monitor, and sends ``set`` requests. So ``get()`` answers from the latest reading without a
round trip, as pyepics does with ``auto_monitor``; ``get(use_monitor=False)`` asks the actor.
Rule 2: the channel's listener runs on the hub's I/O thread; it only captures the state that
caused the event and hands it to the hub's callback thread. User callbacks (connection,
access, monitor, put) run there, in the order the updates arrived, never on the I/O thread.
A subclass may re-route them (``_deliver``), as the ophyd layer does to ophyd's own threads.
Rule 3: pyepics' answers keep pyepics' shapes: ``get`` returns ``None`` when it cannot
connect or times out; callbacks get ``pvname``, ``value``, ``char_value``, ``timestamp``,
``status``, ``severity``, the control fields and ``cb_info``; connection callbacks get
``pvname``, ``conn``, ``pv``; access callbacks get ``read_access, write_access, pv=``.
Rule 4: every put asks for completion (the protocol's only put). ``put`` without ``wait``
waits for the daemon to accept or refuse it, so a value the PV cannot take raises at once,
as pyepics' does; ``use_complete`` then watches the completion. ``wait=True`` waits for the
completion alone, and a refusal ends it as soon.
A PV's fields, and the conversion of a value put to it, are pv_fields.py's.
"""

from __future__ import annotations

import math
import types
from concurrent.futures import Future
from typing import Any, Callable

from pvhub import protocol as p
from pvhub.client.channel import Channel
from pvhub.client.dispatcher import array_bytes
from pvhub.client.hub import Hub
from pvhub.client.registry import get_hub
from pvhub.client.pv_fields import (
    PVFields,
    access_rights,
    as_native,
    char_value,
    ctrl_fields,
    ctrl_vars,
    shaped,
    time_fields,
)
from pvhub.client.values import FORM_OFFSET
from pvhub.errors import PutFailedError, PvhubError, error_from_code
from pvhub.logs import library_logger

log = library_logger("pvhub.client")

DEFAULT_CONNECTION_TIMEOUT = 5.0  # the first use of a PV starts its actor process
DEFAULT_PUT_TIMEOUT = 30.0
# How long a put waits for the daemon to accept or refuse it (not for its completion).
ACCEPT_TIMEOUT = 5.0


class _Captured:
    """What a channel held when it caused an event (taken on the I/O thread, under its lock)."""

    __slots__ = ("ready", "reading", "metadata", "old")

    def __init__(self, channel: Channel, old: p.Reading | None) -> None:
        self.ready = channel.ready
        self.reading = channel.reading
        self.metadata = channel.metadata  # replaced by the channel, never changed: no copy
        self.old = old


class PV(PVFields):
    """A process variable as pyepics presents it; its data comes from a pvhub daemon.

    ``PV(pvname, callback=None, form='time', verbose=False, auto_monitor=None, count=None,
    connection_callback=None, connection_timeout=None, access_callback=None)`` as pyepics,
    plus ``address`` (the daemon; ``$PVHUB_ADDRESS`` by default) or ``hub``.
    """

    def __init__(
        self,
        pvname: str,
        callback: Callable[..., Any] | list | tuple | None = None,
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
        hub: Hub | None = None,
    ) -> None:
        if not isinstance(pvname, str) or not pvname.strip():
            raise ValueError("pvname must be a non-empty PV name")
        self.pvname = pvname.strip()
        self.form = form.lower()
        if self.form not in FORM_OFFSET:
            raise ValueError(f"form must be 'native', 'time' or 'ctrl', not {form!r}")
        self.verbose = verbose
        # Readings are always monitored: what pyepics decides at connection for all but huge arrays.
        self.auto_monitor = True if auto_monitor is None else auto_monitor
        self.monitor_delta = monitor_delta
        self.connection_timeout = DEFAULT_CONNECTION_TIMEOUT if connection_timeout is None else connection_timeout
        self.chid = None  # no CA channel here; pyepics callers only test it against None
        self._user_count = count
        self.callbacks: dict[int, tuple[Callable[..., Any], dict[str, Any]]] = {}
        self.connection_callbacks: list[Callable[..., Any]] = []
        self.access_callbacks: list[Callable[..., Any]] = []
        if connection_callback is not None:
            self.connection_callbacks.append(self._deliver("metadata", connection_callback))
        if access_callback is not None:
            self.access_callbacks.append(self._deliver("metadata", access_callback))
        for index, function in enumerate(callback if isinstance(callback, (list, tuple)) else [callback]):
            if callable(function):
                self.callbacks[index] = (self._deliver("monitor", function), {})
        self._put_complete: bool | None = None
        self._last_put: Future | None = None  # the last put's outcome: None, or its error
        self._seen_connected = False  # as the callback thread last told it
        self._seen_access: tuple[bool, bool] | None = None
        self._newest_stamp: float | None = None  # of the newest value delivered
        self._released = False
        self._hub = hub or get_hub(address)
        self._channel = self._hub.channel(self.pvname, owner=self)
        with self._channel.cond:
            # Under the channel's lock: no event is lost or seen twice between the check and
            # the listener (the listener runs under the same lock).
            self._channel.add_listener(self._on_channel)
            if self._channel.ready:
                self._hub.dispatch_change(self, False, 0, self._on_event, "meta", _Captured(self._channel, None))

    # --- where callbacks run (Rule 2) ------------------------------------------------------

    def _deliver(self, kind: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        """``callback`` as it should be called for events of ``kind`` ("metadata", "monitor",
        "get_put"): here, as it is, on the hub's callback thread."""
        return callback

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._channel.ready

    def wait_for_connection(self, timeout: float | None = None) -> bool:
        """Whether the PV is connected (and has a value) within ``timeout`` seconds."""
        timeout = self.connection_timeout if timeout is None else timeout
        channel = self._channel
        if channel.ready:
            return True
        channel.wait(lambda: channel.ready or channel.error is not None, timeout)
        if channel.error is not None:
            raise channel.error
        return channel.ready

    def connect(self, timeout: float | None = None) -> bool:
        return self.wait_for_connection(timeout)

    def reconnect(self) -> bool:
        """The hub reconnects by itself; this only reports whether it is connected."""
        return self.wait_for_connection()

    def poll(self, evt: float = 1.0e-4, iot: float = 1.0) -> None:
        """Nothing to poll: updates arrive on their own thread."""

    def force_read_access_rights(self) -> None:
        """Access rights arrive with every metadata change; nothing to force."""

    # --- values -----------------------------------------------------------------------------

    def _fetch(self, timeout: float) -> tuple[p.Reading | None, dict[str, Any]] | None:
        """Ask the PV's actor for its latest state; ``None`` if no answer within ``timeout``."""
        future = self._hub.request(lambda rid: p.ReadRequest(id=rid, pv=self.pvname, fresh=True), timeout=timeout)
        try:
            snapshot = future.result(timeout)
        except TimeoutError:
            return None
        except PvhubError as exc:
            log.warning("pv_read_failed", pv=self.pvname, error=str(exc))
            return None
        if not isinstance(snapshot, p.Snapshot) or not snapshot.connected:
            return None
        metadata = dict(snapshot.metadata) if snapshot.metadata is not None else self._state()[1]
        return snapshot.reading, metadata

    def get(self, count: int | None = None, as_string: bool = False, as_numpy: bool = True,
            timeout: float | None = None, with_ctrlvars: bool = False,
            use_monitor: bool = True) -> Any:
        """The PV's value (``None`` if it cannot connect, or the read times out)."""
        data = self.get_with_metadata(count=count, as_string=as_string, as_numpy=as_numpy,
                                      timeout=timeout, with_ctrlvars=with_ctrlvars,
                                      use_monitor=use_monitor)
        return None if data is None else data["value"]

    def get_with_metadata(self, count: int | None = None, as_string: bool = False,
                          as_numpy: bool = True, timeout: float | None = None,
                          with_ctrlvars: bool = False, form: str | None = None,
                          use_monitor: bool = True, as_namespace: bool = False) -> Any:
        """``{"value", ...}`` with the fields of ``form`` ('time': alarm and timestamp;
        'ctrl': units, limits, precision, enum strings), or ``None`` as pyepics. From the
        monitor in the PV's own form, every field the PV holds, as pyepics' copy of its
        cache (``units``, ``host``, ``count``, ``char_value``...)."""
        form = self.form if form is None else form.lower()
        if not self.wait_for_connection(timeout):
            return None
        if use_monitor:
            reading, metadata = self._state()
        else:
            fetched = self._fetch(_read_timeout(timeout, count))
            if fetched is None:
                return None
            reading, metadata = fetched
        if reading is None:
            return None
        if use_monitor and form == self.form:
            # pyepics answers from its monitor with a copy of every field it holds.
            info = self._callback_fields(reading, metadata)
        else:
            info = time_fields(reading) if form == "time" else {}
            if form == "time":
                info.update(status=reading.status, severity=reading.severity)
            if form == "ctrl":
                info.update(ctrl_vars(metadata))
                info.update(status=reading.status, severity=reading.severity)
            elif with_ctrlvars:
                info.update(ctrl_fields(metadata))
                info.update(status=reading.status, severity=reading.severity)
        value = shaped(reading.value, metadata, count, as_numpy)
        info["value"] = char_value(value, metadata, self.count) if as_string else value
        return types.SimpleNamespace(**info) if as_namespace else info

    def get_ctrlvars(self, timeout: float = 5, warn: bool = True) -> dict[str, Any] | None:
        """The control fields (units, limits, precision, enum strings, alarm)."""
        if not self.wait_for_connection(timeout):
            return None
        reading, metadata = self._state()
        info = ctrl_vars(metadata)
        if reading is not None:
            info.update(status=reading.status, severity=reading.severity)
            if metadata.get("native_type") == "string":
                info.update(time_fields(reading))  # libca answers DBR_CTRL_STRING with its time
        return info

    def get_timevars(self, timeout: float = 5, warn: bool = True) -> dict[str, Any] | None:
        """The time fields (alarm status and severity, timestamp) of a fresh read of the IOC, as
        pyepics reads them (a monitor may hold back changes within the record's deadband)."""
        if not self.wait_for_connection(timeout):
            return None
        fetched = self._fetch(timeout)
        if fetched is None or fetched[0] is None:
            return None
        reading = fetched[0]
        return {"status": reading.status, "severity": reading.severity, **time_fields(reading)}

    def put(self, value: Any, wait: bool = False, timeout: float = DEFAULT_PUT_TIMEOUT,
            use_complete: bool = False, callback: Callable[..., Any] | None = None,
            callback_data: Any = None) -> int | None:
        """Write ``value`` (Rule 4). Returns 1; -1 if ``wait`` ran out of time first; ``None``
        if the PV did not connect. A refused put raises (``BadValueError``, ``ReadOnlyError``,
        ...); with ``wait``, so does a failed completion."""
        if not self.wait_for_connection():
            return None
        if timeout is None:
            timeout = math.inf
        accepted: Future = Future()
        completed: Future = Future()
        self._last_put = completed  # its outcome, however it ends (``caput_many``)
        channel, hub, pvname = self._channel, self._hub, self.pvname
        notify = self._deliver("get_put", callback) if callback is not None else None
        if use_complete:
            self._put_complete = False

        def finish(error: PvhubError | None) -> None:
            # On the callback thread: after every update this put caused.
            if use_complete and error is None:
                self._put_complete = True
            if notify is not None and (error is None or isinstance(error, PutFailedError)):
                # pyepics calls a put's callback once the IOC answers, however it answered.
                notify(pvname=pvname, data=callback_data)

        def on_reply(message: p.Message) -> bool:
            if isinstance(message, p.SetAccepted):
                accepted.set_result(True)
                return False
            if isinstance(message, p.SetDone):
                channel.apply_reply(message)  # read-your-writes: a get after it sees the read-back
                error = None
            elif isinstance(message, p.ErrorReply):
                error = error_from_code(message.code, message.message)
                if accepted.done():
                    log.warning("pv_put_failed", pv=pvname, error=str(error))
            else:
                return False
            if not accepted.done():
                accepted.set_result(error or True)
            completed.set_result(error)
            hub.dispatch(finish, error)
            return True

        value = as_native(value, self._metadata())
        # With ``wait`` the end is what counts (a refusal is one too): the acceptance is not
        # asked for, a message less each way (protocol Rule 3).
        hub.request(lambda rid: p.SetRequest(id=rid, pv=pvname, value=value, accepted=not wait), on_reply)
        if not wait:
            return self._accepted(accepted, pvname)
        try:
            error = completed.result(None if math.isinf(timeout) else timeout)
        except TimeoutError:
            return -1
        if error is not None:
            raise error
        return 1

    @staticmethod
    def _accepted(accepted: Future, pvname: str) -> int:
        """Wait for a put without ``wait`` to be accepted (1) or refused (raises)."""
        try:
            answer = accepted.result(ACCEPT_TIMEOUT)
        except TimeoutError:
            raise error_from_code("hub_unavailable", f"{pvname}: the put was neither accepted nor refused "
                                  f"within {ACCEPT_TIMEOUT} s; its outcome is unknown") from None
        if isinstance(answer, PvhubError):
            raise answer
        return 1

    @property
    def put_complete(self) -> bool | None:
        """After ``put(use_complete=True)``: whether it has completed."""
        return self._put_complete

    def _getval(self) -> Any:
        return self.get()

    def _setval(self, value: Any) -> None:
        self.put(value)

    value = property(_getval, _setval, None, "the PV's value (a put when assigned)")

    # --- callbacks --------------------------------------------------------------------------

    def add_callback(self, callback: Callable[..., Any] | None = None, index: int | None = None,
                     run_now: bool = False, with_ctrlvars: bool = True, **kw: Any) -> int | None:
        """Call ``callback(**fields, **kw, cb_info=(index, pv))`` on every new value; returns
        its index for ``remove_callback``. ``kw`` are the caller's own keyword arguments,
        passed back to it unchanged (pyepics' interface)."""
        if callable(callback):
            if index is None:
                index = 1 + max(self.callbacks, default=0)
            self.callbacks[index] = (self._deliver("monitor", callback), kw)
        if run_now and self.connected and index is not None:
            self.run_callback(index)
        return index

    def remove_callback(self, index: int | None = None) -> None:
        self.callbacks.pop(index, None)  # type: ignore[arg-type]

    def clear_callbacks(self, with_access_callback: bool = False,
                        with_connect_callback: bool = False) -> None:
        self.callbacks = {}
        if with_access_callback:
            self.access_callbacks = []
        if with_connect_callback:
            self.connection_callbacks = []

    def run_callbacks(self) -> None:
        """Call every monitor callback now with the latest value."""
        for index in sorted(self.callbacks):
            self.run_callback(index)

    def run_callback(self, index: int) -> None:
        """Call the monitor callback ``index`` now with the latest value."""
        entry = self.callbacks.get(index)
        reading, metadata = self._state()
        if entry is None or reading is None:
            return
        function, kw = entry
        function(**self._callback_fields(reading, metadata), **kw, cb_info=(index, self))

    def clear_auto_monitor(self) -> None:
        """The hub keeps one monitor per PV for every client; this PV's callbacks stop."""
        self.auto_monitor = False

    def disconnect(self, deepclean: bool = True) -> None:
        """Stop hearing from the channel: no more callbacks of any kind."""
        self._released = True
        self.clear_callbacks(True, True)
        self._channel.remove_listener(self._on_channel)

    def join_callbacks(self, connection_callback: Callable[..., Any] | None = None,
                       access_callback: Callable[..., Any] | None = None) -> None:
        """Add callbacks to a PV that may be connected already (pyepics' ``get_pv`` of a cached
        PV). On the callback thread, after every event queued before: a connection callback
        hears that the PV is connected once, if it is, then every change, never twice."""
        if connection_callback is not None:
            self._hub.dispatch_change(self, False, 0, self._join_connection, self._deliver("metadata", connection_callback))
        if access_callback is not None:
            self.access_callbacks.append(self._deliver("metadata", access_callback))

    def _join_connection(self, callback: Callable[..., Any]) -> None:
        if self._released:
            return
        self.connection_callbacks.append(callback)
        if self._seen_connected:
            self._call(callback, pvname=self.pvname, conn=True, pv=self)

    def listens_to(self, hub: Hub) -> bool:
        """Whether this PV still hears from ``hub``: made with it, and not disconnected."""
        return not self._released and self._hub is hub

    # --- events: the I/O thread captures, the callback thread acts (Rule 2) ---------------

    def _on_channel(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        captured = _Captured(channel, old)
        size = array_bytes(captured.reading.value) if kind == "value" and captured.reading is not None else 0
        self._hub.dispatch_change(self, kind == "value", size, self._on_event, kind, captured)

    def _on_event(self, kind: str, state: _Captured) -> None:
        if self._released:
            return
        was_connected = self._seen_connected
        self._seen_connected = state.ready
        if state.ready != was_connected:
            self._seen_access = None
            self._newest_stamp = None  # a new connection's first value is never stale
            for callback in list(self.connection_callbacks):
                self._call(callback, pvname=self.pvname, conn=state.ready, pv=self)
        if state.ready:
            access = access_rights(state.metadata)
            if access != self._seen_access:
                self._seen_access = access
                for callback in list(self.access_callbacks):
                    self._call(callback, access[0], access[1], pv=self)
        if kind == "value" and state.ready and state.reading is not None:
            newest = self._newest_stamp
            if newest is not None and state.reading.timestamp < newest:
                # A monitor update overtaken by a newer reading (the daemon publishes a put's
                # read-back at once; the IOC's monitor of an earlier value can follow it).
                log.debug("pv_stale_update_dropped", pv=self.pvname, timestamp=state.reading.timestamp)
                return
            self._newest_stamp = state.reading.timestamp
            if not self.callbacks and not self.verbose:
                return  # nobody to tell: no fields built (a PV caget left in the cache)
            fields = self._callback_fields(state.reading, state.metadata)
            if self.verbose:
                log.info("pv_update", pv=self.pvname, value=fields["char_value"])
            for index, (function, kw) in sorted(self.callbacks.items()):
                self._call(function, **fields, **kw, cb_info=(index, self))

    def _call(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("pv_callback_failed", pv=self.pvname, callback=repr(callback))

    def __repr__(self) -> str:
        if not self.connected:
            return f"<PV '{self.pvname}': not connected>"
        count = f"{self.count}" if self.nelm == 1 else f"{self.count}/{self.nelm}"
        return f"<PV '{self.pvname}', count={count}, type={self.typefull}, access={self.access}>"

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


def _read_timeout(timeout: float | None, count: int | None) -> float:
    # pyepics: 0.5 s plus more for large arrays; a daemon round trip needs a little more.
    if timeout is not None:
        return timeout
    return 1.0 + math.log10(max(1, count or 1))
