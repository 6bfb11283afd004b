"""The readings socket's messages, decoded on the client's hot path: ``decode_reading`` and
``decode_readings``.

Rule 1: ``decode_reading`` is ``decode`` for the readings socket: what it returns or refuses is
exactly what ``decode`` returns or refuses; it is only quicker for the usual ``Update`` and
``Updates``.
Rule 2: ``decode_readings`` takes a readings frame (one or more messages back to back,
protocol Rule 8) apart, message by message as ``decode_reading``.
"""

from __future__ import annotations

from typing import Any, Iterator

import msgpack

from pvhub.arrays import unpack_ext
from pvhub.errors import ProtocolError
from pvhub.message_checks import CONTAINERS, MAX_DEPTH, NUMBER, deeper_than, items_problem, may_nest_deeper
from pvhub.messages import FIELDS, NESTED_FIELDS, PROTOCOL_VERSION, Message, Reading, Update, Updates, built
from pvhub.protocol import decode

# Every field of an ``Update``, as ``encode`` writes it: the one shape the fast path takes.
_UPDATE_SIZE = len(FIELDS[Update]) + 2  # and "v", "op"
_READING_SIZE = len(NESTED_FIELDS[Reading])


def decode_reading(data: bytes) -> Message:
    """``decode(data)``, sooner for what the readings socket carries most (Rule 1).

    An ``Update`` with exactly the fields ``encode`` writes is checked field by field here
    and built without ``decode``'s general walk; anything else, valid or not, goes to
    ``decode``, which accepts it or refuses it with ``ProtocolError`` as always."""
    try:
        body = msgpack.unpackb(data, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except Exception:  # malformed: let decode say why, in its words
        return decode(data)
    return _reading_of(body, data)


def decode_readings(frame: bytes) -> Iterator[Message]:
    """The messages of one readings frame, in order (Rule 2): for each, what ``decode_reading``
    returns for its bytes. A frame broken part way yields the messages before the break, then
    raises ``ProtocolError``; an empty frame is refused as ``decode`` refuses it."""
    try:  # one message, the usual frame and every big array's: no Unpacker, which copies
        body = msgpack.unpackb(frame, raw=False, ext_hook=unpack_ext, strict_map_key=False)
    except msgpack.ExtraData:
        yield from _each_reading(frame)
        return
    except Exception:  # malformed: let decode say why, in its words
        yield decode(frame)
        return
    yield _reading_of(body, frame)


def _each_reading(frame: bytes) -> Iterator[Message]:
    """``decode_readings`` for a frame of several messages."""
    size = len(frame)
    unpacker = msgpack.Unpacker(raw=False, ext_hook=unpack_ext, strict_map_key=False, max_buffer_size=size)
    unpacker.feed(frame)
    start = 0
    while start < size:
        try:
            body = unpacker.unpack()
        except Exception:  # broken or cut short from here on: decode says why, in its words
            decode(frame[start:])
            raise ProtocolError("undecodable message") from None
        end = unpacker.tell()
        yield _reading_of(body, frame[start:end])
        start = end


def _reading_of(body: Any, data: bytes) -> Message:
    """The message ``body`` (unpacked from ``data``) is: an ``Update`` or ``Updates`` in the
    exact shape ``encode`` writes, checked here; anything else as ``decode`` judges ``data``."""
    message = _update_of(body, data) or _updates_of(body, data)
    return decode(data) if message is None else message


def _update_of(body: Any, data: bytes) -> Update | None:
    """The ``Update`` that ``body`` (unpacked from ``data``) is, when it has exactly the shape
    ``encode`` writes and passes decode's checks; None for anything else, for ``decode``."""
    if type(body) is not dict or len(body) != _UPDATE_SIZE:
        return None
    try:  # as many keys as an Update has, and each of them: exactly its keys
        version, op, pv, reading, metadata = body["v"], body["op"], body["pv"], body["reading"], body["metadata"]
        epoch, seq, connected, snapshot = body["epoch"], body["seq"], body["connected"], body["snapshot"]
    except KeyError:
        return None
    if (
        type(version) is not int or version != PROTOCOL_VERSION or op != "update"
        or type(pv) is not str or not pv or "\0" in pv
        or type(epoch) is not int or type(seq) is not int
        or type(connected) is not bool or type(snapshot) is not bool
        or (metadata is not None and type(metadata) is not dict)
    ):
        return None
    if reading is not None:
        if type(reading) is not dict or len(reading) != _READING_SIZE:
            return None
        try:
            value, timestamp, severity, status = (reading["value"], reading["timestamp"], reading["severity"],
                                                  reading["status"])
        except KeyError:
            return None
        if type(timestamp) not in NUMBER or type(severity) is not int or type(status) is not int:
            return None
        # Only containers nest: a plain value and no metadata is two levels deep.
        if (metadata is not None or type(value) in CONTAINERS) and may_nest_deeper(data) \
                and deeper_than(body, MAX_DEPTH):
            return None
        body["reading"] = built(Reading, reading)
    elif metadata is not None and may_nest_deeper(data) and deeper_than(body, MAX_DEPTH):
        return None
    del body["v"], body["op"]
    return built(Update, body)


_UPDATES_SIZE = len(FIELDS[Updates]) + 2  # and "v", "op"


def _updates_of(body: Any, data: bytes) -> Updates | None:
    """The ``Updates`` that ``body`` is, checked as ``decode`` checks it; None for anything
    else, for ``decode`` (Rule 1)."""
    if type(body) is not dict or len(body) != _UPDATES_SIZE:
        return None
    try:
        version, op, pv, epoch, items = body["v"], body["op"], body["pv"], body["epoch"], body["items"]
    except KeyError:
        return None
    if (type(version) is not int or version != PROTOCOL_VERSION or op != "updates"
            or type(pv) is not str or not pv or "\0" in pv or type(epoch) is not int
            or type(items) is not list or items_problem(items)):
        return None
    if any(type(item[1]) in CONTAINERS for item in items) and may_nest_deeper(data) \
            and deeper_than(body, MAX_DEPTH):
        return None
    del body["v"], body["op"]
    return built(Updates, body)
