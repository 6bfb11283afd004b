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
Rule 4: every put asks for completion (the protocol's only put). ``put`` waits for the
daemon to accept or refuse it, so a value the PV cannot take raises at once, as pyepics'
does; ``wait=True`` (or ``use_complete``) then waits for, or watches, the completion.
Rule 5: a value is converted to the PV's native type as a CA client converts it before
sending (a float put to an integer PV is truncated); the daemon checks what remains.
"""

from __future__ import annotations

import math
import threading
import time
import types
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from pvhub import protocol as p
from pvhub.client.channel import Channel
from pvhub.client.hub import Hub, get_hub
from pvhub.errors import PutFailedError, PvhubError, error_from_code
from pvhub.logs import library_logger

log = library_logger("pvhub.client")

DEFAULT_CONNECTION_TIMEOUT = 5.0  # the first use of a PV starts its actor process
DEFAULT_PUT_TIMEOUT = 30.0
# How long a put waits for the daemon to accept or refuse it (not for its completion).
ACCEPT_TIMEOUT = 5.0
AUTOMONITOR_MAXLENGTH = 65536  # pyepics' threshold for char waveforms read as text

# EPICS DBR type numbers by pvhub's native type: the plain type; +14 is its TIME_ form and
# +28 its CTRL_ form (db_access.h). pvhub keeps "int" and "float" only, as LONG and DOUBLE.
_DBR_NATIVE = {"string": 0, "int": 5, "float": 6, "enum": 3, "char": 4}
_DBR_NAMES = {0: "string", 1: "short", 2: "float", 3: "enum", 4: "char", 5: "long", 6: "double"}
_FORM_OFFSET = {"native": 0, "time": 14, "ctrl": 28}

_CTRL_KEYS = (
    "precision",
    "units",
    "upper_disp_limit",
    "lower_disp_limit",
    "upper_alarm_limit",
    "lower_alarm_limit",
    "upper_warning_limit",
    "lower_warning_limit",
    "upper_ctrl_limit",
    "lower_ctrl_limit",
)
_TIME_KEYS = ("status", "severity", "timestamp", "posixseconds", "nanoseconds")
_ACCESS_TEXT = {(False, False): "no access", (True, False): "read-only",
                (False, True): "write-only", (True, True): "read/write"}


def dbr_type(native: str | None, form: str) -> int | None:
    """The DBR type number of a ``native`` pvhub type read in ``form``."""
    base = _DBR_NATIVE.get(native or "")
    return None if base is None else base + _FORM_OFFSET.get(form, 0)


def dbr_name(ftype: int | None) -> str:
    """pyepics' name for a DBR type number: ``"double"``, ``"time_enum"``, ``"ctrl_long"``..."""
    if ftype is None:
        return "unknown"
    form, base = divmod(ftype, 14)
    prefix = {0: "", 1: "time_", 2: "ctrl_"}.get(form, "")
    return prefix + _DBR_NAMES.get(base, "unknown")


class _Captured:
    """What a channel held when it caused an event (taken on the I/O thread, under its lock)."""

    __slots__ = ("ready", "reading", "metadata", "old")

    def __init__(self, channel: Channel, old: p.Reading | None) -> None:
        self.ready = channel.ready
        self.reading = channel.reading
        self.metadata = channel.metadata  # replaced by the channel, never changed: no copy
        self.old = old


class PV:
    """A process variable as pyepics presents it; its data comes from a pvhub daemon.

    ``PV(pvname, callback=None, form='time', verbose=False, auto_monitor=None, count=None,
    connection_callback=None, connection_timeout=None, access_callback=None)`` as pyepics,
    plus ``address`` (the daemon; ``$PVHUB_ADDRESS`` by default) or ``hub``.
    """

    _fields = ("pvname", "value", "char_value", "status", "ftype", "chid", "host", "count",
               "access", "write_access", "read_access", "severity", "timestamp",
               "posixseconds", "nanoseconds", "precision", "units", "enum_strs",
               "monitor_delta", *_CTRL_KEYS[2:])

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
        if self.form not in _FORM_OFFSET:
            raise ValueError(f"form must be 'native', 'time' or 'ctrl', not {form!r}")
        self.verbose = verbose
        self.auto_monitor = auto_monitor  # readings are always monitored; kept for callers
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
        self._seen_connected = False  # as the callback thread last told it
        self._seen_access: tuple[bool, bool] | None = None
        self._newest_stamp: float | None = None  # of the newest value delivered
        self._released = False
        self._hub = hub or get_hub(address)
        self._channel = self._hub.channel(self.pvname)
        with self._channel.cond:
            # Under the channel's lock: no event is lost or seen twice between the check and
            # the listener (the listener runs under the same lock).
            self._channel.add_listener(self._on_channel)
            if self._channel.ready:
                self._hub.dispatch(self._on_event, "meta", _Captured(self._channel, None))

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

    def _state(self) -> tuple[p.Reading | None, dict[str, Any]]:
        with self._channel.cond:
            return self._channel.reading, dict(self._channel.metadata)

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
        'ctrl': units, limits, precision, enum strings), or ``None`` as pyepics."""
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
        info = _time_fields(reading) if form == "time" else {}
        if form == "time":
            info.update(status=reading.status, severity=reading.severity)
        if form == "ctrl" or with_ctrlvars:
            info.update(_ctrl_fields(metadata))
            info.update(status=reading.status, severity=reading.severity)
        value = _shaped(reading.value, metadata, count, as_numpy)
        info["value"] = char_value(value, metadata, self.count) if as_string else value
        return types.SimpleNamespace(**info) if as_namespace else info

    def get_ctrlvars(self, timeout: float = 5, warn: bool = True) -> dict[str, Any] | None:
        """The control fields (units, limits, precision, enum strings, alarm)."""
        if not self.wait_for_connection(timeout):
            return None
        reading, metadata = self._state()
        info = _ctrl_fields(metadata)
        if reading is not None:
            info.update(status=reading.status, severity=reading.severity)
        return info

    def get_timevars(self, timeout: float = 5, warn: bool = True) -> dict[str, Any] | None:
        """The time fields (alarm status and severity, timestamp)."""
        if not self.wait_for_connection(timeout):
            return None
        reading, _ = self._state()
        if reading is None:
            return None
        return {"status": reading.status, "severity": reading.severity, **_time_fields(reading)}

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
                if message.reading is not None:
                    # Read-your-writes: a get after the completion sees the value read back.
                    channel.apply(message.epoch, message.seq, True, message.reading, None, from_stream=False)
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
        hub.request(lambda rid: p.SetRequest(id=rid, pv=pvname, value=value), on_reply)
        try:
            answer = accepted.result(ACCEPT_TIMEOUT)
        except TimeoutError:
            raise error_from_code("hub_unavailable", f"{pvname}: the put was neither accepted nor refused "
                                  f"within {ACCEPT_TIMEOUT} s; its outcome is unknown") from None
        if isinstance(answer, PvhubError):
            raise answer
        if not wait:
            return 1
        try:
            error = completed.result(None if math.isinf(timeout) else timeout)
        except TimeoutError:
            return -1
        if error is not None:
            raise error
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

    def _callback_fields(self, reading: p.Reading, metadata: dict[str, Any]) -> dict[str, Any]:
        value = _shaped(reading.value, metadata, None, True)
        fields = {key: None for key in self._fields}
        fields.update(_ctrl_fields(metadata))
        fields.update(_time_fields(reading))
        read_access, write_access = _access(metadata)
        fields.update(
            pvname=self.pvname,
            value=value,
            char_value=char_value(value, metadata, int(metadata.get("count") or 1)),
            status=reading.status,
            severity=reading.severity,
            ftype=dbr_type(metadata.get("native_type"), self.form),
            type=dbr_name(dbr_type(metadata.get("native_type"), "native")),
            typefull=dbr_name(dbr_type(metadata.get("native_type"), self.form)),
            host=metadata.get("host"),
            count=int(metadata.get("count") or 1),
            nelm=int(metadata.get("count") or 1),
            read_access=read_access,
            write_access=write_access,
            access=_ACCESS_TEXT[(read_access, write_access)],
            monitor_delta=self.monitor_delta,
            chid=None,
        )
        return fields

    def clear_auto_monitor(self) -> None:
        """The hub keeps one monitor per PV for every client; this PV's callbacks stop."""
        self.auto_monitor = False

    def disconnect(self, deepclean: bool = True) -> None:
        """Stop hearing from the channel: no more callbacks of any kind."""
        self._released = True
        self.clear_callbacks(True, True)
        self._channel.remove_listener(self._on_channel)

    # --- events: the I/O thread captures, the callback thread acts (Rule 2) ---------------

    def _on_channel(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        self._hub.dispatch(self._on_event, kind, _Captured(channel, old))

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
            access = _access(state.metadata)
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

    # --- fields -----------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return dict(self._channel.metadata)

    def _reading(self) -> p.Reading | None:
        return self._channel.reading

    @property
    def char_value(self) -> str | None:
        reading, metadata = self._state()
        if reading is None:
            return None
        return char_value(_shaped(reading.value, metadata, None, True), metadata, self.count)

    @property
    def status(self) -> int | None:
        reading = self._reading()
        return reading.status if reading else None

    @property
    def severity(self) -> int | None:
        reading = self._reading()
        return reading.severity if reading else None

    @property
    def timestamp(self) -> float | None:
        reading = self._reading()
        return reading.timestamp if reading else None

    @property
    def posixseconds(self) -> int | None:
        reading = self._reading()
        return _time_fields(reading)["posixseconds"] if reading else None

    @property
    def nanoseconds(self) -> int | None:
        reading = self._reading()
        return _time_fields(reading)["nanoseconds"] if reading else None

    @property
    def precision(self) -> int | None:
        return self._metadata().get("precision")

    @property
    def units(self) -> str | None:
        return self._metadata().get("units")

    @property
    def enum_strs(self) -> tuple[str, ...] | None:
        strs = self._metadata().get("enum_strs")
        return tuple(strs) if strs is not None else None

    upper_disp_limit = property(lambda self: self._metadata().get("upper_disp_limit"))
    lower_disp_limit = property(lambda self: self._metadata().get("lower_disp_limit"))
    upper_alarm_limit = property(lambda self: self._metadata().get("upper_alarm_limit"))
    lower_alarm_limit = property(lambda self: self._metadata().get("lower_alarm_limit"))
    upper_warning_limit = property(lambda self: self._metadata().get("upper_warning_limit"))
    lower_warning_limit = property(lambda self: self._metadata().get("lower_warning_limit"))
    upper_ctrl_limit = property(lambda self: self._metadata().get("upper_ctrl_limit"))
    lower_ctrl_limit = property(lambda self: self._metadata().get("lower_ctrl_limit"))

    @property
    def read_access(self) -> bool:
        return self.connected and _access(self._metadata())[0]

    @property
    def write_access(self) -> bool:
        return self.connected and _access(self._metadata())[1]

    @property
    def access(self) -> str:
        if not self.connected:
            return "unknown"
        return _ACCESS_TEXT[_access(self._metadata())]

    @property
    def ftype(self) -> int | None:
        """The DBR type this PV is read as (its native type in ``form``)."""
        return dbr_type(self._metadata().get("native_type"), self.form)

    @property
    def type(self) -> str:
        """The native type's name: ``"double"``, ``"long"``, ``"enum"``, ``"string"``, ``"char"``."""
        return dbr_name(dbr_type(self._metadata().get("native_type"), "native"))

    @property
    def typefull(self) -> str:
        return dbr_name(self.ftype)

    @property
    def host(self) -> str | None:
        """The IOC serving the PV, as its actor reaches it (``host:port``)."""
        return self._metadata().get("host")

    @property
    def count(self) -> int:
        """Elements in the value (the caller's ``count`` if smaller)."""
        native = self.nelm
        return min(native, self._user_count) if self._user_count else native

    @property
    def nelm(self) -> int:
        """Elements the PV holds at most (CA's native count)."""
        return int(self._metadata().get("count") or 1) if self.connected else -1

    @property
    def info(self) -> str:
        """pyepics' printable paragraph about the PV."""
        reading, metadata = self._state()
        lines = [f"== {self.pvname}  ({self.typefull}) =="]
        if reading is None:
            return "\n".join([*lines, "   not connected", "============================="])
        value = _shaped(reading.value, metadata, None, True)
        if self.count == 1 or isinstance(value, str):
            lines.append(f"   value      = {value!r}")
        else:
            head = ", ".join(repr(v) for v in list(value)[:5])
            lines.append(f"   value      = array  [{head}{'...' if self.count > 5 else ''}]")
        fields = {
            "char_value": f"'{char_value(value, metadata, self.count)}'",
            "count": self.count, "nelm": self.nelm, "type": self.type,
            "units": self.units, "precision": self.precision, "host": self.host,
            "access": self.access, "status": reading.status, "severity": reading.severity,
            "timestamp": f"{reading.timestamp:.3f} ({_format_time(reading.timestamp)})",
            **{key: metadata.get(key) for key in _CTRL_KEYS[2:][::-1]},
        }
        for name, field in fields.items():
            if field is not None:
                lines.append(f"   {name:<11s}= {field}")
        strs = metadata.get("enum_strs")
        if strs:
            lines.append("   enum strings: ")
            lines.extend(f"       {i} = {label} " for i, label in enumerate(strs))
        lines.append(f"   PV is internally monitored, with {len(self.callbacks)} user-defined callbacks:")
        lines.extend(f"      {function!r}" for function, _ in self.callbacks.values())
        lines.append("=============================")
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self.connected:
            return f"<PV '{self.pvname}': not connected>"
        count = f"{self.count}" if self.nelm == 1 else f"{self.count}/{self.nelm}"
        return f"<PV '{self.pvname}', count={count}, type={self.typefull}, access={self.access}>"

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


# --- pure helpers ------------------------------------------------------------------------------


def _read_timeout(timeout: float | None, count: int | None) -> float:
    # pyepics: 0.5 s plus more for large arrays; a daemon round trip needs a little more.
    if timeout is not None:
        return timeout
    return 1.0 + math.log10(max(1, count or 1))


def _access(metadata: dict[str, Any]) -> tuple[bool, bool]:
    return bool(metadata.get("read_access", True)), bool(metadata.get("write_access", False))


def _time_fields(reading: p.Reading) -> dict[str, Any]:
    seconds = math.floor(reading.timestamp)
    return {
        "timestamp": reading.timestamp,
        "posixseconds": int(seconds),
        "nanoseconds": int(round((reading.timestamp - seconds) * 1e9)) % 1_000_000_000,
    }


def _ctrl_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    fields = {key: metadata.get(key) for key in _CTRL_KEYS}
    strs = metadata.get("enum_strs")
    fields["enum_strs"] = tuple(strs) if strs is not None else None
    return fields


def _shaped(value: Any, metadata: dict[str, Any], count: int | None, as_numpy: bool) -> Any:
    """The value as pyepics gives it: scalars for one element, arrays (or lists) for more,
    cut to ``count``."""
    if isinstance(value, np.ndarray):
        value = value.copy()
        if count is not None and count < value.size:
            value = value[:count]
        return value if as_numpy else value.tolist()
    if isinstance(value, list):
        value = list(value)
        if count is not None and count < len(value):
            value = value[:count]
        return np.asarray(value) if as_numpy and metadata.get("native_type") != "string" else value
    return value


def as_native(value: Any, metadata: dict[str, Any]) -> Any:
    """``value`` as a Channel Access client sends it to a PV of this native type: a number
    with a fraction, put to an integer or enum PV, arrives truncated (CA clients convert to
    the channel's native type before sending; C's conversion truncates toward zero)."""
    if metadata.get("native_type") not in ("int", "enum"):
        return value
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        return int(value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and np.isfinite(value).all():
        return np.trunc(value).astype(np.int64)
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(v, (float, np.floating)) and math.isfinite(v) for v in value)):
        return [int(v) for v in value]
    return value


