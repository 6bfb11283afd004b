"""One client process of ``python -m bench latency``: a Signal library against one IOC.

    python bench/latency_client.py pvhub|ophyd-caproto|ophyd-pyepics PLAN_JSON

``pvhub`` uses ``pvhub.client`` (``PVHUB_ADDRESS`` in the environment); ``ophyd-caproto`` and
``ophyd-pyepics`` use ophyd's ``EpicsSignal`` on that control layer, straight to the IOC
(``EPICS_CA_*`` in the environment). PLAN_JSON says which PVs and how many samples. It prints
one JSON line of durations in seconds:

- ``set``: ``signal.set(v).wait()`` on the motor, per configuration: ``default`` is the ophyd
  tutorial's ``EpicsSignal(pv)`` (no put completion: it waits for the readback), and
  ``put_complete`` is ``EpicsSignal(pv, put_complete=True)``; pvhub's ``set`` always waits for
  the put's completion, so it has one configuration, ``pvhub``;
- ``count``: a RunEngine ``count([det], num=P)`` over P (seconds per point), per run;
- ``list_scan``: a RunEngine ``list_scan([det], motor, positions)`` over its points, per run
  and configuration;
- ``first``: from creating a read-only Signal on a PV nobody has used to holding its value.

Rule 1: ophyd picks its control layer once per process, at import: that is why each
library runs in a process of its own.
Rule 2: every loop is bounded by a count and a time budget; the process ends itself after
``MAX_LIFETIME`` whatever happens, and leaves with ``os._exit`` once it has printed, so no
library's teardown can hang the benchmark.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, Callable

MAX_LIFETIME = 300.0
TIMEOUT = 10.0


def timed(call: Callable[[int], Any], n: int, budget: float) -> list[float]:
    samples = []
    deadline = time.monotonic() + budget
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return samples


def put_value(i: int) -> float:
    return 1.0 + (i % 50) * 0.125  # inside the motor's limits, exact in binary, a change every put


def signal_classes(client: str):
    """(EpicsSignal, EpicsSignalRO, {configuration: keyword arguments}) for ``client``."""
    if client == "pvhub":
        from pvhub.client import EpicsSignal, EpicsSignalRO

        return EpicsSignal, EpicsSignalRO, {"pvhub": {}}
    layer = client.split("-", 1)[1]
    if layer == "pyepics":
        # pyepics finds libca through this variable, which importing this module sets.
        import epicscorelibs.path.pyepics  # noqa: F401
    import ophyd

    ophyd.set_cl(layer)
    from ophyd.signal import EpicsSignal, EpicsSignalRO

    return EpicsSignal, EpicsSignalRO, {"default": {}, "put_complete": {"put_complete": True}}


def main() -> int:
    client, plan = sys.argv[1], json.loads(sys.argv[2])
    threading.Timer(MAX_LIFETIME, os._exit, args=(3,)).start()
    import structlog

    # pvhub's client logs through structlog to stdout unless told otherwise: stdout is ours.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from bluesky import RunEngine
    from bluesky.plans import count, list_scan

    EpicsSignal, EpicsSignalRO, configurations = signal_classes(client)
    result: dict[str, Any] = {"client": client, "set": {}, "list_scan": {}}

    first = []
    for pv in plan["fresh"]:
        t0 = time.perf_counter()
        signal = EpicsSignalRO(pv, name="fresh")
        signal.wait_for_connection(timeout=TIMEOUT)
        signal.get()
        first.append(time.perf_counter() - t0)
    result["first"] = first

    det = EpicsSignalRO(plan["det"], name="det")
    det.wait_for_connection(timeout=TIMEOUT)
    RE = RunEngine({})
    RE(count([det], num=2))  # the RunEngine's own first-run costs, not timed

    def per_point(plan_factory: Callable[[], Any], points: int) -> float:
        t0 = time.perf_counter()
        RE(plan_factory())
        return (time.perf_counter() - t0) / points

    p = plan["points"]
    result["count"] = [per_point(lambda: count([det], num=p), p) for _ in range(plan["runs"])]
    positions = [put_value(i) for i in range(p)]
    for config, kwargs in configurations.items():
        motor = EpicsSignal(plan["motor"], name="motor", **kwargs)
        motor.wait_for_connection(timeout=TIMEOUT)
        timed(lambda i: motor.set(put_value(i + 7)).wait(timeout=TIMEOUT), 10, 2.0)  # warm-up
        result["set"][config] = timed(
            lambda i: motor.set(put_value(i)).wait(timeout=TIMEOUT), plan["puts"], plan["budget"]
        )
        result["list_scan"][config] = [
            per_point(lambda: list_scan([det], motor, positions), p) for _ in range(plan["runs"])
        ]
    print(json.dumps(result), flush=True)
    os._exit(0)  # Rule 2


if __name__ == "__main__":
    raise SystemExit(main())
