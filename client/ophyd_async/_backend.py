"""``PvhubSignalBackend``: an ophyd-async Signal backend whose PVs a pvhub daemon serves.

Rule 1: native asyncio: nothing on the event loop blocks. Requests are the hub's ``Future``s,
awaited through ``asyncio.wrap_future``; channel events arrive on the hub's I/O thread, where
they are only handed to the loop with ``call_soon_threadsafe``.
Rule 2: ``get_value``, ``get_reading``, ``get_datakey`` and ``get_setpoint`` ask the PV's
actor for a snapshot (one round trip), as the Channel Access backend does a ``caget``. A
monitor (``set_callback``) is fed by the PV's channel, which the hub keeps current; its first
call is the latest reading, as a Channel Access monitor's is, and no call goes back in time:
a reading older (by its EPICS timestamp) than one already delivered is dropped, as happens
when a put's read-back overtook the IOC's own monitor of an earlier value and the actor then
publishes that monitor too.
Rule 3: a put that waited for completion returns only once the value read back after it has
reached the channel, so every read after it, cached or not, sees that value (Channel Access
promises this only when the IOC sends its monitor update before the put's completion;
caproto's IOCs do not always).
Rule 4: a source is ``pvhub://PV``; everything else in a DataKey is the Channel Access
backend's (``pvhub.client.ophyd_async._convert``).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import (
    Callback,
    NotConnectedError,
    SignalDatatypeT,
    make_datakey,
    wait_for_connection,
)
from ophyd_async.epics.core import EpicsOptions
from ophyd_async.epics.core._util import EpicsSignalBackend  # not exported by 0.21

from pvhub import protocol as p
from pvhub.client.channel import Channel
from pvhub.client.hub import Hub
from pvhub.client.registry import get_hub
from pvhub.client.ophyd_async._convert import (
    DisconnectedConverter,
    PvhubConverter,
    make_converter,
    make_reading,
    signal_metadata,
)
from pvhub.errors import ConnectionTimeoutError, DisconnectedError, HubUnavailableError, PvhubError
from pvhub.logs import library_logger

log = library_logger("pvhub.client")

SCHEME = "pvhub://"
# While a connect waits for its channel (which wakes it), how often it also looks for a
# refusal by the daemon (a PV its rules do not allow), which comes with no channel event.
_REFUSAL_POLL = 0.1


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
        self.converter: PvhubConverter = DisconnectedConverter(float)
        self.initial_values: dict[str, Any] = {}
        self._address = address
        self._hub = hub
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening: set[Channel] = set()  # channels that call _on_channel
        self._held: dict[str, Channel] = {}  # by PV: at most the read and the write PV
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

    def _channel(self, pv: str) -> Channel:
        """The channel of ``pv`` on the current hub, asked for once per hub and kept while
        this backend lives (hub.py Rule 7)."""
        hub = self.hub
        channel = self._held.get(pv)
        if channel is None or channel.hub is not hub:
            channel = self._held[pv] = hub.channel(pv, owner=self)
        return channel

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
        channel = self._channel(pv)
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
        future = self.hub.request(lambda rid: p.ReadRequest(id=rid, pv=pv, fresh=True))
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

        channel = self._channel(self.write_pv)

        def last_reply(message: p.Message) -> bool:
            """On the I/O thread: which reply ends the put."""
            if isinstance(message, p.SetAccepted):
                # Without wait, the put is done once the IOC has it; what comes after is not
                # waited for, as with a Channel Access put without callback.
                return not wait
            if isinstance(message, p.SetDone):
                # Read-your-writes: the read-back reaches the channel (and so a monitor, and
                # ophyd-async's cache) before the put returns, whichever socket is faster.
                channel.apply_reply(message)
            return isinstance(message, (p.SetDone, p.ErrorReply))

        # With wait, only the end is waited for: the acceptance is not asked for.
        future = self.hub.request(
            lambda rid: p.SetRequest(id=rid, pv=self.write_pv, value=write_value, accepted=not wait), last_reply
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
        channel = self._channel(self.read_pv)
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
