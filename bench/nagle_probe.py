"""Where a put's ~40 ms comes from: the actor's Channel Access sequence, and variations of it.

    python bench/nagle_probe.py [--puts N] [--rounds R] [--ioc zoo|nodelay|rsrv] [--only NAME ...]

Run it from the repository root. It starts a zoo IOC (``tests/iocs/zoo.py``, caproto's
asyncio server, whose client sockets keep Nagle's algorithm on) on loopback, or the zoo with
``TCP_NODELAY`` (``bench/zoo_nodelay.py``), or EPICS base's rsrv (``tests/iocs/rsrv.py``,
which sets ``TCP_NODELAY`` itself), then times
put-with-completion round trips on ``motor`` with caproto's threading client, outside pvhub,
in several variations of what a pvhub actor does:

- ``actor``: the actor's sequence as it was: a monitor (``data_type="time"``), a CTRL read on
  connect, ``PV.write.__wrapped__(notify=True)`` with a callback and, from that callback, a
  read-back ``PV.read.__wrapped__(data_type="time")``; done when the read-back arrives.
- ``no_monitor``, ``no_readback``, ``readback_plain`` (read-back with the native type),
  ``no_ctrl``: the same with one part left out or changed.
- ``two_circuits``: the monitor on one circuit (priority 0), put and read-back on another.
- ``quickack``: the actor's sequence, the client's socket told ``TCP_QUICKACK`` after every
  receive, so the kernel acknowledges at once instead of delaying.
- ``backend``: pvhub's own ``ChannelAccessBackend`` (``actors/backend.py``) as it is now,
  from ``put`` to its ``PutDoneEvent``.
- ``hub``: end to end, ``pvhub.client.EpicsSignal.set(v).wait()`` through ``pvhub serve``.

Each variation runs in a process of its own (so that no patch of caproto's classes leaks
into another) with a new circuit, and the variations take turns for ``--rounds`` rounds so
that a noisy moment of a shared machine does not land on one of them only. The table gives
the median, p99 and maximum, and how many puts took longer than 20 ms (a delayed ACK on
Linux takes 40 ms or more; nothing else in this loop takes that long on an idle machine).

What it shows against the zoo (strace of the client, ``-e trace=sendto,recvfrom``): the IOC
answers WRITE_NOTIFY at once, but holds the monitor update the write caused (Nagle: its
answer is not yet acknowledged). The read-back request acknowledges the answer, so the update
leaves; the read-back's reply is then held behind the update until the client's delayed ACK,
40 ms later. Without the read-back every other put pays it (the update is released by the
next put's request and holds that put's answer); without the monitor, or with the IOC on
``TCP_NODELAY``, or with the monitor on another circuit, or with ``TCP_QUICKACK`` after every
receive, none does. A monitor whose only callback is a lambda looks like no monitor at all:
caproto holds callbacks by weak reference and cancels a subscription left without any.

Rule 1: loopback only; the IOC and the daemon are this run's own, on ports picked at run time.
Rule 2: every wait has a deadline; every process started here is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from stats import Timing, duration, table

REPO_ROOT = Path(__file__).absolute().parent.parent
TIMEOUT = 5.0  # any single put round trip
SLOW = 0.020  # a put slower than this waited on something other than the IOC and the client

PLAIN = ("actor", "no_monitor", "no_readback", "readback_plain", "no_ctrl", "two_circuits", "quickack")
VARIATIONS = (*PLAIN, "backend", "hub")
IOCS = {  # --ioc: the module SimulatedIOC runs, and the PV whose read says it is ready
    "zoo": ("tests.iocs.zoo", "dt"),
    "nodelay": ("bench.zoo_nodelay", "dt"),
    "rsrv": ("tests.iocs.rsrv", "motor"),
}


def put_value(i: int) -> float:
    return 1.0 + (i % 50) * 0.1  # inside motor's limits, and a change on every put


# --- the child: one variation, one new circuit --------------------------------------------------


def _quickack_after_every_receipt() -> None:
    """Patch caproto's circuit manager: ``TCP_QUICKACK`` on its socket after every receive."""
    from caproto.threading import client as ca_client

    original = ca_client.VirtualCircuitManager.received

    def received(self: Any, bytes_recv: bytes, address: Any) -> Any:
        sock = self.socket
        if bytes_recv and sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        return original(self, bytes_recv, address)

    ca_client.VirtualCircuitManager.received = received


