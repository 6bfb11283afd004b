"""What Channel Access messages mean to an actor: the events the backend emits, and the
readings and metadata read from caproto's responses or straight from the received bytes.

Rule 1: pure functions and frozen dataclasses; no sockets, no state. ``actors/backend.py`` and
``actors/circuit.py`` speak the protocol and call these; their tests compare them with caproto's
own parse.
Rule 2: a value is what ophyd gives: a Python scalar for one element, a numpy array (or a
list of str) for more; strings are decoded up to their first NUL as ``pvhub.text`` says
(UTF-8 where the bytes are UTF-8, latin-1 otherwise).
Rule 3: a monitor update in the DBR_TIME form the backend subscribes with is read straight
from the received bytes (``time_reading``, ``TIME_LAYOUT``): its value, timestamp, status and
severity are exactly what caproto would give (same types, big-endian arrays, timestamps cut
to the microsecond as caproto does). So is the answer to a read in that form, or to a put,
that reports success (``Answer``): a put and its read-back, and a fresh read, are on the path
a plan step waits on. Anything else goes through caproto's parser.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import caproto
import numpy as np
from caproto import ChannelType
from caproto._numpy_backend import type_map as _CAPROTO_DTYPES

from pvhub import protocol as p
from pvhub.text import decoded

# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionEvent:
    pv: str
    connected: bool


@dataclass(frozen=True)
class AccessEvent:
    pv: str
    read_access: bool
    write_access: bool


@dataclass(frozen=True)
class MetadataEvent:
    pv: str
    metadata: p.PVMetadata


@dataclass(frozen=True)
class ReadingEvent:
    pv: str
    reading: p.Reading


@dataclass(frozen=True)
class PutAnsweredEvent:
    """The IOC says a put completed. With ``read_back_pending`` the read sent behind it is
    still to be answered, and its answer is the read-back (a ``PutDoneEvent``); without, that
    read was answered first, and a read-back comes only if it is asked for (``read_back``)."""
    pv: str
    put_id: int
    read_back_pending: bool


@dataclass(frozen=True)
class PutDoneEvent:
    pv: str
    put_id: int
    error: str | None
    readback: p.Reading | None


@dataclass(frozen=True)
class ReadDoneEvent:
    pv: str
    read_id: int
    reading: p.Reading | None  # None: the read failed


Event = (ConnectionEvent | AccessEvent | MetadataEvent | ReadingEvent | PutAnsweredEvent | PutDoneEvent
         | ReadDoneEvent)

_NATIVE_KIND = {
    ChannelType.STRING: "string",
    ChannelType.INT: "int",
    ChannelType.LONG: "int",
    ChannelType.FLOAT: "float",
    ChannelType.DOUBLE: "float",
    ChannelType.ENUM: "enum",
    ChannelType.CHAR: "char",
}

# The width of each numeric native type: what a put's value must fit (coercion.py Rule 3).
_NATIVE_BITS = {
    ChannelType.INT: 16,
    ChannelType.LONG: 32,
    ChannelType.FLOAT: 32,
    ChannelType.DOUBLE: 64,
    ChannelType.CHAR: 8,
}

_LIMIT_FIELDS = (
    "lower_ctrl_limit",
    "upper_ctrl_limit",
    "lower_disp_limit",
    "upper_disp_limit",
    "lower_alarm_limit",
    "upper_alarm_limit",
    "lower_warning_limit",
    "upper_warning_limit",
)


def text(raw: Any) -> str:
    return decoded(raw) if isinstance(raw, bytes) else str(raw)


def value_of(response: Any, native: ChannelType) -> Any:
    """The Python value of a read or monitor response: a scalar for one element, an array
    (or list of str) for more, like ophyd."""
    data = response.data
    if native == ChannelType.STRING:
        items = [text(item) for item in data]
        return items[0] if len(items) == 1 else items
    if len(data) == 1:
        # ndarray.item(0) gives the Python scalar in one call (indexing first makes a numpy
        # scalar, then converts it): this runs for every monitor update and read-back.
        return data.item(0) if hasattr(data, "item") else data[0]
    return native_order(data) if isinstance(data, np.ndarray) else data.copy()


@dataclass(frozen=True, slots=True)
class Answer:
    """A READ_NOTIFY or WRITE_NOTIFY answer with status ``ECA_NORMAL``, read from the bytes
    (Rule 3): a read's reading, or None for a put's completion. ``reading_of``,
    ``read_problem`` and ``put_error`` take it as they take caproto's responses."""

    reading: p.Reading | None = None


