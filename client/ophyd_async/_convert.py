"""The pure core of pvhub's ophyd-async backend: datatypes, values and metadata.

Rule 1: a Signal on pvhub has the type, values and DataKey that ophyd-async's Channel Access
backend (``CaSignalBackend``) gives for the same PV. ``make_converter`` takes the datatype
rules of ophyd-async's own ``make_converter`` case by case, with the same error texts, from
the PV's metadata as its actor reports it (``native_type`` and ``count``) instead of from a
DBR type; ``signal_metadata`` and ``make_reading`` are its DataKey and Reading rules.
Rule 2: nothing here does I/O: no sockets, no event loop, no hub; the backend feeds it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from math import isnan, nan
from typing import Any, Generic

import numpy as np
from bluesky.protocols import Reading
from event_model import Limits, LimitsRange
from ophyd_async.core import Array1D, SignalDatatypeT, SignalMetadata, get_enum_cls, get_unique

# ophyd-async's own helpers, not copies, so that the datatype errors keep its words (Rule 1);
# they live in a private module (0.21). Importing ``ophyd_async.epics.core`` loads aioca's
# libca when aioca is installed, but opens no Channel Access context.
from ophyd_async.epics.core._util import format_datatype, get_supported_values

from pvhub import protocol as p
from pvhub.text import decoded


class PvhubConverter(Generic[SignalDatatypeT]):
    """Turns a PV's values as pvhub delivers them into a Signal's datatype, and back."""

    def __init__(self, datatype: type[SignalDatatypeT], metadata: SignalMetadata | None = None) -> None:
        self.datatype = datatype
        self.metadata = metadata or SignalMetadata()

    def value(self, raw: Any) -> SignalDatatypeT:
        return raw

    def write_value(self, value: Any) -> Any:
        return value


class _ScalarConverter(PvhubConverter[Any]):
    """float, int or str: the builtin type, as Channel Access's ``+value`` gives it."""

    def value(self, raw: Any) -> Any:
        return self.datatype(raw)


class _EnumLabelConverter(PvhubConverter[str]):
    """An enum PV read as its label (no enum class asked for); pvhub delivers the index."""

    def __init__(self, choices: Sequence[str]) -> None:
        super().__init__(str, SignalMetadata(choices=list(choices)))
        self._choices = list(choices)

    def value(self, raw: Any) -> str:
        return _label(raw, self._choices)

    def write_value(self, value: Any) -> Any:
        return str(value)


class _EnumConverter(PvhubConverter[Any]):
    """An enum PV read as a ``StrictEnum``/``SubsetEnum``/``SupersetEnum`` member."""

    def __init__(self, choices: Sequence[str], supported_values: Mapping[str, Any]) -> None:
        super().__init__(str, SignalMetadata(choices=list(supported_values)))  # type: ignore[arg-type]
        self._choices = list(choices)
        self.supported_values = supported_values

    def value(self, raw: Any) -> Any:
        return self.supported_values[_label(raw, self._choices)]

    def write_value(self, value: Any) -> Any:
        return str(value)  # the label; a StrEnum member travels as the plain string


class _BoolConverter(PvhubConverter[bool]):
    def __init__(self) -> None:
        super().__init__(bool)

    def value(self, raw: Any) -> bool:
        return bool(raw)

    def write_value(self, value: Any) -> Any:
        return int(value)  # an enum PV takes an index, not True


class _ArrayConverter(PvhubConverter[np.ndarray]):
    def __init__(self, datatype: Any, dtype: np.dtype) -> None:
        super().__init__(datatype)
        self._dtype = dtype

    def value(self, raw: Any) -> np.ndarray:
        # pvhub sends one element as a scalar; Channel Access gives an array of one. A copy:
        # the reading is the channel's, and each caller gets an array of its own, as from CA.
        return np.array(np.atleast_1d(raw), dtype=self._dtype)


class _SequenceStrConverter(PvhubConverter[Sequence[str]]):
    def __init__(self, choices: Sequence[str] | None) -> None:
        super().__init__(Sequence[str])  # type: ignore[arg-type]
        self._choices = list(choices) if choices is not None else None

    def value(self, raw: Any) -> Sequence[str]:
        items = [raw] if isinstance(raw, (str, int, float)) else list(raw)
        if self._choices is not None:
            return [_label(v, self._choices) for v in items]
        return [str(v) for v in items]


class _LongStringConverter(PvhubConverter[str]):
    """A char waveform read as a string."""

    def __init__(self) -> None:
        super().__init__(str)

    def value(self, raw: Any) -> str:
        data = np.atleast_1d(np.asarray(raw)).astype(np.uint8).tobytes()
        return decoded(data)

    def write_value(self, value: Any) -> Any:
        return value + "\0"  # what the command line caput writes, as the CA backend does


class _IntFromFloatConverter(PvhubConverter[int]):
    def __init__(self) -> None:
        super().__init__(int)

    def value(self, raw: Any) -> int:
        return int(raw)


class DisconnectedConverter(PvhubConverter[Any]):
    def __getattribute__(self, name: str) -> Any:
        raise NotImplementedError("No PV has been set as connect() has not been called")


def _label(raw: Any, choices: Sequence[str]) -> str:
    if isinstance(raw, str):
        return raw
    index = int(raw)
    return choices[index] if 0 <= index < len(choices) else str(index)


