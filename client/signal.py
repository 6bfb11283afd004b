"""``EpicsSignal`` and ``EpicsSignalRO``: ophyd's surface, with the daemon behind it.

Rule 1: a Signal never speaks Channel Access; it reads its PV's channel (kept current by the
hub from published readings) and sends ``set`` requests. ``read()`` therefore answers from the
latest reading without a round trip, like ophyd with ``auto_monitor=True``; a completed
``set`` carries the value read back after the put, so a read after a set sees it.
Rule 2: user callbacks run on the hub's callback thread, in the order the updates arrived.
A new subscription is primed on that same thread with the channel's state and its
``version`` (channel.py, Rule 4); it then takes only changes of a later version, so its first
call is the latest value and no update is seen twice or skipped after it.
Rule 3: a Signal nobody subscribed to costs nothing per update: it listens to its channel only
while it has subscriptions, and dispatches only events some subscription takes (the subscriptions
are also kept by event type in a map replaced whole on every change, so the I/O thread and
the callback thread look without a lock). What
a callback gets is built on the callback thread from what the I/O thread captured (the
reading, the one before, the metadata: none of them ever changes once made). Lock order:
the channel's ``cond``, then the Signal's ``_subs_lock`` (the I/O thread holds ``cond`` when it
calls listeners).
Rule 4: what ophyd users rely on keeps ophyd's names and shapes: ``read``/``describe`` keys,
callback keywords (``value``, ``old_value``, ``timestamp``, ``sub_type``, ``obj``, ...),
``TimeoutError`` from waits, ``ReadOnlyError`` from writing a read-only Signal, ``LimitError``
from a value outside the control limits with ``limits=True``, ``dotted_name``, ``attr_name``,
``parent`` and ``_ophyd_labels_`` as ``OphydObject`` has them. The keywords are ophyd's, each
one does what it does there, and any other raises ``TypeError``: a misspelt option must not
pass unnoticed.
Rule 5 (when a set is done): the daemon always puts with completion. pvhub's default is
``put_complete=True``: a set is done when the IOC reports the put complete, with the value
read back after it applied first (ophyd's default is ``False``, which polls the readback;
through the daemon the completion is both sooner and sure). Given ``tolerance`` or
``rtolerance``, a set also waits, after the completion, until the readback (``read_pv``) is
within tolerance of the target, as ophyd's ``_wait_for_value`` does, or fails when the set's
timeout expires. With ``put_complete=False`` a set is done as soon as the readback is within
``tolerance`` (given, or ``10**-precision``, or exact, as ophyd derives it) of the target,
whether or not the put has completed; a put that fails still fails it.
Rule 6 (``auto_monitor``): ``True`` (the default, and ``None``) reads the channel's copy;
``False`` asks the daemon for a fresh snapshot on every ``get`` and ``read``, as ophyd then
asks the IOC; the snapshot is applied to the channel on the I/O thread like any other.
"""

from __future__ import annotations

import enum
import itertools
import sys
import threading
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from pvhub import protocol as p
from pvhub.client.hub import Channel, Hub, get_hub, log
from pvhub.client.status import Status
from pvhub.errors import (
    ConnectionTimeoutError,
    DisconnectedError,
    HubUnavailableError,
    LimitError,
    ReadOnlyError,
    error_from_code,
)

_limit_errors: dict[type, type] = {}


def limit_error(message: str) -> LimitError:
    """A ``pvhub.errors.LimitError`` that is also ophyd's ``LimitError`` when ophyd is in use,
    so that code catching either catches it. ophyd is not imported for that: it costs seconds
    and starts threads, and a process that never imported it catches nothing of ophyd's."""
    ophyd_utils = sys.modules.get("ophyd.utils")
    ophyd_class = getattr(ophyd_utils, "LimitError", None)
    if ophyd_class is None:
        return LimitError(message)
    both = _limit_errors.get(ophyd_class)
    if both is None:
        both = _limit_errors[ophyd_class] = type("LimitError", (LimitError, ophyd_class), {})
    return both(message)


