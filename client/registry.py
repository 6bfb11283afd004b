"""The process's hubs: one connection per daemon address and keys, shared by every Signal,
PV and device of the process.

Rule 1: ``get_hub`` gives the same ``Hub`` for the same address and CURVE keys (curve.py
Rule 1) for as long as it is open; a hub closed since is replaced by a new one at the next ask, so
no caller is handed a connection that will never connect again.
Rule 2: every hub of the process is closed at interpreter exit, so that its I/O thread ends
and nothing it was asked is left waiting.
"""

from __future__ import annotations

import atexit
import os
import threading

from pvhub.client.curve import key_paths
from pvhub.client.hub import Hub, default_address

_hubs: dict[tuple[str, str | None, str | None], Hub] = {}
_hubs_lock = threading.Lock()


def get_hub(address: str | None = None, *, client_key: str | os.PathLike[str] | None = None,
            server_key: str | os.PathLike[str] | None = None) -> Hub:
    """The process's shared connection to the daemon at ``address`` ($PVHUB_ADDRESS), with
    the CURVE keys of ``Hub`` (curve.py Rule 1): one per address and keys (Rule 1)."""
    address = address or default_address()
    client, server = key_paths(client_key, server_key)
    with _hubs_lock:
        hub = _hubs.get((address, client, server))
        if hub is None or hub.closed:
            hub = _hubs[(address, client, server)] = Hub(address, client_key=client, server_key=server)
        return hub


def close_hubs() -> None:
    """Close every hub of this process (tests, and interpreter exit)."""
    with _hubs_lock:
        hubs = list(_hubs.values())
        _hubs.clear()
    for hub in hubs:
        hub.close()


atexit.register(close_hubs)  # Rule 2
