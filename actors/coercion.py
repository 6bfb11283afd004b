"""What a put's value becomes before it is sent: the PV's native type, or a ``BadValueError``
saying why it cannot be.

Rule 1: no I/O; the metadata (``native_type``, ``native_bits``, ``count``, ``enum_strs``) is
what the PV's control read said. A number must fit the native width: a SHORT takes
-32768..32767, a FLOAT no finite value beyond float32's largest (infinities are values).
Rule 2: sizes are checked before anything is converted, so a ten-million-element list for a
scalar or a short waveform is refused at the cost of its length, not of its elements.
Rule 3: nothing is wrapped or cut to fit: a number outside the native type's range, a string
longer than a DBR_STRING holds, an enum value that names no state is refused. A finite float
for an integer PV is truncated toward zero, as Channel Access converts a double for a LONG
field and as ophyd and pyepics send it (``longout.set(3.7)`` writes 3).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pvhub import protocol as p
from pvhub.errors import BadValueError
from pvhub.text import decoded

# Channel Access's DBR_STRING holds 40 bytes including the terminating NUL.
MAX_STRING_BYTES = 39


def coerce_value(value: Any, metadata: p.PVMetadata) -> Any:
    """``value`` as the PV's native type, or ``BadValueError`` saying why it cannot be.

    Sizes are checked before anything is converted: a ten-million-element list for a scalar
    or a short waveform is refused at the cost of its length, not of its elements."""
    native = metadata.get("native_type", "float")
    count = int(metadata.get("count", 1) or 1)
    if native == "enum":
        return _coerce_enum(value, metadata.get("enum_strs") or [])
    if native == "string":
        if count > 1 and isinstance(value, (list, tuple, np.ndarray)):  # a waveform of strings
            items = value.reshape(-1) if isinstance(value, np.ndarray) else value
            if len(items) > count:
                raise BadValueError(f"more than {count} strings do not fit in {count}")
            return [_coerce_string(item) for item in items]
        return _coerce_string(_single(value) if isinstance(value, (list, tuple, np.ndarray)) else value)
    if native == "char" and isinstance(value, (str, bytes)):
        if len(value) > count:  # a character is at least a byte: no need to encode to know
            raise BadValueError(f"{len(value)} characters do not fit in {count}")
        data = value.encode() if isinstance(value, str) else value
        if len(data) > count:
            raise BadValueError(f"{len(data)} bytes do not fit in {count} characters")
        if len(data) < count:
            data += b"\0"  # ended as pyepics and caput -S end it, where it fits
        return np.frombuffer(data, dtype=np.uint8).copy()
    integer = native in ("int", "char")
    bits = int(metadata.get("native_bits") or (32 if integer else 64))
    bounds = (0, 255) if native == "char" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    largest = _FLOAT32_MAX if not integer and bits == 32 else math.inf
    if count == 1:
        return _fits(_coerce_number(_single(value), integer, bounds), largest)
    if not isinstance(value, (list, tuple, np.ndarray)):
        value = [value]  # a scalar is a one-element array
    if isinstance(value, np.ndarray) and value.size > count:
        raise BadValueError(f"{value.size} elements do not fit in {count}")
    if isinstance(value, (list, tuple)) and _elements_up_to(value, count) > count:
        raise BadValueError(f"more than {count} elements do not fit in {count}")
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return _fits(_coerce_numbers(value.reshape(-1), integer, bounds), largest)
    try:
        elements = np.asarray(value, dtype=object).reshape(-1)
    except (ValueError, TypeError):  # nested sequences numpy cannot even hold as objects
        raise BadValueError("nested sequences of different lengths are not an array") from None
    items = [_coerce_number(v, integer, bounds) for v in elements]
    return _fits(np.asarray(items, dtype=np.int64 if integer else np.float64), largest)


def _fits(value: Any, largest: float) -> Any:
    """``value`` (a float or an array of them) if no finite number in it is beyond
    ``largest`` (a FLOAT PV's: float32 would make it infinite), else ``BadValueError``."""
    if largest == math.inf:
        return value
    if isinstance(value, np.ndarray):
        finite = value[np.isfinite(value)]
        if finite.size and np.abs(finite).max() > largest:
            raise BadValueError(f"the array holds values beyond a float32's {largest:g}")
    elif math.isfinite(value) and abs(value) > largest:
        raise BadValueError(f"{_short(value)} is beyond a float32's {largest:g}")
    return value


def _single(value: Any) -> Any:
    """The one element of a one-element list or array (what a scalar PV takes as its value),
    a ``BadValueError`` for a list or array of any other size, anything else unchanged."""
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (list, tuple, np.ndarray)):
        raise BadValueError(f"{np.size(value) if isinstance(value, np.ndarray) else len(value)} "
                            f"elements do not fit in one")
    return value


