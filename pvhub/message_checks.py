"""What ``decode`` checks in a message beyond its form: how deep it nests, and what each of its
fields holds.

Rule 1: each known field has the type its class declares, exactly as msgpack gives it (a bool
is not an int on the wire). Values declared ``Any`` are checked by whoever uses them (an actor
checks a put value against its PV's type). An annotation missing from the types here fails at
import, so a new field cannot go unchecked by accident.
Rule 2: what routing and dispatch rely on beyond types is checked here too: a PV name is not
empty where it is required and holds no NUL (protocol Rule 4), ``pvs`` holds names, and an
``Updates``' items are each whole, their ``seq`` one more than the one before (protocol Rule 8).
Rule 3: a message nests at most ``MAX_DEPTH`` levels. The nesting is walked by a loop, not by
recursion, over the containers only, and a short message is spared the walk by a count made
in C.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pvhub.errors import ProtocolError
from pvhub.messages import MESSAGES, NESTED, REQUIRED, Message, Reading, Updates

# Deeper than any message pvhub sends (a status reply nests five levels); shallow enough that
# code walking a value by recursion (repr, a log line) never meets Python's recursion limit.
MAX_DEPTH = 32


def may_nest_deeper(data: bytes) -> bool:
    """False when ``data`` holds too few maps and arrays to nest past ``MAX_DEPTH``, which
    spares the walk. Each starts with one of a few bytes (other bytes may be those too), so
    their count bounds the containers; counted in C, faster than a walk for a short
    message. A long one (a waveform's bytes) is walked: its containers are few, its bytes many."""
    if len(data) > _SCAN_AT_MOST:
        return True
    try:
        return data.translate(_CONTAINER_HEADS).count(1) > MAX_DEPTH
    except (AttributeError, TypeError):  # a buffer without translate: walk
        return True


_SCAN_AT_MOST = 512  # bytes; a scan costs about 3 ns a byte, a walk about 1 us a message


# 1 for the first byte of a fixmap, fixarray, map 16/32 or array 16/32; 0 for any other.
_CONTAINER_HEADS = bytes(int(0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF) for b in range(256))


def deeper_than(root: dict, limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels in ``root``; by a loop, not by
    recursion, over the containers only."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node
        if CONTAINERS.isdisjoint(map(type, children)):
            continue  # in C: a list of a million numbers costs no Python loop
        for child in children:
            if type(child) in CONTAINERS:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


CONTAINERS = frozenset((dict, list))


def check_types(cls: type[Message], fields: dict[str, Any]) -> None:
    """Rules 1 and 2 for the known ``fields`` of a ``cls`` message; ``ProtocolError`` if one
    fails."""
    check_field_types(cls, cls.OP, fields)
    pv = fields.get("pv")
    if pv is not None:
        if "pv" in REQUIRED[cls] and not pv:
            raise ProtocolError(f"{cls.OP}.pv must not be empty")
        if "\0" in pv:  # protocol Rule 4: the NUL ends a topic
            raise ProtocolError(f"{cls.OP}.pv must not hold a NUL")
    pvs = fields.get("pvs")
    if pvs is not None and not all(type(name) is str for name in pvs):
        raise ProtocolError(f"{cls.OP}.pvs must hold PV names")
    if cls is Updates:
        problem = items_problem(fields["items"])
        if problem:
            raise ProtocolError(f"updates.items: {problem}")


def items_problem(items: list) -> str | None:
    """What is wrong with an ``Updates`` message's items, or None (protocol Rule 8)."""
    if not items:
        return "there must be one or more"
    last = None
    for item in items:
        if type(item) is not list or len(item) != 5:
            return "each must be [seq, value, timestamp, severity, status]"
        seq, _, timestamp, severity, status = item
        if type(seq) is not int or (last is not None and seq != last + 1):
            return "each seq must be an int, one more than the one before"
        if type(timestamp) not in NUMBER or type(severity) is not int or type(status) is not int:
            return "timestamp must be a number, severity and status ints"
        last = seq
    return None


def check_field_types(cls: type, where: str, fields: dict[str, Any]) -> None:
    """Rule 1 for the known ``fields`` of a ``cls`` (a message, or a dataclass nested in one),
    named ``where`` in the error."""
    for name, allowed in _FIELD_TYPES[cls]:
        if name in fields and type(fields[name]) not in allowed:
            raise ProtocolError(f"{where}.{name} must be {_TYPE_WORDS[allowed]}, not {type(fields[name]).__name__}")


# What msgpack gives for each annotation (Rule 1).
_ANNOTATION_TYPES: dict[str, frozenset[type]] = {
    "int": frozenset((int,)),
    "float": frozenset((float, int)),
    "str": frozenset((str,)),
    "bool": frozenset((bool,)),
    "bytes": frozenset((bytes,)),
    "list": frozenset((list,)),
    "list | None": frozenset((list, type(None))),
    "dict": frozenset((dict,)),
    "PVMetadata | None": frozenset((dict, type(None))),
    "Reading | None": frozenset((Reading, type(None))),
}
_TYPE_WORDS = {
    allowed: " or ".join(sorted("None" if t is type(None) else t.__name__ for t in allowed))
    for allowed in _ANNOTATION_TYPES.values()
}
_FIELD_TYPES: dict[type, tuple[tuple[str, frozenset[type]], ...]] = {
    cls: tuple(
        (f.name, _ANNOTATION_TYPES[f.type]) for f in dataclasses.fields(cls) if f.type != "Any"
    )
    for cls in (*MESSAGES.values(), *NESTED.values())
}
# What an ``Updates`` item's timestamp may be (Rule 2).
NUMBER = _ANNOTATION_TYPES["float"]
