"""ophyd-async Signals served by a pvhub daemon: ``pvhub_signal_r/rw/w/x``.

    from pvhub.client.ophyd_async import pvhub_signal_r, pvhub_signal_rw
    # was: from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

Rule 1: a Signal built here behaves as one built by ``epics_signal_*`` over Channel Access
(ophyd-async's ``CaSignalBackend``), apart from its source. ``make_converter`` takes the
datatype rules of ophyd-async's own ``make_converter``, case by case and with the same error
texts, from the PV's metadata as its actor reports it (``native_type`` and ``count``) instead
of from a DBR type; ``signal_metadata`` and ``make_reading`` are its DataKey and Reading rules.
These three are pure: no sockets, no event loop.
Rule 2: the backend is native asyncio: nothing on the event loop blocks. Requests are the
hub's ``Future``s, awaited through ``asyncio.wrap_future``; channel events arrive on the hub's
I/O thread, where they are only handed to the loop with ``call_soon_threadsafe``.
Rule 3: ``get_value``, ``get_reading``, ``get_datakey`` and ``get_setpoint`` ask the PV's
actor for a snapshot (one round trip), as the Channel Access backend does a ``caget``. A
monitor (``set_callback``) is fed by the PV's channel, which the hub keeps current; its first
call is the latest reading, as a Channel Access monitor's is, and no call goes back in time:
a reading older (by its EPICS timestamp) than one already delivered is dropped, as happens
when a put's read-back overtook the IOC's own monitor of an earlier value and the actor then
publishes that monitor too. A put that waited for completion
returns only once the value read back after it has reached the channel, so every read after
it, cached or not, sees that value (Channel Access promises this only when the IOC sends its
monitor update before the put's completion; caproto's IOCs do not always).
Rule 4: a source is ``pvhub://PV``; everything else in a DataKey is what the Channel Access
backend gives for the same PV.
"""

from __future__ import annotations

import asyncio
import math
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from math import isnan, nan
from typing import Any, Generic

import numpy as np
from bluesky.protocols import Reading
from event_model import DataKey, Limits, LimitsRange
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    Array1D,
    Callback,
    NotConnectedError,
    SignalDatatypeT,
    SignalMetadata,
    SignalR,
    SignalRW,
    SignalW,
    SignalX,
    get_enum_cls,
    get_unique,
    make_datakey,
    wait_for_connection,
)
from ophyd_async.epics.core import EpicsOptions

# ophyd-async's own helpers, not copies, so that the datatype errors keep its words (Rule 1);
# they live in a private module (0.21). Importing ``ophyd_async.epics.core`` loads aioca's
# libca when aioca is installed, but opens no Channel Access context.
from ophyd_async.epics.core._util import EpicsSignalBackend, format_datatype, get_supported_values

from pvhub import protocol as p
from pvhub.client.channel import Channel
from pvhub.client.hub import Hub, get_hub
from pvhub.errors import ConnectionTimeoutError, DisconnectedError, HubUnavailableError, PvhubError
from pvhub.logs import library_logger

log = library_logger("pvhub.client")

SCHEME = "pvhub://"
# While a connect waits for its channel (which wakes it), how often it also looks for a
# refusal by the daemon (a PV its rules do not allow), which comes with no channel event.
_REFUSAL_POLL = 0.1

__all__ = [
    "PvhubSignalBackend",
    "install",
    "uninstall",
    "make_converter",
    "make_reading",
    "pvhub_signal_r",
    "pvhub_signal_rw",
    "pvhub_signal_w",
    "pvhub_signal_x",
    "signal_metadata",
]


# --- the pure core: datatypes, values, metadata (Rule 1) ------------------------------------


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
        return data.split(b"\0", 1)[0].decode(errors="replace")

    def write_value(self, value: Any) -> Any:
        return value + "\0"  # what the command line caput writes, as the CA backend does


class _IntFromFloatConverter(PvhubConverter[int]):
    def __init__(self) -> None:
        super().__init__(int)

    def value(self, raw: Any) -> int:
        return int(raw)


class _DisconnectedConverter(PvhubConverter[Any]):
    def __getattribute__(self, name: str) -> Any:
        raise NotImplementedError("No PV has been set as connect() has not been called")


def _label(raw: Any, choices: Sequence[str]) -> str:
    if isinstance(raw, str):
        return raw
    index = int(raw)
    return choices[index] if 0 <= index < len(choices) else str(index)