# Each native kind, scalar and array, and the datatype Channel Access infers for it. Arrays of
# numbers take their element type from the value itself (pvhub's "int" and "float" name
# both DBR widths).
_SCALAR_DATATYPE: dict[str, type] = {"string": str, "int": int, "float": float, "enum": str, "char": int}
_DEFAULT_ARRAY_DTYPE = {"int": np.dtype(np.int32), "float": np.dtype(np.float64), "char": np.dtype(np.uint8)}


def _kind(metadata: p.PVMetadata) -> tuple[str, bool]:
    native = metadata.get("native_type") or "float"
    return native, int(metadata.get("count") or 1) > 1


def _array_dtype(native: str, value: Any) -> np.dtype:
    if native == "char":
        return np.dtype(np.uint8)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value.dtype.newbyteorder("=")
    return _DEFAULT_ARRAY_DTYPE[native]


def make_converter(
    datatype: type | None, snapshots: Mapping[str, tuple[p.PVMetadata, Any]]
) -> PvhubConverter:
    """The converter for ``datatype`` (None: infer it) on the PVs of ``snapshots``, each
    ``pv: (metadata, value)``; ``TypeError`` when they do not fit, in ophyd-async's words."""
    pv = list(snapshots)[0]
    native, is_array = get_unique(
        {k: _kind(md) for k, (md, _) in snapshots.items()}, "datatypes and element_count"
    )
    if datatype == typing.Sequence[str]:
        datatype = Sequence[str]
    metadata, value = snapshots[pv]
    if is_array:
        if native in ("string", "enum"):
            inferred: Any = Sequence[str]
            converter: PvhubConverter = _SequenceStrConverter(
                metadata.get("enum_strs") if native == "enum" else None
            )
        else:
            dtype = _array_dtype(native, value)
            inferred = Array1D[dtype.type]  # type: ignore[name-defined]
            converter = _ArrayConverter(inferred, dtype)
    else:
        inferred = _SCALAR_DATATYPE[native]
        converter = _ScalarConverter(inferred)
    if is_array and native == "char" and datatype is str:
        return _LongStringConverter()
    if not is_array and datatype is bool and native == "enum":
        choices = get_unique({k: len(md.get("enum_strs") or []) for k, (md, _) in snapshots.items()},
                             "number of choices")
        if choices != 2:
            raise TypeError(f"{pv} has {choices} choices, can't map to bool")
        return _BoolConverter()
    if not is_array and native in ("char", "int") and datatype is bool:
        # Channel Access allows CHAR and SHORT here, not LONG; pvhub's "int" names both.
        return _BoolConverter()
    if not is_array and native == "enum":
        pv_choices = get_unique(
            {k: tuple(md.get("enum_strs") or ()) for k, (md, _) in snapshots.items()}, "choices"
        )
        if enum_cls := get_enum_cls(datatype):
            return _EnumConverter(pv_choices, get_supported_values(pv, enum_cls, pv_choices))
        if datatype in (None, str):
            return _EnumLabelConverter(pv_choices)
    elif (
        inferred is float
        and datatype is int
        and get_unique({k: md.get("precision") for k, (md, _) in snapshots.items()}, "precision") == 0
    ):
        return _IntFromFloatConverter()
    elif datatype in (None, inferred):
        return converter
    if native == "enum":
        inferred = "str | SubsetEnum | StrictEnum"
    raise TypeError(
        f"{pv} with inferred datatype {format_datatype(inferred)}"
        f" cannot be coerced to {format_datatype(datatype)}"
    )


def _number(value: Any) -> float:
    """A limit as a number: NaN for none; a char PV's limits come as single bytes."""
    if value is None:
        return nan
    if isinstance(value, bytes):
        return int.from_bytes(value, "little") if len(value) == 1 else nan
    return value


def _limits(metadata: p.PVMetadata) -> Limits:
    def limits_range(limit: str) -> LimitsRange | None:
        low = _number(metadata.get(f"lower_{limit}_limit"))  # type: ignore[misc]
        high = _number(metadata.get(f"upper_{limit}_limit"))  # type: ignore[misc]
        if not (isnan(low) and isnan(high)) and not high == low == 0:
            return LimitsRange(low=None if isnan(low) else low, high=None if isnan(high) else high)
        return None

    limits = Limits()
    for name, key in (("alarm", "alarm"), ("ctrl", "control"), ("disp", "display"), ("warning", "warning")):
        if found := limits_range(name):
            limits[key] = found  # type: ignore[literal-required]
    return limits


def signal_metadata(
    datatype: type | None, metadata: p.PVMetadata, base: SignalMetadata
) -> SignalMetadata:
    """Units, precision and limits as the Channel Access backend reports them for a Signal
    asked for as ``datatype``; ``base`` is the converter's own (enum choices)."""
    out = base.copy()
    units = metadata.get("units")
    if units is not None and datatype not in (str, bool):
        out["units"] = units
    precision = metadata.get("precision")
    if precision is not None and not isnan(precision) and datatype is not int:
        out["precision"] = precision
    if (limits := _limits(metadata)) and datatype is not bool:
        out["limits"] = limits
    return out


def make_reading(converter: PvhubConverter, reading: p.Reading) -> Reading:
    return {
        "value": converter.value(reading.value),
        "timestamp": reading.timestamp,
        "alarm_severity": -1 if reading.severity > 2 else reading.severity,
    }
