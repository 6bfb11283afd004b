"""What a request costs the daemon while many other clients are connected.

    python bench/many_clients.py [CLIENTS ...]     # default: 0 300 1000; about 20 s each

For each count, a daemon of its own (no IOC: a ping needs none) gets that many quiet
clients, each a DEALER that said hello and then pings once a second, as the client library
does. One more client then pings as fast as answers come. Printed per count: that client's
median and p90 round trip, and the daemon's CPU per ping (from ``/proc``, over the whole
measurement, the quiet clients' heartbeats included, so divided by all pings answered).
A daemon whose loop costs O(clients) per message shows it here as CPU per ping growing
with the count.
"""

from __future__ import annotations

import statistics
import sys
import time

import zmq

import procstat
from pvhub import protocol as p
from pvhub.testing import DaemonProcess

MEASURE_S = 8.0


def hello(sock: zmq.Socket, name: str) -> None:
    sock.send(p.encode(p.HelloRequest(id=1, client=name)))


def main(counts: list[int]) -> None:
    for count in counts:
        with DaemonProcess(args=("--log-level", "warning")) as daemon:
            ctx = zmq.Context()
            quiet = []
            for i in range(count):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(daemon.address)
                hello(sock, f"quiet{i}")
                quiet.append(sock)
            prober = ctx.socket(zmq.DEALER)
            prober.setsockopt(zmq.LINGER, 0)
            prober.connect(daemon.address)
            hello(prober, "prober")
            if not prober.poll(10_000):
                raise TimeoutError("the daemon did not answer hello")
            prober.recv()
            for sock in quiet:  # every quiet client is known before measuring
                if not sock.poll(10_000):
                    raise TimeoutError("a quiet client got no hello answer")
                sock.recv()
            times: list[float] = []
            pings = 0
            next_beat = time.monotonic()
            cpu0 = procstat.cpu_seconds([daemon.pid])
            end = time.monotonic() + MEASURE_S
            request_id = 1
            while time.monotonic() < end:
                if time.monotonic() >= next_beat:  # each quiet client's heartbeat, once a second
                    for sock in quiet:
                        sock.send(p.encode(p.PingRequest(id=2)))
                        pings += 1
                    next_beat += p.CLIENT_HEARTBEAT_S
                request_id += 1
                started = time.perf_counter()
                prober.send(p.encode(p.PingRequest(id=request_id)))
                while True:
                    if not prober.poll(5_000):
                        raise TimeoutError("no pong within 5 s")
                    if getattr(p.decode(prober.recv()), "id", None) == request_id:
                        break
                times.append(time.perf_counter() - started)
                pings += 1
                for sock in quiet:  # drop their pongs
                    while sock.poll(0):
                        sock.recv()
            cpu = procstat.cpu_seconds([daemon.pid]) - cpu0
            times.sort()
            print(f"{count:5d} quiet clients: ping median {statistics.median(times) * 1e6:6.0f} µs, "
                  f"p90 {times[int(len(times) * 0.9)] * 1e6:6.0f} µs; daemon CPU per ping "
                  f"{cpu / pings * 1e6:5.0f} µs ({pings} pings)", flush=True)
            ctx.destroy(linger=0)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [0, 300, 1000])
