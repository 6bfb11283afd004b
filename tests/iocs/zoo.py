"""The zoo: one IOC with a PV of every kind pvhub must handle, for system tests.

Run it from the repository root (the module path is what ``SimulatedIOC`` launches)::

    python -m tests.iocs.zoo --prefix zoo: --interfaces 127.0.0.1

PVs, after the prefix:

- ``dt``, ``x``: caproto's random walk; ``x`` steps by up to +-1 every ``dt`` (3.0) seconds.
- ``motor``: float in mm, precision 3, control and display limits -10..10 (caproto itself
  refuses a put outside the control limits).
- ``count``: int, 0.
- ``wave``: float64 waveform of 16 elements, 0..15.
- ``empty``: float64 waveform of up to 16 elements, holding none.
- ``text``: DBR_STRING, "hello".
- ``mode``: enum Off / On / Auto, "Off".
- ``slow``: float whose put completes only after ``slow_delay`` (2.0) seconds.
- ``ro``: float that clients may read but not write.
- ``reject``: float whose putter fails for a negative value; the server answers the put with
  an ``ErrorResponse`` (ECA_PUTFAIL), which caproto's own threading and asyncio clients
  ignore: a waiting put there just times out.
- ``fast``: int counting up at ``fast_rate`` (500.0) Hz; a rate of 0 pauses it. Above about
  100 Hz caproto's server batches monitor updates, with up to 1 s of latency.
- ``fast_monitors``: read-only int, how many CA monitors clients hold on ``fast`` right now
  (shows whether a hub shares one upstream monitor among its clients).
- ``chars``: char waveform of up to 40 bytes, "abc" (ophyd's ``string=True`` case).
"""

from __future__ import annotations

import asyncio
import random
import time

from caproto import ChannelType
from caproto.server import PVGroup, ioc_arg_parser, pvproperty, run
from caproto.server.server import PvpropertyInteger

# How far behind its schedule ``fast`` may fall before it stops catching up: past this it
# restarts its schedule from now instead of sending a burst of back-to-back updates.
_MAX_FAST_LAG = 0.1
# How often a paused ``fast`` looks at ``fast_rate`` again.
_PAUSED_POLL = 0.05
BIG_LENGTH = 50_000
# How often ``fast_monitors`` counts again; a change reaches its monitors within this.
_MONITOR_COUNT_PERIOD = 0.05


class MonitoredInteger(PvpropertyInteger):
    """An integer PV that can say how many CA monitors clients hold on it.

    caproto shares one internal subscription among identical monitors and tells the PV only
    of the first, so the count comes from the server context's own table of every client's
    subscriptions, reached through the first monitor that arrives.
    """

    _server_context = None

    async def subscribe(self, queue, sub_spec, sub):
        self._server_context = sub.circuit.context
        await super().subscribe(queue, sub_spec, sub)

    def monitor_count(self) -> int:
        if self._server_context is None:
            return 0
        return sum(
            len(subscriptions)
            for spec, subscriptions in self._server_context.subscriptions.items()
            if spec.db_entry is self
        )


class ZooIOC(PVGroup):
    """A PV of every kind pvhub must handle: scalars, arrays, strings, enums, slow, failing,
    read-only and fast-updating PVs."""

    dt = pvproperty(value=3.0, doc="Seconds between steps of x")
    x = pvproperty(value=0.0, doc="A random walk")

    motor = pvproperty(
        value=0.0,
        units="mm",
        precision=3,
        lower_ctrl_limit=-10.0,
        upper_ctrl_limit=10.0,
        lower_disp_limit=-10.0,
        upper_disp_limit=10.0,
        doc="A position with units, precision and limits",
    )
    count = pvproperty(value=0, doc="A plain integer")
    wave = pvproperty(
        value=[float(i) for i in range(16)], max_length=16, doc="A float64 waveform"
    )
    empty = pvproperty(value=[], dtype=float, max_length=16, doc="A float64 waveform holding no element")
    big_rate = pvproperty(value=0.0, doc="Updates per second of big; 0 (the default) pauses it")
    big = pvproperty(
        value=[0.0] * BIG_LENGTH, max_length=BIG_LENGTH,
        doc="A large waveform whose first element counts updates (to fill slow clients' queues)",
    )
    text = pvproperty(value="hello", dtype=ChannelType.STRING, doc="A DBR_STRING")
    mode = pvproperty(
        value="Off",
        enum_strings=("Off", "On", "Auto"),
        dtype=ChannelType.ENUM,
        doc="An enum",
    )

    slow_delay = pvproperty(value=2.0, doc="Seconds a put to slow takes to complete")
    slow = pvproperty(value=0.0, doc="A put to this completes after slow_delay seconds")

    ro = pvproperty(value=1.5, read_only=True, doc="Clients may not write this")
    reject = pvproperty(value=0.0, doc="A negative put fails inside the IOC")

    fast_rate = pvproperty(value=500.0, doc="Updates per second of fast; 0 pauses it")
    fast = pvproperty(value=0, dtype=MonitoredInteger, doc="Counts up at fast_rate")
    fast_monitors = pvproperty(value=0, read_only=True, doc="CA monitors held on fast")

    chars = pvproperty(
        value="abc", max_length=40, string_encoding="latin-1", doc="A char waveform"
    )

    @x.startup
    async def x(self, instance, async_lib):
        """Step ``x`` every ``dt`` seconds, like caproto's random_walk example."""
        while True:
            await instance.write(value=self.x.value + 2.0 * random.random() - 1.0)
            await async_lib.sleep(self.dt.value)

    @slow.putter
    async def slow(self, instance, value):
        """Complete the put only after ``slow_delay``: a stand-in for a motor that moves."""
        await asyncio.sleep(self.slow_delay.value)
        return value

    @reject.putter
    async def reject(self, instance, value):
        """Fail negative values the way a device driver that refuses them would."""
        if value < 0:
            raise ValueError(f"reject takes no negative values, not {value}")
        return value

    @fast.startup
    async def fast(self, instance, async_lib):
        """Count at ``fast_rate`` Hz, sleeping to the next deadline so that the time spent
        writing does not slow the rate down."""
        next_at = time.monotonic()
        while True:
            rate = self.fast_rate.value
            if rate <= 0:
                await asyncio.sleep(_PAUSED_POLL)
                next_at = time.monotonic()
                continue
            await instance.write(value=self.fast.value + 1)
            next_at += 1.0 / rate
            now = time.monotonic()
            if next_at < now - _MAX_FAST_LAG:
                next_at = now
            await asyncio.sleep(max(0.0, next_at - now))

    @big.startup
    async def big(self, instance, async_lib):
        """Publish a new big array at ``big_rate`` Hz; element 0 counts them."""
        count = 0
        while True:
            rate = self.big_rate.value
            if rate <= 0:
                await asyncio.sleep(_PAUSED_POLL)
                continue
            count += 1
            await instance.write(value=[float(count)] * BIG_LENGTH)
            await asyncio.sleep(1.0 / rate)

    @fast_monitors.startup
    async def fast_monitors(self, instance, async_lib):
        """Publish the number of monitors on ``fast`` whenever it changes."""
        while True:
            count = self.fast.monitor_count()
            if count != instance.value:
                await instance.write(value=count)
            await async_lib.sleep(_MONITOR_COUNT_PERIOD)


def main() -> None:
    ioc_options, run_options = ioc_arg_parser(
        default_prefix="zoo:", desc=ZooIOC.__doc__, supported_async_libs=["asyncio"]
    )
    run(ZooIOC(**ioc_options).pvdb, **run_options)


if __name__ == "__main__":
    main()
