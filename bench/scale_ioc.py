"""An IOC with many PVs, for ``bench/client_scale.py``.

    python -m bench.scale_ioc --prefix scale: --count 10000 --interfaces 127.0.0.1   # from the repository root

PVs, after the prefix:

- ``v0`` .. ``v{count-1}``: floats that never change (``v{i}`` holds ``i``), plain caproto
  channels rather than ``pvproperty``s, so that ten thousand of them start in a second or two.
- ``tick``: an int counting up at ``tick_rate`` Hz (0, the default, pauses it).
- ``tick_rate``: updates per second of ``tick``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from caproto import ChannelDouble
from caproto.server import PVGroup, ioc_arg_parser, pvproperty, run

# How often a paused ``tick`` looks at ``tick_rate`` again.
_PAUSED_POLL = 0.05


class TickIOC(PVGroup):
    """One PV that counts at a rate the client sets."""

    tick_rate = pvproperty(value=0.0, doc="Updates per second of tick; 0 pauses it")
    tick = pvproperty(value=0, doc="Counts up at tick_rate")

    @tick.startup
    async def tick(self, instance, async_lib):
        next_at = time.monotonic()
        while True:
            rate = self.tick_rate.value
            if rate <= 0:
                await asyncio.sleep(_PAUSED_POLL)
                next_at = time.monotonic()
                continue
            await instance.write(value=self.tick.value + 1)
            next_at = max(next_at + 1.0 / rate, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())


def main() -> None:
    counting = argparse.ArgumentParser(add_help=False)
    counting.add_argument("--count", type=int, default=1000)
    known, rest = counting.parse_known_args()
    # caproto's parser reads sys.argv whatever argv it is given.
    sys.argv[1:] = rest
    ioc_options, run_options = ioc_arg_parser(
        default_prefix="scale:", desc=__doc__.split("\n")[0], supported_async_libs=["asyncio"]
    )
    pvdb = TickIOC(**ioc_options).pvdb
    prefix = ioc_options["prefix"]
    pvdb.update({f"{prefix}v{i}": ChannelDouble(value=float(i)) for i in range(known.count)})
    run(pvdb, **run_options)


if __name__ == "__main__":
    main()
