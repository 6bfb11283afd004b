"""The zoo IOC (``tests/iocs/zoo.py``) with ``TCP_NODELAY`` on its client connections.

    python -m bench.zoo_nodelay --prefix zoo: --interfaces 127.0.0.1     # from the repository root

EPICS base's IOC server (rsrv, ``create_tcp_client`` in ``caservertask.c``) turns Nagle's
algorithm off on every client socket. caproto's asyncio server means to, through asyncio, but
asyncio only sets ``TCP_NODELAY`` on sockets whose ``proto`` is ``IPPROTO_TCP``, and caproto
creates its listening socket with ``proto=0``, so the sockets it accepts keep Nagle on. A
client that monitors a PV and also writes it then often waits for a delayed ACK (about 40 ms
on Linux) before the put's completion reaches it: the small WRITE_NOTIFY reply is held back
behind the unacknowledged monitor update that went just before it. A pvhub actor always
monitors the PV it writes, so it meets this on nearly every put.

``bench_core.py --ioc-nodelay`` runs this IOC instead of the zoo, to show what the numbers
are against an IOC that behaves like rsrv in this respect. Nothing else differs.
"""

from __future__ import annotations

import socket

import caproto.asyncio.server as server


async def _create_bound_tcp_socket(addr: str, port: int) -> socket.socket:
    """caproto's own (``caproto.asyncio.utils``), with ``IPPROTO_TCP`` as the protocol."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    sock.bind((addr, port))
    return sock


server._create_bound_tcp_socket = _create_bound_tcp_socket

if __name__ == "__main__":
    from tests.iocs.zoo import main

    main()
