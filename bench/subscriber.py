"""One subscriber process of the fan-out part of ``bench_core.py``.

    python bench/subscriber.py pvhub|caproto PV [--extra NAME_PREFIX COUNT]

``pvhub`` subscribes through ``pvhub.client.EpicsSignalRO`` (``PVHUB_ADDRESS`` in the
environment); ``caproto`` subscribes straight to the IOC with caproto's threading client
(``EPICS_CA_*`` in the environment), one Channel Access monitor per process. PV counts up by one per update; for
an array PV, its first element does.

``--extra NAME_PREFIX COUNT`` also subscribes (pvhub only) to COUNT more counting PVs,
``NAME_PREFIX00000`` onwards, and reports how many of their updates arrived during a window
and how many of their values were skipped.

It prints ``ready`` once the first value has arrived, then obeys lines on stdin:
``window SECONDS TAIL`` collects the counter values that arrive during SECONDS + TAIL and
prints one JSON line: the values as runs of consecutive integers, its own CPU time during
SECONDS, and a sample of (value, latency from IOC timestamp to callback) pairs. The
benchmark decides which values were produced during its window and counts those; TAIL lets
updates that the IOC batched (caproto holds them up to 1 s under load) still count.
``quit`` (or end of input) unsubscribes and exits.

Rule 1: it ends by itself: at end of input, or after ``MAX_LIFETIME`` seconds whatever
happens, so a benchmark that dies cannot leave it running.
Rule 2: the callback does as little as possible (two appends), the same for both modes, so
what differs between the modes is the path an update takes to reach it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Callable

MAX_LIFETIME = 900.0
LATENCY_SAMPLES = 4000  # at most this many latencies go back per window
EXTRA_BATCH = 50  # ten subscribers asking at once stay well below a thousand requests

_collecting = False
_values: list[int] = []
_latencies: list[float] = []
_first = threading.Event()
_extra_received = 0
_extra_lost = 0
_extra_last: dict[str, int] = {}


def on_value(value: int, timestamp: float) -> None:
    now = time.time()
    if _collecting:
        _values.append(value)
        _latencies.append(now - timestamp)
    _first.set()


def on_extra(pv: str, value: int) -> None:
    global _extra_received, _extra_lost
    last = _extra_last.get(pv)
    _extra_last[pv] = value
    if _collecting and last is not None:
        _extra_received += 1
        _extra_lost += max(0, value - last - 1)


def first_element(value) -> int:
    return int(value[0]) if hasattr(value, "__len__") else int(value)


def subscribe_pvhub(pv: str, extra: tuple[str, int] | None = None):
    import structlog

    # The client's warnings (gaps, resyncs) go to stderr: stdout is the line protocol.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from pvhub.client import EpicsSignalRO, close_hubs

    signal = EpicsSignalRO(pv, name="fast")
    signal.wait_for_connection(timeout=60)

    def callback(value, timestamp, **kwargs):
        on_value(first_element(value), timestamp)

    signal.subscribe(callback)
    extras = []
    if extra is not None:
        from pvhub.client import PvhubError

        prefix, count = extra
        # A batch at a time: a daemon asked for thousands of new PVs at once loses some.
        for start in range(0, count, EXTRA_BATCH):
            batch = [EpicsSignalRO(f"{prefix}{i:05d}", name=f"extra{i}")
                     for i in range(start, min(count, start + EXTRA_BATCH))]  # fmt: skip
            for other in batch:
                try:
                    other.wait_for_connection(timeout=20)
                except PvhubError as exc:  # watched no further; the window counts the others
                    print(f"extra PV not connected: {exc}", file=sys.stderr, flush=True)
                    continue
                other.subscribe(lambda value, _pv=other.pvname, **kw: on_extra(_pv, int(value)))
                extras.append(other)

    def stop() -> None:
        signal.unsubscribe_all()
        close_hubs()

    def missed() -> int | None:
        # Updates the client saw the actor publish but never received (gaps in their seq):
        # lost between the actor and this process, not upstream of the actor.
        return signal.missed_updates + sum(other.missed_updates for other in extras)

    return stop, missed, (signal, callback, extras)


def subscribe_caproto(pv: str, extra: tuple[str, int] | None = None):
    from caproto.threading.client import Context

    context = Context()
    (channel,) = context.get_pvs(pv, timeout=60)
    channel.wait_for_connection(timeout=60)

    def callback(sub, response):
        on_value(int(response.data[0]), response.metadata.timestamp)

    subscription = channel.subscribe(data_type="time")
    subscription.add_callback(callback)  # caproto holds callbacks weakly: main() keeps them

    def stop() -> None:
        subscription.clear()
        context.disconnect()

    return stop, lambda: None, (context, subscription, callback)


def window(seconds: float, tail: float, missed: Callable[[], int | None]) -> dict:
    """Collect for ``seconds`` plus ``tail``; CPU time is that of the first ``seconds``."""
    global _collecting, _values, _latencies, _extra_received, _extra_lost
    _values, _latencies = [], []
    _extra_received = _extra_lost = 0
    missed0 = missed()
    cpu0, t0 = sum(os.times()[:2]), time.monotonic()
    _collecting = True
    time.sleep(seconds)
    cpu = sum(os.times()[:2]) - cpu0
    elapsed = time.monotonic() - t0
    # The extra PVs count during the window only (their values are not tied to it).
    extra_received, extra_lost = _extra_received, _extra_lost
    time.sleep(tail)
    _collecting = False
    missed1 = missed()
    values, latencies = list(_values), list(_latencies)
    backwards = sum(1 for a, b in zip(values, values[1:]) if b <= a)
    step = max(1, len(values) // LATENCY_SAMPLES)
    return {
        "received": len(values),
        "runs": runs(values),
        "backwards": backwards,
        "elapsed": elapsed,
        "cpu": cpu,
        "extra_received": extra_received,
        "extra_lost": extra_lost,
        "seq_missed": None if missed0 is None or missed1 is None else missed1 - missed0,
        "latencies": [[v, lat] for v, lat in zip(values[::step], latencies[::step])],
    }


def runs(values: list[int]) -> list[list[int]]:
    """The distinct values as [first, last] runs of consecutive integers, ascending."""
    out: list[list[int]] = []
    for value in sorted(set(values)):
        if out and value == out[-1][1] + 1:
            out[-1][1] = value
        else:
            out.append([value, value])
    return out


def main() -> int:
    mode, pv = sys.argv[1], sys.argv[2]
    extra = (sys.argv[4], int(sys.argv[5])) if sys.argv[3:4] == ["--extra"] else None
    threading.Timer(MAX_LIFETIME, os._exit, args=(3,)).start()
    subscribe = {"pvhub": subscribe_pvhub, "caproto": subscribe_caproto}[mode]
    stop, missed, keep = subscribe(pv, extra)
    if not _first.wait(60):
        print(json.dumps({"error": "no value within 60 s"}), flush=True)
        os._exit(2)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["window"]:
            print(json.dumps(window(float(words[1]), float(words[2]), missed)), flush=True)
        elif words[:1] == ["quit"]:
            break
    stop()
    del keep
    sys.stdout.flush()
    os._exit(0)  # the lifetime timer is a non-daemon thread: do not wait for it


if __name__ == "__main__":
    raise SystemExit(main())