def plain_put(variation: str, pv_name: str) -> Callable[[int], None]:
    """One put as the actor does it, changed as ``variation`` says; returns ``put(i)``."""
    from caproto.threading import client as ca_client

    if variation == "quickack":
        _quickack_after_every_receipt()
    context = ca_client.Context()
    monitor = variation != "no_monitor"
    ctrl = variation != "no_ctrl"
    readback = variation != "no_readback"
    read_type = None if variation == "readback_plain" else "time"
    keep: list[Any] = [context]
    (pv,) = context.get_pvs(pv_name, timeout=None)
    pv.wait_for_connection(timeout=TIMEOUT)
    if ctrl:
        pv.read(data_type="control", timeout=TIMEOUT)
    if monitor:
        subscription = pv.subscribe(data_type="time")
        first = threading.Event()

        def on_monitor(sub: Any, response: Any) -> None:
            first.set()

        # caproto holds a subscription's callbacks by weak reference and cancels the monitor
        # when the last one is gone: a lambda here would be collected, and the IOC would stop
        # sending updates (so a quick try without this keeping finds no hump).
        subscription.add_callback(on_monitor)
        keep += [subscription, on_monitor]
        if not first.wait(TIMEOUT):
            raise TimeoutError(f"no monitor update of {pv_name} within {TIMEOUT} s")
    writer = pv
    if variation == "two_circuits":
        (writer,) = context.get_pvs(pv_name, priority=1, timeout=None)
        writer.wait_for_connection(timeout=TIMEOUT)
    done = threading.Event()

    def on_read(response: Any) -> None:
        done.set()

    def on_write(response: Any) -> None:
        if not readback:
            done.set()
            return
        ca_client.PV.read.__wrapped__(writer, wait=False, callback=on_read, data_type=read_type, timeout=None)

    def put(i: int) -> None:
        done.clear()
        ca_client.PV.write.__wrapped__(
            writer, put_value(i), wait=False, callback=on_write, timeout=None, notify=True
        )
        if not done.wait(TIMEOUT):
            raise TimeoutError(f"put {i} on {pv_name} did not complete within {TIMEOUT} s")

    keep += [pv, writer]
    put.keep = keep  # type: ignore[attr-defined]
    return put


def backend_put(pv_name: str) -> Callable[[int], None]:
    from pvhub.actors import backend as ca

    driver = ca.Driver()
    driver.backend.add(pv_name)
    driver.wait_for(lambda event: isinstance(event, ca.ReadingEvent), TIMEOUT)

    def put(i: int) -> None:
        driver.backend.put(pv_name, i, put_value(i))
        done = driver.wait_for(lambda event: isinstance(event, ca.PutDoneEvent), TIMEOUT)
        if done.error is not None:
            raise RuntimeError(done.error)

    put.keep = driver  # type: ignore[attr-defined]
    return put


def hub_put(pv_name: str, address: str) -> Callable[[int], None]:
    from pvhub.client import EpicsSignal

    signal = EpicsSignal(pv_name, name="motor", address=address)
    signal.wait_for_connection(timeout=TIMEOUT)

    def put(i: int) -> None:
        signal.set(put_value(i)).wait(timeout=TIMEOUT)

    put.keep = signal  # type: ignore[attr-defined]
    return put


def child(variation: str, pv_name: str, puts: int, warmup: int, address: str | None) -> int:
    if variation == "backend":
        put = backend_put(pv_name)
    elif variation == "hub":
        assert address is not None, "the hub variation needs --address"
        put = hub_put(pv_name, address)
    else:
        put = plain_put(variation, pv_name)
    for i in range(warmup):
        put(i)
    samples = []
    for i in range(warmup, warmup + puts):
        t0 = time.perf_counter()
        put(i)
        samples.append(time.perf_counter() - t0)
    json.dump(samples, sys.stdout)
    sys.stdout.flush()
    # Skip caproto's Context.disconnect (it joins threads, slowly); the IOC sees the circuit
    # close when the process ends.
    os._exit(0)


# --- the parent: the IOC, the daemon, the rounds, the table -------------------------------------


def run_variation(variation: str, pv_name: str, puts: int, env: dict[str, str], address: str | None) -> list[float]:
    command = [sys.executable, __file__, "--child", variation, "--pv", pv_name, "--puts", str(puts)]
    if address:
        command += ["--address", address]
    result = subprocess.run(
        command, env={**os.environ, **env}, cwd=REPO_ROOT, capture_output=True, timeout=60 + puts * TIMEOUT / 10
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variation} failed:\n{result.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=200, help="puts per variation and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ioc", choices=sorted(IOCS), default="zoo",
                        help="zoo: caproto's server, Nagle on; nodelay: the zoo with TCP_NODELAY; "
                             "rsrv: EPICS base's server")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=VARIATIONS, default=list(VARIATIONS))
    parser.add_argument("--child", choices=VARIATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--pv", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.pv, args.puts, args.warmup, args.address)

    import structlog

    from pvhub.testing import DaemonProcess
    from pvhub.testing import SimulatedIOC

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    module, ready_pv = IOCS[args.ioc]
    samples: dict[str, list[float]] = {name: [] for name in args.only}
    with ExitStack() as stack:
        ioc = stack.enter_context(SimulatedIOC(module, prefix=f"probe{os.getpid()}:", ready_pv=ready_pv, cwd=REPO_ROOT))
        env = ioc.ca_env()
        address = None
        if "hub" in args.only:
            address = stack.enter_context(DaemonProcess(env=env)).address
        for r in range(args.rounds):
            for name in args.only:
                print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                samples[name] += run_variation(name, ioc.pv("motor"), args.puts, env, address)
    rows = []
    for name, values in samples.items():
        t = Timing.of(values)
        slow = sum(1 for v in values if v > SLOW)
        rows.append([f"`{name}`", str(t.n), duration(t.median), duration(t.p99), duration(t.maximum),
                     f"{slow} ({100 * slow / max(t.n, 1):.0f} %)"])  # fmt: skip
    print(f"IOC: `python -m {module}`\n")
    print(table(["variation", "n", "median", "p99", "max", f"> {SLOW * 1e3:.0f} ms"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
