"""pvhub/text.py: how Channel Access bytes become text and back (no sockets)."""

from __future__ import annotations

import pytest

from pvhub.text import decoded, encoded


@pytest.mark.parametrize(
    "raw, text",
    [
        (b"hello", "hello"),
        ("20 °C, 中文".encode(), "20 °C, 中文"),  # UTF-8, as pyepics writes
        (b"caf\xe9", "café"),  # latin-1, as caproto writes: not UTF-8, so read as latin-1
        (b"\xff\xfe", "ÿþ"),  # any byte is a latin-1 character: nothing is replaced
        (b"abc\0\xe9garbage", "abc"),  # text ends at its first NUL
        (b"", ""),
    ],
)
def test_bytes_read_as_text(raw, text):
    assert decoded(raw) == text


def test_text_written_is_utf8_and_reads_back_unchanged():
    for text in ("plain", "µm", "中文", "ÿþ"):
        assert decoded(encoded(text)) == text
    assert encoded(["a", "é"]) == [b"a", "é".encode()]
    assert encoded(3.5) == 3.5 and encoded([1, 2]) == [1, 2]