def _elements_up_to(value: list | tuple, limit: int) -> int:
    """How many leaf elements nested ``value`` holds, counting no further than ``limit + 1``
    (by a loop: nesting depth costs no recursion)."""
    found = 0
    stack: list = [value]
    while stack:
        for item in stack.pop():
            if isinstance(item, (list, tuple)):
                stack.append(item)
                continue
            found += item.size if isinstance(item, np.ndarray) else 1
            if found > limit:
                return found
    return found


def _coerce_numbers(array: np.ndarray, integer: bool, bounds: tuple[int, int]) -> np.ndarray:
    """A numeric 1-D array as the PV's type: checked and converted as a whole, not per element."""
    if not integer:
        return array.astype(np.float64)
    if array.size:
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise BadValueError("the array holds values that are not finite")
            array = np.trunc(array)  # Rule 3
        low, high = array.min(), array.max()
        if low < bounds[0] or high > bounds[1]:
            raise BadValueError(f"the array holds values outside {bounds[0]}..{bounds[1]}")
    return array.astype(np.int64)


def _coerce_number(value: Any, integer: bool, bounds: tuple[int, int] = (-(2**31), 2**31 - 1)) -> int | float:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = decoded(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_NUMBER_TEXT:
            raise BadValueError(f"{len(text)} characters are too many for a number")
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise BadValueError(f"{value!r} is not a number") from None
        if isinstance(value, float) and math.isinf(value) and "inf" not in text.lower():
            raise BadValueError(f"{text!r} is too large for a float")  # "1e999" is no infinity
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, float)):
        raise BadValueError(f"a {type(value).__name__} is not a number")
    if integer:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise BadValueError(f"{value!r} is not a number an integer PV can take")
            value = int(value)  # toward zero (Rule 3)
        if not bounds[0] <= value <= bounds[1]:
            raise BadValueError(f"{_short(value)} is outside {bounds[0]}..{bounds[1]}")
        return value
    try:
        return float(value)
    except OverflowError:
        raise BadValueError(f"{_short(value)} is too large for a float") from None


_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Longer than any number written out ("-1.2345678901234567e-308" is 24): refused unread.
_MAX_NUMBER_TEXT = 100


def _short(number: int | float) -> str:
    """``number`` for an error message: Python refuses to write out an int of more than
    4,300 digits (ValueError), and a message needs none of them."""
    return repr(number) if not isinstance(number, int) or abs(number) < 10**100 else "a number of over 100 digits"


def _coerce_enum(value: Any, enum_strs: list[str]) -> int:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = decoded(value)
    if isinstance(value, str):
        if value in enum_strs:
            return enum_strs.index(value)
        if len(value) > _MAX_NUMBER_TEXT:
            raise BadValueError(f"a label of {len(value)} characters is not one of {enum_strs}")
        try:
            value = int(value)
        except ValueError:
            raise BadValueError(f"{value!r} is not one of {enum_strs}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValueError(f"an enum takes a label or an index, not a {type(value).__name__}")
    # Every enum record has two states at least: a ``bo`` whose ONAM is empty reports one
    # label (EPICS counts labels up to the last one set), and its state 1 is still a state.
    if not 0 <= value < max(len(enum_strs), 2):
        raise BadValueError(f"index {value} is out of range for {enum_strs}")
    return value


def _coerce_string(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bytes)) and len(value) > MAX_STRING_BYTES:  # unread: too long
        raise BadValueError(f"strings hold at most {MAX_STRING_BYTES} bytes")
    if isinstance(value, bytes):
        value = decoded(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) >= 10**MAX_STRING_BYTES:  # too long written out
            raise BadValueError(f"strings hold at most {MAX_STRING_BYTES} bytes")
        value = str(value)
    if not isinstance(value, str):
        raise BadValueError(f"a string PV takes text, not a {type(value).__name__}")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate, from code that built the str by hand
        raise BadValueError("the text holds something that is not a character") from None
    if size > MAX_STRING_BYTES:
        raise BadValueError(f"strings hold at most {MAX_STRING_BYTES} bytes")
    return value