# Each native kind, scalar and array, and the datatype Channel Access infers for it. Arrays of
# numbers take their element type from the value itself (Rule 1: pvhub's "int" and "float"
# name both DBR widths).
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


# --- the backend (Rule 2) ---------------------------------------------------------------


class PvhubSignalBackend(EpicsSignalBackend[SignalDatatypeT]):
    """A Signal's backend whose PVs are served by a pvhub daemon (``$PVHUB_ADDRESS``)."""

    def __init__(
        self,
        datatype: type[SignalDatatypeT] | None,
        read_pv: str = "",
        write_pv: str = "",
        options: EpicsOptions | None = None,
        *,
        address: str | None = None,
        hub: Hub | None = None,
    ) -> None:
        self.converter: PvhubConverter = _DisconnectedConverter(float)
        self.initial_values: dict[str, Any] = {}
        self._address = address
        self._hub = hub
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening: set[Channel] = set()  # channels that call _on_channel
        self._wakers: dict[str, asyncio.Event] = {}
        self._callback: Callback[Reading[SignalDatatypeT]] | None = None
        self._generation = 0  # which set_callback a queued reading belongs to
        self._newest = -math.inf  # the EPICS time of the newest reading the callback got
        super().__init__(datatype, _strip_scheme(read_pv), _strip_scheme(write_pv), options)

    def source(self, name: str, read: bool) -> str:
        return f"{SCHEME}{self.read_pv if read else self.write_pv}"

    @property
    def hub(self) -> Hub:
        """The hub given, or the process's shared one for the address (a new one after
        ``close_hubs``)."""
        return self._hub if self._hub is not None else get_hub(self._address)

    # --- connecting ---------------------------------------------------------------------

    async def connect(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        if self.read_pv != self.write_pv:
            await wait_for_connection(
                read_pv=self._connect_pv(self.read_pv, timeout),
                write_pv=self._connect_pv(self.write_pv, timeout),
            )
        else:
            await self._connect_pv(self.read_pv, timeout)
        self.converter = make_converter(self.datatype, self.initial_values)

    async def _connect_pv(self, pv: str, timeout: float) -> None:
        channel = self.hub.channel(pv)
        if channel not in self._listening:
            self._listening.add(channel)
            channel.add_listener(self._on_channel)
        try:
            await self._until_ready(channel, timeout)
            snapshot = await self._snapshot(pv)
        except (PvhubError, TimeoutError) as exc:
            log.debug("signal_not_connected", pv=pv, error=str(exc))
            raise NotConnectedError(f"{SCHEME}{pv}") from exc
        finally:
            self._wakers.pop(pv, None)  # connected or not, nobody waits for its events now
        self.initial_values[pv] = (snapshot.metadata or {}, snapshot.reading.value)  # type: ignore[union-attr]

    async def _until_ready(self, channel: Channel, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waker = self._wakers.setdefault(channel.pv, asyncio.Event())
        while not channel.ready:
            if channel.error is not None:
                raise channel.error
            remaining = deadline - loop.time()
            if remaining <= 0:
                try:
                    self.hub.wait_for_hello(0)
                except HubUnavailableError as exc:
                    raise ConnectionTimeoutError(
                        f"{channel.pv}: the pvhub daemon at {self.hub.address} did not answer within {timeout} s"
                    ) from exc
                raise ConnectionTimeoutError(f"{channel.pv} could not connect within {timeout} s")
            waker.clear()
            try:
                await asyncio.wait_for(waker.wait(), min(remaining, _REFUSAL_POLL))
            except TimeoutError:
                pass

    # --- reading ------------------------------------------------------------------------

    async def _snapshot(self, pv: str) -> p.Snapshot:
        future = self.hub.request(lambda rid: p.ReadRequest(id=rid, pv=pv))
        snapshot = await asyncio.wrap_future(future)
        if not snapshot.connected or snapshot.reading is None:
            raise DisconnectedError(f"{pv} is not connected")
        return snapshot

    async def get_datakey(self, source: str) -> DataKey:
        snapshot = await self._snapshot(self.read_pv)
        metadata = signal_metadata(self.datatype, snapshot.metadata or {}, self.converter.metadata)
        value = self.converter.value(snapshot.reading.value)  # type: ignore[union-attr]
        return make_datakey(self.converter.datatype, value, source, metadata)

    async def get_reading(self) -> Reading[SignalDatatypeT]:
        snapshot = await self._snapshot(self.read_pv)
        return make_reading(self.converter, snapshot.reading)  # type: ignore[arg-type]

    async def get_value(self) -> SignalDatatypeT:
        snapshot = await self._snapshot(self.read_pv)
        return self.converter.value(snapshot.reading.value)  # type: ignore[union-attr]

    async def get_setpoint(self) -> SignalDatatypeT:
        snapshot = await self._snapshot(self.write_pv)
        return self.converter.value(snapshot.reading.value)  # type: ignore[union-attr]

    # --- writing ------------------------------------------------------------------------

    async def put(self, value: SignalDatatypeT | None) -> None:
        if value is None:
            write_value = self.initial_values[self.write_pv][1]
        else:
            write_value = self.converter.write_value(value)
        wait = self.options.wait(value) if callable(self.options.wait) else self.options.wait

        channel = self.hub.channel(self.write_pv)

        def last_reply(message: p.Message) -> bool:
            """On the I/O thread: which reply ends the put."""
            if isinstance(message, p.SetAccepted):
                # Without wait, the put is done once the IOC has it; what comes after is not
                # waited for, as with a Channel Access put without callback.
                return not wait
            if isinstance(message, p.SetDone) and message.reading is not None:
                # Read-your-writes: the read-back reaches the channel (and so a monitor, and
                # ophyd-async's cache) before the put returns, whichever socket is faster.
                channel.apply(message.epoch, message.seq, True, message.reading, None, from_stream=False)
            return isinstance(message, (p.SetDone, p.ErrorReply))

        future = self.hub.request(
            lambda rid: p.SetRequest(id=rid, pv=self.write_pv, value=write_value), last_reply
        )
        try:
            await asyncio.wrap_future(future)
        except PvhubError as exc:
            valid_choices = self.converter.metadata.get("choices")
            if valid_choices and value not in valid_choices:
                raise ValueError(
                    f"{value} is not a valid choice for {self.write_pv}, valid choices: {valid_choices}"
                ) from exc
            raise

    # --- monitoring ---------------------------------------------------------------------

    def set_callback(self, callback: Callback[Reading[SignalDatatypeT]] | None) -> None:
        if callback and self._callback:
            raise RuntimeError("Cannot set a callback when one is already set")
        channel = self.hub.channel(self.read_pv)
        try:  # the loop that asks (the RunEngine's, say), if not the one that connected
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # asked from a thread with no loop: the loop that connected gets the calls
        loop = self._loop
        with channel.cond:
            # Under the channel's lock, so that no update the I/O thread queues can overtake
            # the first call, nor be lost between the two.
            self._generation += 1
            self._callback = callback
            self._newest = -math.inf
            if callback and loop is not None and channel.connected and channel.reading is not None:
                loop.call_soon_threadsafe(self._deliver, self._generation, channel.reading)

    def _deliver(self, generation: int, reading: p.Reading) -> None:
        """On the event loop: one reading to the callback, if it is still the one set."""
        callback = self._callback
        if callback is None or generation != self._generation:
            return
        if reading.timestamp < self._newest:
            log.debug("stale_reading_dropped", pv=self.read_pv, timestamp=reading.timestamp, newest=self._newest)
            return
        self._newest = reading.timestamp
        try:
            callback(make_reading(self.converter, reading))
        except Exception:
            log.exception("signal_callback_failed", pv=self.read_pv, callback=repr(callback))

    def _forget_newest(self, generation: int) -> None:
        if generation == self._generation:
            self._newest = -math.inf

    def _on_channel(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        """On the hub's I/O thread, under ``channel.cond``: hand the event to the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            if kind == "value" and channel.pv == self.read_pv and self._callback is not None:
                loop.call_soon_threadsafe(self._deliver, self._generation, channel.reading)
            elif kind == "meta" and channel.pv == self.read_pv and not channel.connected:
                # What comes after a reconnection is new, whatever its time says.
                loop.call_soon_threadsafe(self._forget_newest, self._generation)
            waker = self._wakers.get(channel.pv)  # only while a connect waits
            if waker is not None:
                loop.call_soon_threadsafe(waker.set)
        except RuntimeError as exc:  # the loop was closed: nobody is left to tell
            log.debug("signal_event_dropped", pv=channel.pv, kind=kind, error=str(exc))


def _strip_scheme(pv: str) -> str:
    """The PV name in ``pv``: a ``pvhub://`` or ``ca://`` prefix (as a device written for
    ``epics_signal_*`` may carry) is dropped; pvhub serves no PV Access."""
    scheme, sep, name = pv.partition("://")
    if not sep:
        return pv
    if f"{scheme}://" in (SCHEME, "ca://"):
        return name
    raise ValueError(f"{pv}: pvhub serves Channel Access PVs (pvhub:// or ca://), not {scheme}://")


# --- the factories: ``epics_signal_*``'s signatures ----------------------------------------


def pvhub_signal_rw(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    write_pv: str | None = None,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
    *,
    address: str | None = None,
) -> SignalRW[SignalDatatypeT]:
    """A ``SignalRW`` backed by 1 or 2 PVs served by pvhub (``epics_signal_rw``'s twin).

    :param datatype: Check that the PV is of this type
    :param read_pv: The PV to read and monitor
    :param write_pv: If given, use this PV to write to, otherwise use read_pv
    :param name: The name of the signal (defaults to empty string)
    :param timeout: A timeout to be used when reading (not connecting) this signal
    :param address: The daemon (default: ``$PVHUB_ADDRESS``)
    """
    backend = PvhubSignalBackend(
        datatype, read_pv, write_pv or read_pv, EpicsOptions(wait=wait), address=address
    )
    return SignalRW(backend, name=name, timeout=timeout, attempts=attempts)


def pvhub_signal_r(
    datatype: type[SignalDatatypeT],
    read_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    *,
    address: str | None = None,
) -> SignalR[SignalDatatypeT]:
    """A ``SignalR`` backed by 1 PV served by pvhub (``epics_signal_r``'s twin)."""
    backend = PvhubSignalBackend(datatype, read_pv, read_pv, address=address)
    return SignalR(backend, name=name, timeout=timeout)


def pvhub_signal_w(
    datatype: type[SignalDatatypeT],
    write_pv: str,
    name: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 1,
    wait: bool | Callable[[SignalDatatypeT], bool] = True,
    *,
    address: str | None = None,
) -> SignalW[SignalDatatypeT]:
    """A ``SignalW`` backed by 1 PV served by pvhub (``epics_signal_w``'s twin)."""
    backend = PvhubSignalBackend(
        datatype, write_pv, write_pv, EpicsOptions(wait=wait), address=address
    )
    return SignalW(backend, name=name, timeout=timeout, attempts=attempts)


def pvhub_signal_x(
    write_pv: str, name: str = "", timeout: float = DEFAULT_TIMEOUT, *, address: str | None = None
) -> SignalX:
    """A ``SignalX`` whose trigger puts the PV's value at connection back (``epics_signal_x``'s
    twin; ophyd-async deprecates both for ``TriggerableCommand``)."""
    backend = PvhubSignalBackend(None, write_pv, write_pv, address=address)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return SignalX(backend, name=name, timeout=timeout)


# --- devices that make their own Signals ------------------------------------------------------

_replaced: dict[str, Any] = {}


def install() -> None:
    """Serve ophyd-async's Channel Access Signals through pvhub, made after this call.

    ophyd-async's own devices (``ophyd_async.epics.motor.Motor``, areaDetector drivers) and
    declarative ``EpicsDevice``s make their Signals with ``epics_signal_*`` inside the
    library, where no import line can be changed. Those calls pick their backend by
    protocol through the module ``ophyd_async.epics.core._signal`` (0.21); this puts
    ``PvhubSignalBackend`` there in place of ``CaSignalBackend``, and makes Channel Access
    the protocol of PVs named without one. ``pva://`` PVs and triggerable commands are left
    as they are. ``uninstall()`` puts ophyd-async's own back.
    """
    from ophyd_async.epics.core import _signal as epics_signal

    if _replaced:
        return
    _replaced.update(CaSignalBackend=epics_signal.CaSignalBackend,
                     _default_epics_protocol=epics_signal._default_epics_protocol)
    epics_signal.CaSignalBackend = PvhubSignalBackend
    epics_signal._default_epics_protocol = epics_signal.EpicsProtocol.CA


def uninstall() -> None:
    """Undo ``install()`` for Signals made after this call."""
    from ophyd_async.epics.core import _signal as epics_signal

    for name, value in _replaced.items():
        setattr(epics_signal, name, value)
    _replaced.clear()