DEFAULT_CONNECTION_TIMEOUT = 5.0  # a PV nobody used yet: a CA search, perhaps of a slow IOC
DEFAULT_TIMEOUT = 2.0

_cids = itertools.count(1)
# Signals with subscriptions stay alive while they have them (as ophyd's do through their PV
# callbacks), even if the user keeps no reference: the callbacks are what they wanted.
_subscribed: set[EpicsSignalBase] = set()


class Kind(enum.IntFlag):
    """ophyd's Kind: what part of a device's readings a signal belongs to."""

    omitted = 0b000
    normal = 0b001
    config = 0b010
    hinted = 0b101


def data_type(value: Any) -> str:
    """The event-model dtype of ``value``, as ophyd names it."""
    if isinstance(value, (str, bytes)):
        return "string"
    if isinstance(value, Iterable) and not isinstance(value, dict):
        return "array"
    if isinstance(value, (bool, int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    raise ValueError(f"cannot describe a value of type {type(value).__name__}")


def data_shape(value: Any) -> list[int]:
    if data_type(value) != "array":
        return []
    shape = getattr(value, "shape", None)
    return list(shape) if shape is not None else [len(value)]


class _Subscription:
    __slots__ = ("callback", "event_type", "primed", "run", "version")

    def __init__(self, callback: Callable[..., Any], event_type: str, run: bool) -> None:
        self.callback = callback
        self.event_type = event_type
        self.run = run
        self.primed = False
        self.version = 0  # of the channel's last change this subscription delivered (Rule 2)


_PLAIN = frozenset((int, float, bool, type(None)))  # values _convert returns as they are without as_string


def _by_kind(subs: dict[int, _Subscription]) -> dict[str, tuple[_Subscription, ...]]:
    """``subs`` by event type, in the order they were made."""
    by_kind: dict[str, tuple[_Subscription, ...]] = {}
    for sub in subs.values():
        by_kind[sub.event_type] = by_kind.get(sub.event_type, ()) + (sub,)
    return by_kind


class EpicsSignalBase:
    """What read-only and writable EPICS signals share."""

    SUB_VALUE = "value"
    SUB_META = "meta"
    _default_sub = SUB_VALUE

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
        self.auto_monitor = True if auto_monitor is None else bool(auto_monitor)  # Rule 6
        self._read_pv = read_pv
        self._hub = hub or get_hub(address)
        self._subs: dict[int, _Subscription] = {}
        self._subs_lock = threading.Lock()
        self._subs_by_kind: dict[str, tuple[_Subscription, ...]] = {}  # Rule 3; no empty entries
        self._listening = False  # Rule 3: on the read channel, while there are subscriptions
        self._read_channel = self._hub.channel(read_pv)

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
        """The absolute tolerance of a set (Rule 5)."""
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
                raise ConnectionTimeoutError(f"{channel.pv} could not connect within {timeout} s{why}")
            if channel.error is not None:
                raise channel.error

    # --- values -----------------------------------------------------------------------------

    def _convert(self, value: Any, metadata: p.PVMetadata, as_string: bool) -> Any:
        if isinstance(value, np.ndarray):
            value = value.copy()
        if not as_string:
            return value
        kind = metadata.get("native_type")
        if kind == "enum":
            strs = metadata.get("enum_strs") or []
            return strs[value] if isinstance(value, int) and 0 <= value < len(strs) else str(value)
        if kind == "char" and isinstance(value, np.ndarray):
            return value.astype(np.uint8).tobytes().split(b"\0", 1)[0].decode(errors="replace")
        if isinstance(value, (list, np.ndarray)):
            return value
        return value if isinstance(value, str) else str(value)

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
        """A snapshot asked of the daemon now (Rule 6), applied to the channel on the way."""
        channel = self._read_channel
        if not channel.ready:
            self.wait_for_connection(timeout=connection_timeout)
        timeout = self.timeout if timeout is None else timeout

        def on_reply(message: p.Message) -> bool:  # on the I/O thread, as channels need
            if isinstance(message, p.Snapshot):
                channel.apply(message.epoch, message.seq, message.connected, message.reading,
                              message.metadata, from_stream=False)
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
        value = self._convert(reading.value, metadata, self.as_string if as_string is None else as_string)
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
        return {self.name: {"value": self._convert(reading.value, metadata, self.as_string),
                            "timestamp": reading.timestamp}}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Data keys as ophyd's ``EpicsSignalBase.describe`` gives them."""
        reading, metadata = self._latest()
        value = self._convert(reading.value, metadata, self.as_string)
        low, high = self.limits
        desc: dict[str, Any] = {
            "source": self.source_name,
            "dtype": data_type(value),
            "shape": data_shape(value),
            "units": metadata.get("units"),
            "lower_ctrl_limit": low,
            "upper_ctrl_limit": high,
        }
        if self.precision is not None:
            desc["precision"] = self.precision
        if self.enum_strs is not None:
            desc["enum_strs"] = tuple(self.enum_strs)
        return {self.name: desc}

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
            status=reading.status if reading else None,
            severity=reading.severity if reading else None,
        )
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
    def alarm_status(self) -> int | None:
        reading = self._read_channel.reading
        return reading.status if reading else None

    @property
    def alarm_severity(self) -> int | None:
        reading = self._read_channel.reading
        return reading.severity if reading else None

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

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, callback: Callable[..., Any], event_type: str | None = None, run: bool = True) -> int:
        """Call ``callback(**kwargs)`` on every update of ``event_type`` ("value" or "meta");
        with ``run``, first with the current state. Returns an id for ``unsubscribe``."""
        if not callable(callback):
            raise ValueError("callback must be callable")
        event_type = event_type or self._default_sub
        if event_type not in (self.SUB_VALUE, self.SUB_META):
            raise KeyError(f"unknown event type {event_type!r}; use 'value' or 'meta'")
        cid = next(_cids)
        subscription = _Subscription(callback, event_type, run)
        channel = self._read_channel
        with channel.cond, self._subs_lock:
            self._subs[cid] = subscription
            self._subs_by_kind = _by_kind(self._subs)
            _subscribed.add(self)
            if not self._listening:
                self._listening = True
                channel.add_listener(self._on_channel)
        self._hub.dispatch(self._prime, cid)
        return cid

    def unsubscribe(self, cid: int) -> None:
        with self._read_channel.cond, self._subs_lock:
            self._subs.pop(cid, None)
            self._release_if_unsubscribed()

    def clear_sub(self, cb: Callable[..., Any], event_type: str | None = None) -> None:
        with self._read_channel.cond, self._subs_lock:
            for cid, sub in list(self._subs.items()):
                if sub.callback == cb and (event_type is None or sub.event_type == event_type):
                    del self._subs[cid]
            self._release_if_unsubscribed()

    def unsubscribe_all(self) -> None:
        with self._read_channel.cond, self._subs_lock:
            self._subs.clear()
            self._release_if_unsubscribed()

    def _release_if_unsubscribed(self) -> None:
        """With ``cond`` and ``_subs_lock`` held, after subscriptions went: the map by event
        type follows, and with no subscription left, no cost is left (Rule 3)."""
        self._subs_by_kind = _by_kind(self._subs)
        if not self._subs:
            _subscribed.discard(self)
            if self._listening:
                self._listening = False
                self._read_channel.remove_listener(self._on_channel)

    def destroy(self) -> None:
        self.unsubscribe_all()

    # Runs on the callback thread.
    def _prime(self, cid: int) -> None:
        with self._subs_lock:
            sub = self._subs.get(cid)
        if sub is None or sub.primed:
            return
        channel = self._read_channel
        with channel.cond:  # the state and its version together
            sub.version = channel.version
            if not sub.run:
                kwargs = None
            elif sub.event_type == self.SUB_META:
                kwargs = self._meta_kwargs()
            else:
                kwargs = self._current_value_event()
        sub.primed = True
        if kwargs is not None:
            self._call(sub.callback, sub.event_type, kwargs)

    def _current_value_event(self) -> dict[str, Any] | None:
        """The last new value the channel had, as its callback gets it (None before any)."""
        channel = self._read_channel
        with channel.cond:
            reading, metadata, previous = channel.reading, channel.metadata, channel.previous
            if channel.value_version == 0 or reading is None:
                return None
        return self._value_kwargs(reading, previous, metadata)

    def _value_kwargs(self, reading: p.Reading, old: p.Reading | None, metadata: p.PVMetadata) -> dict[str, Any]:
        # Most values are plain numbers, for which _convert changes nothing: spared its call.
        value = reading.value
        if self.as_string or type(value) not in _PLAIN:
            value = self._convert(value, metadata, self.as_string)
        old_value = None if old is None else old.value
        if old is not None and (self.as_string or type(old_value) not in _PLAIN):
            old_value = self._convert(old_value, metadata, self.as_string)
        return {
            "old_value": old_value,
            "value": value,
            "timestamp": reading.timestamp,
            "status": reading.status,
            "severity": reading.severity,
        }

    def _meta_kwargs(self) -> dict[str, Any]:
        md = self.metadata
        keys = ("connected", "read_access", "write_access", "timestamp", "status", "severity",
                "precision", "units", "lower_ctrl_limit", "upper_ctrl_limit")
        kwargs = {key: md.get(key) for key in keys}
        kwargs["enum_strs"] = self.enum_strs
        return kwargs

    # Runs on the I/O thread, with the channel's cond held: capture the state now, call users
    # later on the callback thread; nothing at all unless a subscription takes it (Rule 3).
    def _on_channel(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        if kind not in self._subs_by_kind:
            return
        if kind == self.SUB_VALUE:
            reading = channel.reading
            if reading is not None:
                self._hub.dispatch(self._run_value_subs, channel.version, reading, old, channel.metadata)
        elif kind == self.SUB_META:
            self._hub.dispatch(self._run_meta_subs, channel.version)

    # Run on the callback thread: deliver the change ``version`` to every primed subscription
    # that has not seen it, with what a callback gets built only if one will.
    def _run_value_subs(self, version: int, reading: p.Reading, old: p.Reading | None,
                        metadata: p.PVMetadata) -> None:
        kwargs = None
        for sub in self._subs_by_kind.get(self.SUB_VALUE, ()):
            if sub.primed and sub.version < version:
                if kwargs is None:
                    kwargs = self._value_kwargs(reading, old, metadata)
                sub.version = version
                self._call(sub.callback, self.SUB_VALUE, kwargs)

    def _run_meta_subs(self, version: int) -> None:
        kwargs = None
        for sub in self._subs_by_kind.get(self.SUB_META, ()):
            if sub.primed and sub.version < version:
                if kwargs is None:
                    kwargs = self._meta_kwargs()
                sub.version = version
                self._call(sub.callback, self.SUB_META, kwargs)

    def _call(self, callback: Callable[..., Any], event_type: str, kwargs: dict[str, Any]) -> None:
        try:
            callback(sub_type=event_type, obj=self, **kwargs)
        except Exception:
            log.exception("subscription_callback_failed", signal=self.name, callback=repr(callback))


class EpicsSignalRO(EpicsSignalBase):
    """A read-only EPICS signal: ``set`` and ``put`` raise ``ReadOnlyError``."""

    def set(self, value: Any, *, timeout: float | None = None, settle_time: float | None = None) -> Status:
        raise ReadOnlyError(f"{self.name} is read-only ({type(self).__name__})")

    def put(self, value: Any, *, force: bool = False, connection_timeout: float | None = None,
            callback: Callable[..., Any] | None = None, use_complete: bool | None = None,
            timeout: float | None = None, wait: bool = False) -> None:
        raise ReadOnlyError(f"{self.name} is read-only ({type(self).__name__})")


def within_tolerance(target: Any, current: Any, enum_strs: Iterable[str] | None, atol: Any, rtol: Any) -> bool:
    """Whether ``current`` has reached ``target``: ophyd's ``_compare_maybe_enum``."""
    if current is None:
        return target is None
    if enum_strs:
        strs = list(enum_strs)
        try:
            a = target if isinstance(target, str) else strs[int(target)]
            b = current if isinstance(current, str) else strs[int(current)]
        except (IndexError, TypeError, ValueError):
            return False
        return a == b
    try:
        if atol is not None or rtol is not None:
            return bool(np.allclose(target, current, rtol=rtol if rtol is not None else 1e-5,
                                    atol=atol if atol is not None else 1e-8))
        return bool(np.all(np.asarray(target == current)))
    except (TypeError, ValueError):  # shapes or types that cannot be compared: not there
        return False


class _ReadbackWatch:
    """Finishes ``status`` once the read channel holds a value within tolerance of ``target``
    (Rule 5); ``armed`` by the put's completion (or at once without ``put_complete``)."""

    def __init__(self, signal: EpicsSignal, status: Status, target: Any, atol: Any, rtol: Any) -> None:
        self.signal = signal
        self.status = status
        self.target = target
        self.atol = atol
        self.rtol = rtol
        self.armed = False
        self.channel = signal._read_channel

    def start(self) -> None:
        self.channel.add_listener(self.on_change)
        self.status.add_callback(lambda _: self.channel.remove_listener(self.on_change))

    def arm(self) -> None:
        """From now on the readback decides; it may already be there."""
        with self.channel.cond:
            self.armed = True
            self.on_change("value", self.channel, None)

    # On the I/O thread with the channel's cond held (or from ``arm``).
    def on_change(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        if not self.armed or self.status.done or channel.reading is None:
            return
        if within_tolerance(self.target, channel.reading.value, channel.metadata.get("enum_strs"),
                            self.atol, self.rtol):
            self.status.set_finished(dispatch=self.signal._hub.dispatch)


class EpicsSignal(EpicsSignalBase):
    """A read-write EPICS signal; ``set`` returns a ``Status`` that finishes as Rule 5 says."""

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
        self._write_channel = self._read_channel if self._write_pv == read_pv else self._hub.channel(self._write_pv)

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
        """Put ``value``; the Status finishes as Rule 5 says, or fails with the put's error or
        when ``timeout`` (default ``write_timeout``) expires.

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
        write_channel = self._write_channel
        hub = self._hub
        watch = None
        if not use_complete:
            watch = _ReadbackWatch(self, status, value, self.tolerance, self.rtolerance)
        elif self._tolerance is not None or self.rtolerance is not None:
            watch = _ReadbackWatch(self, status, value, self._tolerance, self.rtolerance)
        if watch is not None:
            watch.start()
            if not use_complete:
                watch.arm()

        def on_reply(message: p.Message) -> bool:
            if isinstance(message, p.SetAccepted):
                return False
            if isinstance(message, p.SetDone):
                if message.reading is not None:
                    # Read-your-writes: apply the read-back before anyone hears "done".
                    write_channel.apply(message.epoch, message.seq, True, message.reading, None, from_stream=False)
                if watch is None:
                    status.set_finished(dispatch=hub.dispatch)  # waiters wake now (status.py Rule 4)
                elif use_complete:
                    watch.arm()
            elif isinstance(message, p.ErrorReply):
                status.set_exception(error_from_code(message.code, message.message), dispatch=hub.dispatch)
            else:
                return False
            return True

        hub.request(lambda rid: p.SetRequest(id=rid, pv=self._write_pv, value=value), on_reply)
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
