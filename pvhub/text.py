"""Text in Channel Access: the protocol carries bytes, and says nothing of their encoding.

Rule 1: bytes read are UTF-8 where they are UTF-8 (what pyepics and EPICS 7 tools write), and
latin-1 otherwise (what older tools and caproto write): latin-1 gives every byte a
character, so no byte is lost or replaced. Text stops at its first NUL.
Rule 2: text written is UTF-8, so what pvhub writes it reads back unchanged, whatever the
characters.
"""

from __future__ import annotations

from typing import Any


def decoded(raw: bytes) -> str:
    """The text of ``raw`` up to its first NUL (Rule 1)."""
    data = raw.split(b"\0", 1)[0]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def encoded(value: Any) -> Any:
    """``value`` with its text as the bytes a put carries (Rule 2): a str, or each str of a
    list; anything else as it is."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [item.encode("utf-8") for item in value]
    return value
