"""``EpicsSignal`` and ``EpicsSignalRO``: ophyd's surface, with the daemon behind it.

Rule 1: a Signal never speaks Channel Access; it reads its PV's channel (kept current by the
hub from published readings) and sends ``set`` requests. ``read()`` therefore answers from the
latest reading without a round trip, like ophyd with ``auto_monitor=True``; a completed
``set`` carries the value read back after the put, so a read after a set sees it.
What subscribers get and on which thread is subscriptions.py's; when a set is done,
completion.py's.
Rule 2: what ophyd users rely on keeps ophyd's names and shapes: ``read``/``describe`` keys,
callback keywords (``value``, ``old_value``, ``timestamp``, ``sub_type``, ``obj``, ...),
``TimeoutError`` from waits, ``ReadOnlyError`` from writing a read-only Signal, ``LimitError``
from a value outside the control limits with ``limits=True``, ``dotted_name``, ``attr_name``,
``parent`` and ``_ophyd_labels_`` as ``OphydObject`` has them. The keywords are ophyd's, each
one does what it does there, and any other raises ``TypeError``: a misspelt option must not
pass unnoticed.
Rule 3 (``auto_monitor``): ``True`` (the default, and ``None``) reads the channel's copy;
``False`` asks the daemon for a fresh snapshot on every ``get`` and ``read``, as ophyd then
asks the IOC; the snapshot is applied to the channel on the I/O thread like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from pvhub import protocol as p
from pvhub.client.alarms import AlarmSeverity, AlarmStatus, severity_of, status_of
from pvhub.client.completion import ReadbackWatch, send_set
from pvhub.client.hub import Channel, Hub
from pvhub.client.registry import get_hub
from pvhub.client.ophyd_types import Kind, limit_error
from pvhub.client.status import Status
from pvhub.client.subscriptions import Subscriptions
from pvhub.client.values import convert, data_key
from pvhub.errors import (
    ConnectionTimeoutError,
    DisconnectedError,
    HubUnavailableError,
    ReadOnlyError,
)

DEFAULT_CONNECTION_TIMEOUT = 5.0  # a PV nobody used yet: a CA search, perhaps of a slow IOC
DEFAULT_TIMEOUT = 2.0


class EpicsSignalBase(Subscriptions):
    """What read-only and writable EPICS signals share."""

    def __init__(
        self,
        read_pv: str,
        *,
        name: str,
        string: bool = False,
        kind: Kind | str = Kind.hinted,
        parent: Any = None,
        labels: Iterable[str] | None = None,
        attr_name: str = "",
        tolerance: Any = None,
        rtolerance: Any = None,
        timeout: float | None = None,
        connection_timeout: float | None = None,
        write_timeout: float | None = None,
        auto_monitor: bool | None = None,
        address: str | None = None,
        hub: Hub | None = None,
    ) -> None:
        if not isinstance(read_pv, str) or not read_pv:
            raise ValueError("read_pv must be a non-empty PV name")
        if not isinstance(name, str):
            raise ValueError("name must be a string")
        self.name = name
        self._attr_name = attr_name
        self._parent = parent
        self._kind = Kind[kind] if isinstance(kind, str) else Kind(kind)
        self._ophyd_labels_ = set(labels or ())
        self.as_string = bool(string)
        self._tolerance = tolerance
        self.rtolerance = rtolerance
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.connection_timeout = DEFAULT_CONNECTION_TIMEOUT if connection_timeout is None else connection_timeout
        self.write_timeout = write_timeout
        self.auto_monitor = True if auto_monitor is None else bool(auto_monitor)  # Rule 3
        self._read_pv = read_pv
        self._hub = hub or get_hub(address)
        super().__init__()
        self._read_channel = self._hub.channel(read_pv, owner=self)

    # --- identity ---------------------------------------------------------------------------

    @property
    def kind(self) -> Kind:
        return self._kind

    @kind.setter
    def kind(self, value: Kind | str) -> None:
        self._kind = Kind[value] if isinstance(value, str) else Kind(value)

    @property
    def hints(self) -> dict[str, list[str]]:
        return {"fields": [self.name] if (~Kind.normal & Kind.hinted) & self._kind else []}

    @property
    def attr_name(self) -> str:
        return self._attr_name

    @property
    def parent(self) -> Any:
        """The device this Signal belongs to, None at the top of its hierarchy."""
        return self._parent

    @property
    def root(self) -> Any:
        root = self
        while root.parent is not None:
            root = root.parent
        return root

    @property
    def dotted_name(self) -> str:
        """The attribute names from the root down to this Signal, joined by dots (ophyd's)."""
        names = []
        obj = self
        while obj.parent is not None:
            names.append(obj.attr_name)
            obj = obj.parent
        return ".".join(reversed(names))

    @property
    def tolerance(self) -> Any:
        """The absolute tolerance of a set (completion.py, Rule 1)."""
        return self._tolerance

    @tolerance.setter
    def tolerance(self, tolerance: Any) -> None:
        self._tolerance = tolerance

    @property
    def pvname(self) -> str:
        return self._read_pv

    @property
    def source_name(self) -> str:
        return f"PV:{self._read_pv}"

    def _channels(self) -> tuple[Channel, ...]:
        return (self._read_channel,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(read_pv={self._read_pv!r}, name={self.name!r})"

    # --- connection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return all(c.ready for c in self._channels())

    def wait_for_connection(self, all_signals: bool = False, timeout: float | None = None) -> None:
        """Wait until every PV of this Signal is connected; ``ConnectionTimeoutError`` (a
        ``TimeoutError``) if that takes longer than ``timeout``."""
        timeout = self.connection_timeout if timeout is None else timeout
        for channel in self._channels():
            if not channel.wait(lambda c=channel: c.ready or c.error is not None, timeout):
                if not self._hub.connected:
                    why = f" ({self._hub.handshake_problem})" if self._hub.handshake_problem else ""
                    raise ConnectionTimeoutError(
                        f"{channel.pv}: the pvhub daemon at {self._hub.address} did not answer within {timeout} s{why}"
                    )
                why = f" (the daemon said: {channel.last_refusal})" if channel.last_refusal else ""
                if channel.attached and channel.connected and not channel.live:  # channel.py Rule 2
                    why = (f" (the daemon answered for it, but none of its readings arrived from "
                           f"{', '.join(self._hub.readings_endpoints) or 'the readings address'}: "
                           f"can this host reach that address?)")
                raise ConnectionTimeoutError(f"{channel.pv} could not connect within {timeout} s{why}")
            if channel.error is not None:
                raise channel.error

    # --- values -----------------------------------------------------------------------------

    def _latest(self, connection_timeout: float | None = None) -> tuple[p.Reading, p.PVMetadata]:
        channel = self._read_channel
        if not channel.ready:
            self.wait_for_connection(timeout=connection_timeout)
        with channel.cond:
            reading, metadata = channel.reading, channel.metadata
        if reading is None:  # pragma: no cover - ready implies a reading
            raise ConnectionTimeoutError(f"{channel.pv} has no value yet")
        return reading, metadata

    def _fresh(self, timeout: float | None, connection_timeout: float | None) -> tuple[p.Reading, p.PVMetadata]:
        """A snapshot asked of the daemon now (Rule 3), applied to the channel on the way."""
        channel = self._read_channel
        if not channel.ready:
            self.wait_for_connection(timeout=connection_timeout)
        timeout = self.timeout if timeout is None else timeout

        def on_reply(message: p.Message) -> bool:  # on the I/O thread, as channels need
            if isinstance(message, p.Snapshot):
                channel.apply_reply(message)
            return isinstance(message, p.FINAL_REPLIES)

        future = self._hub.request(lambda rid: p.ReadRequest(id=rid, pv=channel.pv, fresh=True), on_reply,
                                   timeout=timeout)
        try:
            snapshot = future.result(timeout)
        except TimeoutError:
            raise HubUnavailableError(f"{channel.pv}: no answer from the pvhub daemon within {timeout} s") from None
        if snapshot.reading is None or not snapshot.connected:
            raise DisconnectedError(f"{channel.pv} is not connected to its IOC")
        with channel.cond:
            metadata = channel.metadata
        return snapshot.reading, metadata

    def _reading(self, use_monitor: bool | None, timeout: float | None = None,
                 connection_timeout: float | None = None) -> tuple[p.Reading, p.PVMetadata]:
        use_monitor = self.auto_monitor if use_monitor is None else use_monitor
        if use_monitor:
            return self._latest(connection_timeout)
        return self._fresh(timeout, connection_timeout)

    def get(self, *, count: int | None = None, as_string: bool | None = None, timeout: float | None = None,
            connection_timeout: float | None = None, form: str = "time", use_monitor: bool | None = None) -> Any:
        """The PV's value (a label for an enum when ``string=True``): the latest one the
        channel holds, or with ``auto_monitor=False`` (or ``use_monitor=False``) a fresh one
        from the daemon. ``count`` keeps the first elements of an array, as ophyd's does."""
        if form not in ("time", "ctrl"):
            raise ValueError(f"form must be 'time' or 'ctrl', not {form!r}")
        reading, metadata = self._reading(use_monitor, timeout, connection_timeout)
        value = convert(reading.value, metadata, self.as_string if as_string is None else as_string)
        if count is not None and isinstance(value, (np.ndarray, list)):
            value = value[:count]
        return value

    @property
    def value(self) -> Any:
        return self.get()

    def read(self) -> dict[str, dict[str, Any]]:
        """``{name: {"value", "timestamp"}}`` from the latest reading (a fresh one with
        ``auto_monitor=False`` unless subscribed: Bluesky reads inside its callbacks)."""
        reading, metadata = self._reading(True if self._subs else None)
        return {self.name: {"value": convert(reading.value, metadata, self.as_string),
                            "timestamp": reading.timestamp}}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Data keys as ophyd's ``EpicsSignalBase.describe`` gives them."""
        reading, metadata = self._latest()
        value = convert(reading.value, metadata, self.as_string)
        return {self.name: data_key(self.source_name, value, metadata.get("units"), self.limits,
                                    self.precision, self.enum_strs)}

    def read_configuration(self) -> dict[str, dict[str, Any]]:
        return self.read()

    def describe_configuration(self) -> dict[str, dict[str, Any]]:
        return self.describe()

    def trigger(self) -> Status:
        status = Status(self)
        status.set_finished()
        return status

    def stage(self) -> list[Any]:
        return [self]

    def unstage(self) -> list[Any]:
        return [self]

    # --- metadata ---------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        channel = self._read_channel
        with channel.cond:
            md = dict(channel.metadata)
            reading = channel.reading
            connected = channel.ready
        md.update(
            connected=connected,
            read_access=bool(md.get("read_access", False)) and connected,
            write_access=bool(md.get("write_access", False)) and connected and self._writable,
            timestamp=reading.timestamp if reading else None,
            status=status_of(reading.status) if reading else None,
            severity=severity_of(reading.severity) if reading else None,
        )
        if md.get("enum_strs") is not None:
            md["enum_strs"] = tuple(md["enum_strs"])  # as ophyd's
        return md

    _writable = False

    @property
    def missed_updates(self) -> int:
        """Updates this process never received (it read too slowly, and the daemon's queue for
        it overflowed); each gap was answered with a fresh snapshot."""
        return self._read_channel.missed

    @property
    def update_gaps(self) -> int:
        """How many times updates were missed (see ``missed_updates``)."""
        return self._read_channel.gaps

    @property
    def timestamp(self) -> float | None:
        reading = self._read_channel.reading
        return reading.timestamp if reading else None

    @property
    def alarm_status(self) -> AlarmStatus | int | None:
        """ophyd's ``AlarmStatus`` (an ``IntEnum``) of the latest reading."""
        reading = self._read_channel.reading
        return status_of(reading.status) if reading else None

    @property
    def alarm_severity(self) -> AlarmSeverity | int | None:
        """ophyd's ``AlarmSeverity`` (an ``IntEnum``) of the latest reading."""
        reading = self._read_channel.reading
        return severity_of(reading.severity) if reading else None

    @property
    def units(self) -> str | None:
        return self._read_channel.metadata.get("units")

    @property
    def precision(self) -> int | None:
        return self._read_channel.metadata.get("precision")

    @property
    def enum_strs(self) -> tuple[str, ...] | None:
        strs = self._read_channel.metadata.get("enum_strs")
        return tuple(strs) if strs is not None else None

    @property
    def limits(self) -> tuple[Any, Any]:
        md = self._read_channel.metadata
        return (md.get("lower_ctrl_limit"), md.get("upper_ctrl_limit"))

    @property
    def low_limit(self) -> Any:
        return self.limits[0]

    @property
    def high_limit(self) -> Any:
        return self.limits[1]

    @property
    def read_access(self) -> bool:
        return bool(self.metadata["read_access"])

    @property
    def write_access(self) -> bool:
        return bool(self.metadata["write_access"])


class EpicsSignalRO(EpicsSignalBase):
    """A read-only EPICS signal: ``set`` and ``put`` raise ``ReadOnlyError``."""

    def set(self, value: Any, *, timeout: float | None = None, settle_time: float | None = None) -> Status:
        raise ReadOnlyError(f"{self.name} is read-only ({type(self).__name__})")

    def put(self, value: Any, *, force: bool = False, connection_timeout: float | None = None,
            callback: Callable[..., Any] | None = None, use_complete: bool | None = None,
            timeout: float | None = None, wait: bool = False) -> None:
        raise ReadOnlyError(f"{self.name} is read-only ({type(self).__name__})")


class EpicsSignal(EpicsSignalBase):
    """A read-write EPICS signal; ``set`` returns a ``Status`` that finishes as completion.py's
    Rule 1 says."""

    _writable = True

    def __init__(
        self,
        read_pv: str,
        write_pv: str | None = None,
        *,
        name: str,
        put_complete: bool = True,
        limits: bool = False,
        string: bool = False,
        kind: Kind | str = Kind.hinted,
        parent: Any = None,
        labels: Iterable[str] | None = None,
        attr_name: str = "",
        tolerance: Any = None,
        rtolerance: Any = None,
        timeout: float | None = None,
        connection_timeout: float | None = None,
        write_timeout: float | None = None,
        auto_monitor: bool | None = None,
        address: str | None = None,
        hub: Hub | None = None,
    ) -> None:
        super().__init__(
            read_pv, name=name, string=string, kind=kind, parent=parent, labels=labels,
            attr_name=attr_name, tolerance=tolerance, rtolerance=rtolerance, timeout=timeout,
            connection_timeout=connection_timeout, write_timeout=write_timeout,
            auto_monitor=auto_monitor, address=address, hub=hub,
        )
        self._write_pv = write_pv or read_pv
        self.put_complete = bool(put_complete)
        self.use_limits = bool(limits)
        self._write_channel = self._read_channel if self._write_pv == read_pv else self._hub.channel(self._write_pv, owner=self)

    def _channels(self) -> tuple[Channel, ...]:
        if self._write_channel is self._read_channel:
            return (self._read_channel,)
        return (self._read_channel, self._write_channel)

    @property
    def setpoint_pvname(self) -> str:
        return self._write_pv

    @property
    def write_access(self) -> bool:
        channel = self._write_channel
        return bool(channel.ready and channel.metadata.get("write_access", False))

    @property
    def limits(self) -> tuple[Any, Any]:
        """The write PV's control limits (ophyd's, for a Signal that writes elsewhere)."""
        md = self._write_channel.metadata
        return (md.get("lower_ctrl_limit"), md.get("upper_ctrl_limit"))

    @property
    def tolerance(self) -> Any:
        """As ophyd's: the one given, else ``10**-precision`` (None for precision 0)."""
        if self._tolerance is not None:
            return self._tolerance
        precision = self._write_channel.metadata.get("precision")
        return None if not precision else 10.0 ** (-precision)

    @tolerance.setter
    def tolerance(self, tolerance: Any) -> None:
        self._tolerance = tolerance

    def __repr__(self) -> str:
        extra = f", write_pv={self._write_pv!r}" if self._write_pv != self._read_pv else ""
        return f"{type(self).__name__}(read_pv={self._read_pv!r}{extra}, name={self.name!r})"

    def check_value(self, value: Any) -> None:
        """ophyd's check: no None, and with ``limits=True`` a value within the control limits
        (unless they are empty, low >= high); ``LimitError`` otherwise."""
        if value is None:
            raise ValueError("Cannot write None to epics PVs")
        if not self.use_limits:
            return
        low, high = self.limits
        if low is None or high is None or low >= high:
            return
        if not (low <= value <= high):
            raise limit_error(f"{self.name}: value {value} outside of range: [{low}, {high}]")

    def set(self, value: Any, *, timeout: float | None = None, settle_time: float | None = None) -> Status:
        """Put ``value``; the Status finishes as completion.py's Rule 1 says, or fails with the
        put's error or when ``timeout`` (default ``write_timeout``) expires.

        Like ophyd, a Signal not yet connected first waits up to ``connection_timeout``."""
        return self._write(value, timeout=timeout, settle_time=settle_time, force=False,
                           connection_timeout=None, use_complete=self.put_complete)

    def _write(self, value: Any, *, timeout: float | None, settle_time: float | None, force: bool,
               connection_timeout: float | None, use_complete: bool) -> Status:
        if not self.connected:
            self.wait_for_connection(timeout=connection_timeout)
        if not force:
            self.check_value(value)
        status = Status(self, timeout=timeout if timeout is not None else self.write_timeout,
                        settle_time=settle_time or 0.0)
        hub = self._hub
        watch = None  # completion.py, Rule 1
        if not use_complete:
            watch = ReadbackWatch(self._read_channel, hub.dispatch, status, value, self.tolerance, self.rtolerance)
        elif self._tolerance is not None or self.rtolerance is not None:
            watch = ReadbackWatch(self._read_channel, hub.dispatch, status, value, self._tolerance, self.rtolerance)
        send_set(hub, value, self._write_channel, status, watch, use_complete)
        return status

    def put(self, value: Any, *, force: bool = False, connection_timeout: float | None = None,
            callback: Callable[..., Any] | None = None, use_complete: bool | None = None,
            timeout: float | None = None, wait: bool = False) -> None:
        """Put ``value`` and return at once, as ophyd's ``put``; ``callback()`` runs when the
        IOC reports completion (``use_complete``, default ``put_complete``), or when the
        readback reaches the value without it. ``wait`` blocks until then; past ``timeout``
        (default ``write_timeout``) the put counts as failed, as in ophyd, though it goes on in
        the IOC. ``force`` skips ``check_value``."""
        use_complete = self.put_complete if use_complete is None else bool(use_complete)
        status = self._write(value, timeout=timeout, settle_time=None, force=force,
                             connection_timeout=connection_timeout, use_complete=use_complete)
        if callback is not None:
            status.add_callback(lambda st: callback() if st.success else None)
        if wait:
            status.wait(timeout)
