"""``Subscriptions``: ophyd's ``subscribe`` on a Signal, and what its callbacks get when.

The base of ``EpicsSignalBase`` (``pvhub.client.signal``), which gives it ``_read_channel``,
``_hub``, ``name``, ``as_string``, ``metadata`` and ``enum_strs``.

Rule 1: user callbacks run on the hub's callback thread, in the order the updates arrived.
A new subscription takes the channel's state and its ``version`` (channel.py, Rule 4) in
``subscribe``, as ophyd's subscribe runs the callback with the current value before it
returns; its first call, queued while the channel's ``cond`` is held, runs on the callback
thread before any change applied later. It then takes only changes of a later version, so
every change after ``subscribe`` reaches it once, in order (a counter's next values are not
skipped while the callback thread is busy).
Rule 2: a Signal nobody subscribed to costs nothing per update: it listens to its channel
only while it has subscriptions, and dispatches only events some subscription takes (the
subscriptions are also kept by event type in a map replaced whole on every change, so the
I/O thread and the callback thread look without a lock). What a callback gets is built on
the callback thread from what the I/O thread captured (the reading, the one before, the
metadata: none of them ever changes once made). Lock order: the channel's ``cond``, then
the Signal's ``_subs_lock`` (the I/O thread holds ``cond`` when it calls listeners).
Rule 3: a value callback gets what ophyd's EpicsSignal gives it: ``value``, ``old_value``,
``timestamp``, ``status`` and ``severity`` (``AlarmStatus``/``AlarmSeverity``), and the PV's
``precision``, ``units``, control limits and ``enum_strs`` (a tuple) where it has them.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

from pvhub import protocol as p
from pvhub.client.alarms import severity_of, status_of
from pvhub.client.dispatcher import array_bytes
from pvhub.client.hub import Channel, Hub, log
from pvhub.client.values import PLAIN, convert

_cids = itertools.count(1)
# Rule 3: the metadata a value callback gets besides the reading, as ophyd's EpicsSignal.
_CALLBACK_METADATA = ("precision", "lower_ctrl_limit", "upper_ctrl_limit", "units", "enum_strs")
# Signals with subscriptions stay alive while they have them (as ophyd's do through their PV
# callbacks), even if the user keeps no reference: the callbacks are what they wanted.
_subscribed: set[Subscriptions] = set()


class _Subscription:
    __slots__ = ("callback", "event_type", "version")

    def __init__(self, callback: Callable[..., Any], event_type: str) -> None:
        self.callback = callback
        self.event_type = event_type
        self.version = 0  # of the channel's last change this subscription delivered (Rule 1)


def _callback_metadata(metadata: p.PVMetadata) -> dict[str, Any]:
    """Rule 3: the metadata keywords of a value callback, those the PV has."""
    extra: dict[str, Any] = {}
    for key in _CALLBACK_METADATA:
        item = metadata.get(key)
        if item is not None:
            extra[key] = tuple(item) if key == "enum_strs" else item
    return extra


def _by_kind(subs: dict[int, _Subscription]) -> dict[str, tuple[_Subscription, ...]]:
    """``subs`` by event type, in the order they were made."""
    by_kind: dict[str, tuple[_Subscription, ...]] = {}
    for sub in subs.values():
        by_kind[sub.event_type] = by_kind.get(sub.event_type, ()) + (sub,)
    return by_kind


class Subscriptions:
    """The subscriptions of one Signal to the updates of its read channel (Rules 1-2)."""

    SUB_VALUE = "value"
    SUB_META = "meta"
    _default_sub = SUB_VALUE

    # Given by the Signal.
    _read_channel: Channel
    _hub: Hub
    name: str
    as_string: bool

    def __init__(self) -> None:
        self._subs: dict[int, _Subscription] = {}
        self._subs_lock = threading.Lock()
        self._subs_by_kind: dict[str, tuple[_Subscription, ...]] = {}  # Rule 2; no empty entries
        self._listening = False  # Rule 2: on the read channel, while there are subscriptions
        # Rule 3: the metadata a value callback gets, built once per metadata (set whole).
        self._callback_metadata: tuple[object, dict[str, Any]] = (None, {})

    def subscribe(self, callback: Callable[..., Any], event_type: str | None = None, run: bool = True) -> int:
        """Call ``callback(**kwargs)`` on every update of ``event_type`` ("value" or "meta");
        with ``run``, first with the current state. Returns an id for ``unsubscribe``."""
        if not callable(callback):
            raise ValueError("callback must be callable")
        event_type = event_type or self._default_sub
        if event_type not in (self.SUB_VALUE, self.SUB_META):
            raise KeyError(f"unknown event type {event_type!r}; use 'value' or 'meta'")
        cid = next(_cids)
        subscription = _Subscription(callback, event_type)
        channel = self._read_channel
        with channel.cond:  # the state, its version and the first call's place together (Rule 1)
            with self._subs_lock:
                self._subs[cid] = subscription
                self._subs_by_kind = _by_kind(self._subs)
                _subscribed.add(self)
                if not self._listening:
                    self._listening = True
                    channel.add_listener(self._on_channel)
            subscription.version = channel.version
            if not run:
                kwargs = None
            elif event_type == self.SUB_META:
                kwargs = self._meta_kwargs()
            else:
                kwargs = self._current_value_event()
            self._hub.dispatch_change(self, False, 0, self._prime, cid, kwargs)
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
        type follows, and with no subscription left, no cost is left (Rule 2)."""
        self._subs_by_kind = _by_kind(self._subs)
        if not self._subs:
            _subscribed.discard(self)
            if self._listening:
                self._listening = False
                self._read_channel.remove_listener(self._on_channel)

    def destroy(self) -> None:
        self.unsubscribe_all()

    # Runs on the callback thread: the first call, with the state ``subscribe`` took (Rule 1).
    # Every later change of the channel was queued after it (and a reading is never merged
    # across it: dispatcher Rule 5), so no change reaches a subscription before this.
    def _prime(self, cid: int, kwargs: dict[str, Any] | None) -> None:
        with self._subs_lock:
            sub = self._subs.get(cid)
        if sub is not None and kwargs is not None:
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
        # Most values are plain numbers, for which convert changes nothing: spared its call.
        value = reading.value
        if self.as_string or type(value) not in PLAIN:
            value = convert(value, metadata, self.as_string)
        old_value = None if old is None else old.value
        if old is not None and (self.as_string or type(old_value) not in PLAIN):
            old_value = convert(old_value, metadata, self.as_string)
        kwargs = {
            "old_value": old_value,
            "value": value,
            "timestamp": reading.timestamp,
            "status": status_of(reading.status),
            "severity": severity_of(reading.severity),
        }
        cached = self._callback_metadata
        if cached[0] is not metadata:  # a PV's metadata is replaced whole when it changes
            cached = self._callback_metadata = (metadata, _callback_metadata(metadata))
        kwargs.update(cached[1])
        return kwargs

    def _meta_kwargs(self) -> dict[str, Any]:
        md = self.metadata
        keys = ("connected", "read_access", "write_access", "timestamp", "status", "severity",
                "precision", "units", "lower_ctrl_limit", "upper_ctrl_limit")
        kwargs = {key: md.get(key) for key in keys}
        kwargs["enum_strs"] = self.enum_strs
        return kwargs

    # Runs on the I/O thread, with the channel's cond held: capture the state now, call users
    # later on the callback thread; nothing at all unless a subscription takes it (Rule 2).
    def _on_channel(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        if kind not in self._subs_by_kind:
            return
        if kind == self.SUB_VALUE:
            reading = channel.reading
            if reading is not None:
                self._hub.dispatch_change(self, True, array_bytes(reading.value), self._run_value_subs,
                                          channel.version, reading, old, channel.metadata,
                                          kept=2)  # ``old``, merged (dispatcher Rule 5)  # fmt: skip
        elif kind == self.SUB_META:
            self._hub.dispatch_change(self, False, 0, self._run_meta_subs, channel.version)

    # Run on the callback thread: deliver the change ``version`` to every subscription that
    # has not seen it (one made after it took its version), with what a callback gets built
    # only if one will.
    def _run_value_subs(self, version: int, reading: p.Reading, old: p.Reading | None,
                        metadata: p.PVMetadata) -> None:
        kwargs = None
        for sub in self._subs_by_kind.get(self.SUB_VALUE, ()):
            if sub.version < version:
                if kwargs is None:
                    kwargs = self._value_kwargs(reading, old, metadata)
                sub.version = version
                self._call(sub.callback, self.SUB_VALUE, kwargs)

    def _run_meta_subs(self, version: int) -> None:
        kwargs = None
        for sub in self._subs_by_kind.get(self.SUB_META, ()):
            if sub.version < version:
                if kwargs is None:
                    kwargs = self._meta_kwargs()
                sub.version = version
                self._call(sub.callback, self.SUB_META, kwargs)

    def _call(self, callback: Callable[..., Any], event_type: str, kwargs: dict[str, Any]) -> None:
        try:
            callback(sub_type=event_type, obj=self, **kwargs)
        except Exception:
            log.exception("subscription_callback_failed", signal=self.name, callback=repr(callback))