def char_value(value: Any, metadata: dict[str, Any], count: int) -> str:
    """pyepics' text for ``value``: the label of an enum, the text of a char waveform, the
    number at the PV's precision, ``<array size=N, type=T>`` for other arrays."""
    native = metadata.get("native_type")
    if native == "string":
        return value if isinstance(value, str) else str(value)
    if native == "char" and count < AUTOMONITOR_MAXLENGTH:
        data = np.atleast_1d(np.asarray(value)).astype(np.uint8).tobytes()
        return data.split(b"\0", 1)[0].decode("latin-1").rstrip()
    if isinstance(value, (np.ndarray, list)) and (count > 1 or np.size(value) > 1):
        return f"<array size={np.size(value)}, type={dbr_name(dbr_type(native, 'time'))}>"
    if native == "enum":
        strs = metadata.get("enum_strs") or []
        index = int(value) if isinstance(value, (int, np.integer)) else -1
        return strs[index] if 0 <= index < len(strs) else str(value)
    if native == "float" and isinstance(value, (float, int, np.floating)):
        precision = metadata.get("precision")
        try:
            number = float(value)
            fmt = "%%.%dg" if 4 < abs(int(math.log10(abs(number + 1.0e-9)))) else "%%.%df"
            return (fmt % int(precision)) % number
        except (TypeError, ValueError, ArithmeticError):
            return str(value)
    return repr(value) if not isinstance(value, str) else value


def _format_time(stamp: float) -> str:
    whole, fraction = divmod(stamp, 1)
    return "%s.%5.5i" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole)), round(1.0e5 * fraction))


_pv_cache: dict[tuple[str, str, str], PV] = {}
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
        if pv is None or pv._released or pv._hub is not hub:
            pv = _pv_cache[key] = PV(pvname, form=form, hub=hub)
    if connection_callback is not None:
        pv.connection_callbacks.append(connection_callback)
        if pv.connected:
            hub.dispatch(connection_callback, pvname=pv.pvname, conn=True, pv=pv)
    if access_callback is not None:
        pv.access_callbacks.append(access_callback)
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

