"""A PV's fields as pyepics gives them (``units``, ``access``, ``count``, ``char_value``, ``info``,
the keywords of a monitor callback...), made from the reading and metadata of its channel.

Rule 1: the functions here are pure: a reading and metadata in, pyepics' field out, with no
channel or hub, so a callback's fields and a property's are the same computation.
Rule 2: ``PVFields`` answers from the channel's state at the moment it is asked, and with
pyepics' answers while there is none: ``None``, ``"unknown"`` access, ``nelm`` -1.
Rule 3: a value is converted to the PV's native type as a CA client converts it before
sending (a float put to an integer PV is truncated); the daemon checks what remains.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from pvhub import protocol as p
from pvhub.client.channel import Channel
from pvhub.client.values import array_text, dbr_name, dbr_type, float_text
from pvhub.text import decoded

AUTOMONITOR_MAXLENGTH = 65536  # pyepics' threshold for char waveforms read as text


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
_ACCESS_TEXT = {(False, False): "no access", (True, False): "read-only",
                (False, True): "write-only", (True, True): "read/write"}


def access_rights(metadata: dict[str, Any]) -> tuple[bool, bool]:
    return bool(metadata.get("read_access", True)), bool(metadata.get("write_access", False))


def time_fields(reading: p.Reading) -> dict[str, Any]:
    seconds = math.floor(reading.timestamp)
    return {
        "timestamp": reading.timestamp,
        "posixseconds": int(seconds),
        "nanoseconds": int(round((reading.timestamp - seconds) * 1e9)) % 1_000_000_000,
    }


def ctrl_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    """Every control field, None where the PV's type has none (a callback's keywords)."""
    fields = {key: metadata.get(key) for key in _CTRL_KEYS}
    strs = metadata.get("enum_strs")
    fields["enum_strs"] = tuple(strs) if strs is not None else None
    return fields


def ctrl_vars(metadata: dict[str, Any]) -> dict[str, Any]:
    """The control fields a DBR_CTRL read of the PV's type holds, as pyepics' ``get_ctrlvars``
    gives them: limits and units for numbers, precision for floats, labels for an enum (if
    it has any), none for a string."""
    native = metadata.get("native_type")
    if native == "enum":
        strs = metadata.get("enum_strs")
        return {"enum_strs": tuple(strs)} if strs else {}
    if native not in ("float", "int", "char"):
        return {}
    keys = _CTRL_KEYS if native == "float" else _CTRL_KEYS[1:]
    return {key: metadata.get(key) for key in keys}


def element_count(value: Any) -> int:
    """Elements in a reading's value, as CA counts them in an update (a waveform's NORD):
    one for a scalar or a single string."""
    if isinstance(value, np.ndarray):
        return int(value.size)
    return len(value) if isinstance(value, list) else 1


def shaped(value: Any, metadata: dict[str, Any], count: int | None, as_numpy: bool) -> Any:
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
        return decoded(data).rstrip()
    if isinstance(value, (np.ndarray, list)) and (count > 1 or np.size(value) > 1):
        return array_text(int(np.size(value)), native, metadata.get("native_bits"))
    if native == "enum":
        strs = metadata.get("enum_strs") or []
        index = int(value) if isinstance(value, (int, np.integer)) else -1
        return strs[index] if 0 <= index < len(strs) else str(value)
    if native == "float" and isinstance(value, (float, int, np.floating)):
        return float_text(value, metadata.get("precision"))
    return repr(value) if not isinstance(value, str) else value


def format_time(stamp: float) -> str:
    whole, fraction = divmod(stamp, 1)
    return "%s.%5.5i" % (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(whole)), round(1.0e5 * fraction))


class PVFields:
    """The fields of a PV (Rule 2); the base of ``PV``, which gives it ``_channel``, ``pvname``,
    ``form``, ``monitor_delta``, ``connected``, ``callbacks`` and the caller's ``count``."""

    _fields = ("pvname", "value", "char_value", "status", "ftype", "chid", "host", "count",
               "access", "write_access", "read_access", "severity", "timestamp",
               "posixseconds", "nanoseconds", "precision", "units", "enum_strs",
               "monitor_delta", *_CTRL_KEYS[2:])

    # Given by the PV.
    _channel: Channel
    _user_count: int | None
    pvname: str
    form: str
    monitor_delta: float | None
    callbacks: dict[int, tuple[Callable[..., Any], dict[str, Any]]]

    def _state(self) -> tuple[p.Reading | None, dict[str, Any]]:
        with self._channel.cond:
            return self._channel.reading, dict(self._channel.metadata)

    def _metadata(self) -> dict[str, Any]:
        return dict(self._channel.metadata)

    def _reading(self) -> p.Reading | None:
        return self._channel.reading

    def _callback_fields(self, reading: p.Reading, metadata: dict[str, Any]) -> dict[str, Any]:
        value = shaped(reading.value, metadata, None, True)
        fields = {key: None for key in self._fields}
        fields.update(ctrl_fields(metadata))
        fields.update(time_fields(reading))
        read_access, write_access = access_rights(metadata)
        ftype = dbr_type(metadata.get("native_type"), self.form, metadata.get("native_bits"))
        fields.update(
            pvname=self.pvname,
            value=value,
            char_value=char_value(value, metadata, element_count(value)),
            status=reading.status,
            severity=reading.severity,
            ftype=ftype,
            type=dbr_name(ftype),
            typefull=dbr_name(ftype),
            host=metadata.get("host"),
            count=element_count(value),
            nelm=int(metadata.get("count") or 1),
            read_access=read_access,
            write_access=write_access,
            access=_ACCESS_TEXT[(read_access, write_access)],
            monitor_delta=self.monitor_delta,
            chid=None,
        )
        return fields

    @property
    def char_value(self) -> str | None:
        reading, metadata = self._state()
        if reading is None:
            return None
        return char_value(shaped(reading.value, metadata, None, True), metadata, self.count)

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
        return time_fields(reading)["posixseconds"] if reading else None

    @property
    def nanoseconds(self) -> int | None:
        reading = self._reading()
        return time_fields(reading)["nanoseconds"] if reading else None

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
        return self.connected and access_rights(self._metadata())[0]

    @property
    def write_access(self) -> bool:
        return self.connected and access_rights(self._metadata())[1]

    @property
    def access(self) -> str:
        if not self.connected:
            return "unknown"
        return _ACCESS_TEXT[access_rights(self._metadata())]

    @property
    def ftype(self) -> int | None:
        """The DBR type this PV is read as (its native type in ``form``)."""
        metadata = self._metadata()
        return dbr_type(metadata.get("native_type"), self.form, metadata.get("native_bits"))

    @property
    def type(self) -> str:
        """The type the PV is read as, as pyepics names it: ``"time_double"`` in the default
        'time' form, ``"double"`` in 'native', ``"ctrl_enum"``... (the same as ``typefull``)."""
        return dbr_name(self.ftype)

    @property
    def typefull(self) -> str:
        return dbr_name(self.ftype)

    @property
    def host(self) -> str | None:
        """The IOC serving the PV, as its actor reaches it (``host:port``)."""
        return self._metadata().get("host")

    @property
    def count(self) -> int:
        """Elements in the latest value, a waveform's NORD (the caller's ``count`` if
        smaller); ``nelm`` until a value has come."""
        reading = self._reading()
        count = element_count(reading.value) if reading is not None else self.nelm
        return min(count, self._user_count) if self._user_count else count

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
        value = shaped(reading.value, metadata, None, True)
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
            "timestamp": f"{reading.timestamp:.3f} ({format_time(reading.timestamp)})",
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
