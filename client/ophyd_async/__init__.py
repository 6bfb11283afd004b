"""ophyd-async Signals served by a pvhub daemon: ``pvhub_signal_r/rw/w/x``.

    from pvhub.client.ophyd_async import pvhub_signal_r, pvhub_signal_rw
    # was: from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

``_convert`` is the pure core (datatypes, values, DataKeys, as ophyd-async's Channel Access
backend makes them), ``_backend`` the asyncio backend on the hub, ``_signals`` the factories
and ``install()``. docs/ophyd.md says what differs from Channel Access.
"""

from pvhub.client.ophyd_async._backend import SCHEME, PvhubSignalBackend
from pvhub.client.ophyd_async._convert import (
    PvhubConverter,
    make_converter,
    make_reading,
    signal_metadata,
)
from pvhub.client.ophyd_async._signals import (
    install,
    pvhub_signal_r,
    pvhub_signal_rw,
    pvhub_signal_w,
    pvhub_signal_x,
    uninstall,
)

__all__ = [
    "SCHEME",
    "PvhubConverter",
    "PvhubSignalBackend",
    "install",
    "make_converter",
    "make_reading",
    "pvhub_signal_r",
    "pvhub_signal_rw",
    "pvhub_signal_w",
    "pvhub_signal_x",
    "signal_metadata",
    "uninstall",
]
