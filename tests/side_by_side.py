"""Run the same Bluesky plans with ophyd's signals and with pvhub's, against one IOC, and print
the documents of both as JSON (one object: {"ophyd": [...], "pvhub": [...]}).

Run as a subprocess by ``test_ophyd_parity.py``: ophyd's Channel Access context is global to a
process and reads the EPICS environment once, so each IOC gets a process of its own.
Environment: ``EPICS_CA_*`` pointing at the IOC, ``PVHUB_ADDRESS`` at a daemon serving it,
``PREFIX`` the IOC's PV prefix.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def run_plans(EpicsSignal, EpicsSignalRO, prefix):
    from bluesky import RunEngine
    from bluesky.plan_stubs import close_run, monitor, mv, open_run, sleep, unmonitor
    from bluesky.plans import count, list_scan, scan

    def sig(cls, suffix, name, **kwargs):
        s = cls(prefix + suffix, name=name, **kwargs)
        s.wait_for_connection(timeout=10)
        return s

    time_delta = sig(EpicsSignal, "dt", "time_delta")
    x = sig(EpicsSignalRO, "x", "x")
    motor = sig(EpicsSignal, "motor", "motor")
    integer = sig(EpicsSignal, "count", "integer")
    wave = sig(EpicsSignalRO, "wave", "wave")
    text = sig(EpicsSignal, "text", "text")
    mode = sig(EpicsSignal, "mode", "mode")
    mode_label = sig(EpicsSignal, "mode", "mode_label", string=True)

    documents = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: documents.append([name, _plain(doc)]))

    def monitor_x_for(duration, md=None):
        yield from open_run(md)
        yield from monitor(x, name="x_monitor")
        yield from sleep(duration)
        yield from unmonitor(x)
        yield from close_run()

    RE(mv(time_delta, 3))
    RE(count([time_delta]))
    RE(list_scan([], time_delta, [0.1, 0.3, 1, 3]))
    RE(mv(time_delta, 1))
    RE(count([x], num=3, delay=0.1))
    RE(count([motor, integer, wave, text, mode, mode_label]))
    RE(list_scan([integer], motor, [1.5, -2.25]))
    RE(scan([time_delta, integer], motor, -1, 1, 3))
    RE(mv(mode, 2))
    RE(count([mode, mode_label]))
    RE(mv(mode_label, "On"))
    RE(count([mode, mode_label]))
    RE(monitor_x_for(0.5))

    def monitor_motor_moves(md=None):
        # Deterministic: the monitored updates are the ones this plan causes.
        yield from open_run(md)
        yield from monitor(motor, name="motor_monitor")
        yield from mv(motor, 5)
        yield from mv(motor, 6)
        yield from unmonitor(motor)
        yield from close_run()

    RE(mv(motor, 4))
    RE(monitor_motor_moves())
    RE(mv(time_delta, 3.0, motor, 0.0, mode, 0))
    describe = {s.name: _plain(s.describe()) for s in (time_delta, x, motor, integer, wave, text, mode, mode_label)}
    reads = {s.name: _plain(s.read()[s.name]["value"]) for s in (time_delta, motor, integer, wave, text, mode, mode_label)}
    return {"documents": documents, "describe": describe, "reads": reads}


def main() -> int:
    prefix = os.environ["PREFIX"]
    import caproto
    import ophyd
    from helpers import plain_search_socket  # this script's directory is on sys.path

    caproto.bcast_socket = plain_search_socket
    ophyd.set_cl("caproto")
    from ophyd.signal import EpicsSignal as OphydSignal
    from ophyd.signal import EpicsSignalRO as OphydSignalRO

    import pvhub.client as hub

    result = {
        "ophyd": run_plans(OphydSignal, OphydSignalRO, prefix),
        "pvhub": run_plans(hub.EpicsSignal, hub.EpicsSignalRO, prefix),
    }
    hub.close_hubs()
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
