"""A reading's value as an ophyd Signal hands it out, and as its ``describe`` names it.

Rule 1: a value handed out is never the channel's own array: a reading is shared by every
Signal and callback of its PV and never changes once made, so an array is copied first.
Rule 2: ``as_string`` gives ophyd's text, as it has it through pyepics: an enum's label, a
char waveform's text up to its first NUL (``pvhub.text``), a float at the PV's precision
(``float_text``), ``str()`` of another scalar, ``<array size=N, type=time_double>`` for another
array; a waveform of strings stays a list of them.
Rule 3: ``PLAIN`` are the types ``convert`` returns as they are without ``as_string``: a path
run per reading may skip the call for them.
Rule 4: ``data_key`` is what ophyd's ``EpicsSignalBase.describe`` gives for one Signal, with
its event-model dtype and shape (``data_type``, ``data_shape``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from pvhub import protocol as p
from pvhub.text import decoded

PLAIN = frozenset((int, float, bool, type(None)))  # Rule 3
# EPICS DBR type numbers by pvhub's native type: the plain type; +14 is its TIME_ form and
# +28 its CTRL_ form (db_access.h). Values of "int" and "float" travel as LONG and DOUBLE;
# a PV served as SHORT or FLOAT (``native_bits``) is still named so.
_DBR_NATIVE = {"string": 0, "int": 5, "float": 6, "enum": 3, "char": 4}
_DBR_NARROW = {("int", 16): 1, ("float", 32): 2}  # SHORT, FLOAT
_DBR_NAMES = {0: "string", 1: "short", 2: "float", 3: "enum", 4: "char", 5: "long", 6: "double"}
FORM_OFFSET = {"native": 0, "time": 14, "ctrl": 28}


def convert(value: Any, metadata: p.PVMetadata, as_string: bool) -> Any:
    """``value`` as a Signal gives it (Rules 1 and 2)."""
    if isinstance(value, np.ndarray):
        value = value.copy()
    if not as_string:
        return value
    kind = metadata.get("native_type")
    if kind == "enum":
        strs = metadata.get("enum_strs") or []
        return strs[value] if isinstance(value, int) and 0 <= value < len(strs) else str(value)
    if kind == "char" and isinstance(value, np.ndarray):
        return decoded(value.astype(np.uint8).tobytes())
    if isinstance(value, np.ndarray):
        return array_text(value.size, kind, metadata.get("native_bits"))
    if isinstance(value, list):
        return value
    if kind == "float" and isinstance(value, (float, int)):
        return float_text(value, metadata.get("precision"))
    return value if isinstance(value, str) else str(value)


def dbr_type(native: str | None, form: str, bits: int | None = None) -> int | None:
    """The DBR type number of a ``native`` pvhub type of ``bits`` read in ``form``: CA's SHORT
    and FLOAT are named as the IOC serves them, though their values travel as LONG and DOUBLE."""
    base = _DBR_NARROW.get((native, bits)) or _DBR_NATIVE.get(native or "")
    return None if base is None else base + FORM_OFFSET.get(form, 0)


def dbr_name(ftype: int | None) -> str:
    """pyepics' name for a DBR type number: ``"double"``, ``"time_enum"``, ``"ctrl_long"``..."""
    if ftype is None:
        return "unknown"
    form, base = divmod(ftype, 14)
    prefix = {0: "", 1: "time_", 2: "ctrl_"}.get(form, "")
    return prefix + _DBR_NAMES.get(base, "unknown")


def array_text(size: int, native: str | None, bits: int | None = None) -> str:
    """pyepics' text for an array it does not write out: ``<array size=16, type=time_double>``
    (``time_short`` or ``time_float`` for a PV of 16-bit integers or 32-bit floats)."""
    ftype = dbr_type(native, "time", bits)
    return f"<array size={size}, type={'time_unknown' if ftype is None else dbr_name(ftype)}>"


def float_text(value: Any, precision: Any) -> str:
    """A float as pyepics writes it at the PV's precision: ``%.Nf``, or ``%.Ng`` past 10^4
    either way; ``str()`` when the precision is unknown."""
    try:
        number = float(value)
        fmt = "%%.%dg" if 4 < abs(int(math.log10(abs(number + 1.0e-9)))) else "%%.%df"
        return (fmt % int(precision)) % number
    except (TypeError, ValueError, ArithmeticError):
        return str(value)


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


def data_key(source: str, value: Any, units: str | None, limits: tuple[Any, Any], precision: int | None,
             enum_strs: Iterable[str] | None) -> dict[str, Any]:
    """The data key ``describe`` gives for ``value`` (Rule 4)."""
    low, high = limits
    desc: dict[str, Any] = {
        "source": source,
        "dtype": data_type(value),
        "shape": data_shape(value),
        "units": units,
        "lower_ctrl_limit": low,
        "upper_ctrl_limit": high,
    }
    if precision is not None:
        desc["precision"] = precision
    if enum_strs is not None:
        desc["enum_strs"] = tuple(enum_strs)
    return desc