PUT_ANSWER = Answer()


def reading_of(response: Any, native: ChannelType) -> p.Reading:
    if type(response) is Answer:
        assert response.reading is not None, "a put's answer holds no reading"
        return response.reading
    md = response.metadata
    return p.Reading(
        value=value_of(response, native),
        timestamp=float(getattr(md, "timestamp", 0.0)),
        severity=int(getattr(md, "severity", 0)),
        status=int(getattr(md, "status", 0)),
    )


def metadata_of(response: Any, native: ChannelType, count: int, host: str) -> p.PVMetadata:
    md = response.metadata
    kind = _NATIVE_KIND.get(native, "float")
    out: p.PVMetadata = {"native_type": kind, "count": count, "host": host}
    if native in _NATIVE_BITS:
        out["native_bits"] = _NATIVE_BITS[native]
    # Fields the PV's control structure lacks (strings and enums have no units or limits)
    # are None, as ophyd reports them.
    out["units"] = text(md.units) if hasattr(md, "units") else None  # type: ignore[typeddict-item]
    out["precision"] = int(md.precision) if hasattr(md, "precision") else None
    for name in _LIMIT_FIELDS:
        value = getattr(md, name, None)
        if isinstance(value, bytes):  # a CHAR PV's limits: one unsigned byte each (ctypes c_char)
            value = value[0] if value else 0
        out[name] = value.item() if hasattr(value, "item") else value  # type: ignore[literal-required]
    out["enum_strs"] = (
        [text(s) for s in md.enum_strings] if kind == "enum" and hasattr(md, "enum_strings") else None
    )
    return out


def put_count(value: Any) -> int:
    """How many elements a put of ``value`` (as coerced) carries: what its header must say.
    Left to caproto, a server older than CA 4.13 is told the PV's whole length, and reads
    past the payload into what follows it."""
    return value.size if isinstance(value, np.ndarray) else len(value) if isinstance(value, list) else 1


def read_problem(response: Any) -> str | None:
    """Why a read's (or a monitor update's) answer holds no reading, or None when it holds one.
    An IOC that cannot read a PV (no read access, a failed get, a channel going away) still
    answers, with an ECA status that says so and a payload of zeros: not a value."""
    if response is None:
        return "not sent: refused by the Channel Access state machine"
    if type(response) is Answer:  # read from the bytes only when the IOC said ECA_NORMAL
        return None
    if isinstance(response, caproto.ErrorResponse):
        return f"the IOC refused it: {text(bytes(response.error_message))}"
    if response.header.parameter1 != ECA_NORMAL:  # the raw status: ``.status`` is caproto's tuple
        status = response.status
        return f"the IOC answered {getattr(status, 'name', status)}: {getattr(status, 'description', '')}"
    return None


def put_error(response: Any) -> str | None:
    """Why a put's completion says it failed, or None."""
    if response is None:
        return "put could not be sent: refused by the Channel Access state machine"
    if type(response) is Answer:
        return None
    if isinstance(response, caproto.ErrorResponse):
        return f"IOC refused the put: {text(bytes(response.error_message))}"
    status = getattr(response, "status", None)
    if status is not None and not getattr(status, "success", status == 1):
        return f"IOC reported the put failed: {getattr(status, 'description', None) or status}"
    return None



# --- the wire -----------------------------------------------------------------------------------

