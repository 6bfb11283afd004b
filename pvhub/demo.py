"""``pvhub demo``: the ophyd tutorial "Single EPICS PVs", served by a real daemon.

It starts caproto's random-walk IOC on loopback (a port picked now, so it meets no other IOC),
starts ``pvhub serve`` next to it, and runs the tutorial's steps through ``pvhub.client``
with only the import line changed. Then a motor: caproto's ``fake_motor_record`` IOC, driven
by ophyd's own ``EpicsMotor`` through pvhub's ophyd control layer and scanned by a plan.
Everything it started is stopped when it ends.
"""

from __future__ import annotations

import os
import time
from collections import deque


def _say(text: str) -> None:
    print(f"\n>>> {text}", flush=True)


def run_demo(duration: float = 3.0) -> int:
    try:
        from bluesky import RunEngine
        from bluesky.callbacks import LiveTable
        from bluesky.plan_stubs import close_run, monitor, mv, open_run, sleep, unmonitor
        from bluesky.plans import count, list_scan
    except ImportError:
        print("pvhub demo needs bluesky: pip install 'pvhub[bluesky]'")
        return 2

    from pvhub.testing import DaemonProcess
    from pvhub.testing import SimulatedIOC, merge_ca_env

    with SimulatedIOC("caproto.ioc_examples.random_walk", prefix="random_walk:") as ioc, \
            SimulatedIOC("caproto.ioc_examples.fake_motor_record", prefix="sim:", ready_pv="mtr1") as motors:
        print(f"simulated IOC: caproto.ioc_examples.random_walk on 127.0.0.1:{ioc.port} (pid {ioc.pid})")
        print(f"simulated IOC: caproto.ioc_examples.fake_motor_record on 127.0.0.1:{motors.port} (pid {motors.pid})")
        with DaemonProcess(env=merge_ca_env(ioc, motors)) as daemon:
            print(f"pvhub serve: {daemon.address} (pid {daemon.pid}), log in {daemon.log_path}")
            os.environ["PVHUB_ADDRESS"] = daemon.address
            try:
                _tutorial(duration, RunEngine, LiveTable, count, list_scan, mv, monitor, unmonitor,
                          open_run, close_run, sleep)
                _motor(RunEngine, LiveTable)
            finally:
                from pvhub.client import close_hubs

                close_hubs()
    print("\nDemo finished: daemon and IOCs stopped.")
    return 0


def _motor(RunEngine, LiveTable):
    """ophyd's ``EpicsMotor``, unchanged, through pvhub's ophyd control layer."""
    _say("from pvhub.client import ophyd_layer; ophyd_layer.install()")
    from pvhub.client import ophyd_layer

    ophyd_layer.install()
    try:
        from bluesky.plans import scan
        from ophyd import EpicsMotor, EpicsSignalRO

        _say('m1 = EpicsMotor("sim:mtr1", name="m1")')
        m1 = EpicsMotor("sim:mtr1", name="m1")
        x = EpicsSignalRO("random_walk:x", name="x")
        m1.wait_for_connection(timeout=20)
        x.wait_for_connection(timeout=20)
        print(m1.describe()["m1"])
        _say('RE(scan([x], m1, 1, 3, 5), LiveTable(["m1", "m1_user_setpoint", "x"]))')
        RE = RunEngine({})
        RE(scan([x], m1, 1, 3, 5), LiveTable(["m1", "m1_user_setpoint", "x"]))
        print(f"m1 is at {m1.position:.3f}")
        m1.destroy()
        x.destroy()
    finally:
        ophyd_layer.uninstall()


def _tutorial(duration, RunEngine, LiveTable, count, list_scan, mv, monitor, unmonitor, open_run, close_run, sleep):
    _say('from pvhub.client import EpicsSignal, EpicsSignalRO, wait')
    from pvhub.client import EpicsSignal, EpicsSignalRO, wait

    time_delta = EpicsSignal("random_walk:dt", name="time_delta")
    x = EpicsSignalRO("random_walk:x", name="x")
    time_delta.wait_for_connection(timeout=20)
    x.wait_for_connection(timeout=20)

    RE = RunEngine({})
    token = RE.subscribe(LiveTable(["time_delta", "x"]))
    _say("RE(count([time_delta]))")
    RE(count([time_delta]))
    _say("RE(list_scan([], time_delta, [0.1, 0.3, 1, 3]))")
    RE(list_scan([], time_delta, [0.1, 0.3, 1, 3]))
    _say("RE(mv(time_delta, 1))")
    RE(mv(time_delta, 1))
    _say("RE(count([x], num=5, delay=0.5))")
    RE(count([x], num=5, delay=0.5))

    def monitor_x_for(duration, md=None):
        yield from open_run(md)
        yield from monitor(x, name="x_monitor")
        yield from sleep(duration)
        yield from unmonitor(x)
        yield from close_run()

    RE.unsubscribe(token)
    _say(f'RE(monitor_x_for({duration:g}), LiveTable(["x"], stream_name="x_monitor"))')
    RE(monitor_x_for(duration), LiveTable(["x"], stream_name="x_monitor"))

    _say("time_delta.read()")
    print(time_delta.read())
    _say("time_delta.describe()")
    print(time_delta.describe())
    _say("time_delta.set(10).wait(timeout=1)")
    time_delta.set(10).wait(timeout=1)
    _say("status = time_delta.set(5); status.wait(timeout=1)")
    status = time_delta.set(5)
    print("Moving to 5...")
    status.wait(timeout=1)
    print("Moved to 5.")
    _say("wait(time_delta.set(1), timeout=1)")
    wait(time_delta.set(1), timeout=1)

    _say("x.subscribe(accumulate)")
    readings: deque = deque(maxlen=5)

    def accumulate(value, old_value, timestamp, **kwargs):
        readings.append({"x": {"value": value, "timestamp": timestamp}})

    print(x.subscribe(accumulate))
    time.sleep(duration)
    print(readings)
