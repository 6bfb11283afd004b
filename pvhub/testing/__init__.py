"""The harness for tests, benchmarks and ``pvhub demo``: simulated IOCs and ``pvhub serve``
processes started by another program. The daemon, its actors and the client library never
import it.

Rule 1: everything started here listens on loopback only, on ports picked at run time
(``ioc`` Rule 1), so that parallel runs never meet each other and nothing reaches the site
network.
Rule 2: nothing started here outlives its ``stop()`` (``ioc`` Rule 4, ``daemon`` Rule 4).
"""

from pvhub.testing.daemon import DaemonProcess, NotifySocket
from pvhub.testing.ioc import LOOPBACK, SimulatedIOC, ca_read, free_tcp_port, free_udp_port, merge_ca_env

__all__ = [
    "LOOPBACK",
    "DaemonProcess",
    "NotifySocket",
    "SimulatedIOC",
    "ca_read",
    "free_tcp_port",
    "free_udp_port",
    "merge_ca_env",
]
