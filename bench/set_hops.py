"""Where a set's time goes: round trips of a bare DEALER through a daemon to the zoo IOC.

    python bench/set_hops.py          # from the repository root; about 15 s

Each line is the median of 300 round trips (after 20 to warm up), each step one hop more
than the one before: a ping (the daemon only), a read from the actor's copy (daemon and
actor), a fresh read (one Channel Access round trip more), a set to its ``SetDone`` (put with
completion and its read-back), then ``EpicsSignal.set(v).wait()`` and ``get()`` through the
client library. Loopback only; the IOC and the daemon are this run's own.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from pathlib import Path

import zmq

from pvhub import protocol as p
from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC

REPO_ROOT = Path(__file__).absolute().parent.parent
ROUNDS = 300


def main() -> None:
    prefix = f"hops{uuid.uuid4().hex[:6]}:"
    with SimulatedIOC("tests.iocs.zoo", prefix=prefix, ready_pv="dt", cwd=REPO_ROOT) as ioc:
        with DaemonProcess(env=ioc.ca_env(), args=("--log-level", "warning")) as daemon:
            ctx = zmq.Context()
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(daemon.address)
            ids = iter(range(1, 10**9))

            def ask(build) -> p.Message:
                request_id = next(ids)
                dealer.send(p.encode(build(request_id)))
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if dealer.poll(1000):
                        message = p.decode(dealer.recv())
                        if getattr(message, "id", None) == request_id and isinstance(message, p.FINAL_REPLIES):
                            return message
                raise TimeoutError("no answer within 10 s")

            def median_of(name: str, step) -> None:
                for _ in range(20):
                    step()
                times = []
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - started)
                times.sort()
                print(f"{name:32s} median {statistics.median(times) * 1e6:7.0f} µs   p90 {times[int(ROUNDS * 0.9)] * 1e6:7.0f} µs")

            pv = prefix + "x"
            ask(lambda i: p.HelloRequest(id=i, client="set_hops"))
            deadline = time.monotonic() + 10
            while not ask(lambda i: p.ReadRequest(id=i, pv=pv)).connected:  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{pv} did not connect")
                time.sleep(0.05)
            value = [0.0]

            def next_value() -> float:
                value[0] += 1
                return value[0]

            median_of("ping (the daemon)", lambda: ask(lambda i: p.PingRequest(id=i)))
            median_of("read (the actor's copy)", lambda: ask(lambda i: p.ReadRequest(id=i, pv=pv)))
            median_of("read, fresh (one CA round trip)", lambda: ask(lambda i: p.ReadRequest(id=i, pv=pv, fresh=True)))
            median_of("set to SetDone", lambda: ask(lambda i: p.SetRequest(id=i, pv=pv, value=next_value())))
            os.environ["PVHUB_ADDRESS"] = daemon.address
            from pvhub.client import EpicsSignal, close_hubs

            signal = EpicsSignal(pv, name="x")
            signal.wait_for_connection(timeout=10)
            median_of("EpicsSignal.set(v).wait()", lambda: signal.set(next_value()).wait(timeout=10))
            median_of("EpicsSignal.get()", signal.get)
            close_hubs()
            ctx.destroy(linger=0)


if __name__ == "__main__":
    main()