HEADER = struct.Struct(">HHHHII")  # command, payload size, data type, data count, p1, p2
EXTENDED = struct.Struct(">II")  # payload size, data count: after a header saying 0xFFFF, 0
_TIME_HEAD = struct.Struct(">hhII")  # status, severity, seconds and nanoseconds past 1990
EVENT_ADD = 1
READ_NOTIFY = caproto.ReadNotifyResponse.ID
WRITE_NOTIFY = caproto.WriteNotifyResponse.ID
# READ_NOTIFY and WRITE_NOTIFY: their answers name the request (the ioid) in parameter 2.
ANSWERS = (READ_NOTIFY, WRITE_NOTIFY)
ECA_NORMAL = 1
_EPICS_EPOCH = 631152000.0  # 1990-01-01 in Unix seconds
_SCALAR = {
    ChannelType.INT: struct.Struct(">h"),
    ChannelType.FLOAT: struct.Struct(">f"),
    ChannelType.ENUM: struct.Struct(">H"),
    ChannelType.CHAR: struct.Struct(">B"),
    ChannelType.LONG: struct.Struct(">i"),
    ChannelType.DOUBLE: struct.Struct(">d"),
}
# A DBR_TIME_<native> payload: where its value starts past the status, severity and stamp
# (the padding EPICS puts there, per type), and the native type (Rule 3).
TIME_LAYOUT: dict[int, tuple[int, ChannelType]] = {
    ChannelType.TIME_STRING: (12, ChannelType.STRING),
    ChannelType.TIME_INT: (14, ChannelType.INT),
    ChannelType.TIME_FLOAT: (12, ChannelType.FLOAT),
    ChannelType.TIME_ENUM: (14, ChannelType.ENUM),
    ChannelType.TIME_CHAR: (15, ChannelType.CHAR),
    ChannelType.TIME_LONG: (12, ChannelType.LONG),
    ChannelType.TIME_DOUBLE: (16, ChannelType.DOUBLE),
}
_STRING_BYTES = 40
# TIME_LAYOUT by plain int, with what each type's value needs: (where the value starts, its
# item's size, its struct (None for strings), its dtype). An enum member as a key hashes in
# Python; an int in C (a microsecond per update).
_TIME_DECODE: dict[int, tuple[int, int, struct.Struct | None, Any]] = {
    int(data_type): (offset, _STRING_BYTES, None, None) if native == ChannelType.STRING
    else (offset, _SCALAR[native].size, _SCALAR[native], np.dtype(_CAPROTO_DTYPES[native]))
    for data_type, (offset, native) in TIME_LAYOUT.items()
}


# A put of one number to a PV of each numeric native type: its value, padded to 8 bytes as
# every Channel Access payload is (Rule 3).
_WRITE_SCALAR: dict[int, struct.Struct] = {
    int(ChannelType.DOUBLE): struct.Struct(">d"),
    int(ChannelType.FLOAT): struct.Struct(">f4x"),
    int(ChannelType.LONG): struct.Struct(">i4x"),
    int(ChannelType.INT): struct.Struct(">h6x"),
    int(ChannelType.ENUM): struct.Struct(">H6x"),
    int(ChannelType.CHAR): struct.Struct(">B7x"),
}


def scalar_write(native: int, value: Any, sid: int, ioid: int) -> bytes | None:
    """The WRITE_NOTIFY of the one number ``value`` (as coerced) to a channel of native type
    ``native``: the bytes caproto's ``ClientChannel.write`` and ``send`` would queue (Rule 3).
    None for any other put (text, arrays, a value out of the type's range): caproto builds it."""
    layout = _WRITE_SCALAR.get(native)
    if layout is None or type(value) not in (int, float):
        return None
    try:
        payload = layout.pack(value)
    except (struct.error, OverflowError):  # caproto's path then says why it cannot go
        return None
    return HEADER.pack(WRITE_NOTIFY, layout.size, native, 1, sid, ioid) + payload


def native_order(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` (big-endian, as Channel Access carries it) in this host's byte
    order, as a direct client's arrays are: ``dtype == np.float64`` holds, and libraries that
    need native order take it."""
    return array.astype(array.dtype.newbyteorder("="))


def time_reading(buf: bytearray, start: int, size: int, data_type: int, count: int) -> p.Reading | None:
    """The reading in the DBR_TIME payload of ``size`` bytes at ``buf[start:]``, or None for
    another type."""
    layout = _TIME_DECODE.get(data_type)
    if layout is None or count < 1:
        return None
    offset, item, scalar, dtype = layout
    if size < offset + item * count:
        return None  # shorter than it says: caproto's parser says what is wrong with it
    status, severity, seconds, nanoseconds = _TIME_HEAD.unpack_from(buf, start)
    at = start + offset
    if scalar is None:
        items = [text(bytes(buf[at + i * _STRING_BYTES:at + (i + 1) * _STRING_BYTES])) for i in range(count)]
        value: Any = items[0] if count == 1 else items
    elif count == 1:
        value = scalar.unpack_from(buf, at)[0]
    else:
        value = native_order(np.frombuffer(buf, dtype=dtype, count=count, offset=at))
    # As caproto's TimeStamp.timestamp: cut to the microsecond.
    timestamp = _EPICS_EPOCH + seconds + 1.0e-6 * int(1.0e-3 * nanoseconds)
    return p.new_reading(value, timestamp, severity, status)
