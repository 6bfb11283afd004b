"""A beamline-like IOC served by EPICS base's own IOC and its C Channel Access server, rsrv.

It runs with pythonSoftIOC (``softioc``), which embeds EPICS base in a Python process. Run it
from the repository root (the module path is what ``pvhub.testing.SimulatedIOC`` launches)::

    python -m tests.iocs.rsrv --prefix bl: --count 1000

PVs, after the prefix:

- ``motor``: ``ao`` in mm, PREC 3, drive limits DRVL/DRVH -10..10 (rsrv clips a put outside
  them to the limit), display limits LOPR/HOPR -10..10.
- ``temp``: ``ai`` in degC, PREC 2, 21.5.
- ``mode``: ``mbbo`` Off / On / Auto, "Off".
- ``text``: ``stringout``, "hello".
- ``wave``: float64 ``waveform`` of 16 elements, 0..15.
- ``chars``: char ``waveform`` of up to 40 bytes, "abc" (ophyd's ``string=True`` case).
- ``count``: ``longin``, 7; clients may write it.
- ``locked``: ``longin`` in the access security group READONLY: every client's put is refused.
- ``fast``: ``longout`` counting up at ``fast_rate`` Hz (0, the default, pauses it); every
  step processes the record, so each value is one monitor update.
- ``fast_rate``: ``ao``, Hz.
- ``big``: float64 ``waveform`` of 131,072 elements (1 MiB) published at ``big_rate`` Hz;
  every element holds the number of the update.
- ``big_rate``: ``ao``, Hz; 0 (the default) pauses ``big``.
- ``shorts``: ``waveform`` of 4 SHORTs (CA's 16-bit integer), 0; ``floats``: of 4 FLOATs.
- ``texts``: ``waveform`` of up to 4 STRINGs.
- ``scanned``: ``calc`` processed ten times a second, always 7 (so it posts no value).
- ``half``: ``bo`` whose only label is ZNAM "Off" (ONAM empty: EPICS reports one label).
- ``empty``: float64 ``waveform`` of up to 16 elements that holds none (NORD 0) until written.
- ``gate``: ``bo``, 1 ("open"); ``guarded``: ``ao``, 3.5, in the access security group GATED,
  readable and writable only while ``gate`` is 1.
- ``scale:c00000`` .. : ``--count`` ``calc`` records counting up once a second (``SCAN "1
  second"``: EPICS base's scan thread processes them, no Python on their path).
- ``scale:s00000`` .. : ``--count`` ``ai`` records that never change.

Rule 1: loopback only. The environment ``pvhub.testing.SimulatedIOC`` gives the process
(``EPICS_CAS_INTF_ADDR_LIST``, ``EPICS_CA_SERVER_PORT``, the beacon variables) is what rsrv
reads; ``--interfaces`` is accepted for SimulatedIOC's command line and must be loopback.
The pvAccess server is not started: it would listen on its own ports, on every interface.
Rule 2: the process dies with its parent: ``PR_SET_PDEATHSIG`` asks the kernel for SIGKILL
when the parent goes, and a watcher thread covers a parent that dies before that is set.
SIGTERM and SIGINT end it at once; it keeps nothing worth saving.
Rule 3: no interactive shell: the main thread waits for a signal.
Rule 4: the clocks of ``fast`` and ``big`` are Python threads sleeping to their next deadline
(EPICS base's scan periods stop at 0.1 s); the counter's monitors and everything else are
served by rsrv's C threads.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"
BIG_LENGTH = 131_072  # float64 elements: 1 MiB
# rsrv refuses arrays above EPICS_CA_MAX_ARRAY_BYTES; 1 MiB plus headers, with room.
MAX_ARRAY_BYTES = str(4 * 1024 * 1024)
_PR_SET_PDEATHSIG = 1
_PARENT_POLL = 0.5
# How far behind its schedule a clock may fall before it stops catching up: past this it
# restarts its schedule from now instead of sending a burst of back-to-back updates.
_MAX_LAG = 0.1
_PAUSED_POLL = 0.05
_ACF = """\
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE)
}
ASG(READONLY) {
    RULE(1, READ)
}
ASG(GATED) {
    INPA("{prefix}gate")
    RULE(1, READ) { CALC("A=1") }
    RULE(1, WRITE) { CALC("A=1") }
}
"""


def die_with_parent() -> None:
    """Rule 2: SIGKILL from the kernel when the parent exits, and a watcher as a backstop."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class Clock:
    """Calls ``tick(n)`` with n = 1, 2, ... at ``rate()`` Hz on a thread of its own."""

    def __init__(self, name: str, rate: Callable[[], float], tick: Callable[[int], object]) -> None:
        self._rate = rate
        self._tick = tick
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        count = 0
        next_at = time.monotonic()
        while True:
            rate = self._rate()
            if rate <= 0:
                time.sleep(_PAUSED_POLL)
                next_at = time.monotonic()
                continue
            count += 1
            self._tick(count)
            next_at += 1.0 / rate
            now = time.monotonic()
            if next_at < now - _MAX_LAG:
                next_at = now
            delay = next_at - now
            if delay > 0:
                time.sleep(delay)


def build(prefix: str, count: int):
    """Create the records (before ``LoadDatabase``); returns the ones the clocks drive."""
    import numpy as np
    from softioc import builder

    builder.SetSimpleRecordNames(prefix, "")
    builder.aOut("motor", initial_value=0.0, EGU="mm", PREC=3, DRVL=-10.0, DRVH=10.0,
                 LOPR=-10.0, HOPR=10.0)  # fmt: skip
    builder.aIn("temp", initial_value=21.5, EGU="degC", PREC=2, LOPR=0.0, HOPR=100.0)
    builder.mbbOut("mode", "Off", "On", "Auto", initial_value=0)
    builder.stringOut("text", initial_value="hello")
    builder.WaveformOut("wave", np.arange(16, dtype=np.float64))
    builder.WaveformOut("chars", np.frombuffer(b"abc", dtype=np.uint8), length=40)
    builder.longIn("count", initial_value=7)
    builder.longIn("locked", initial_value=42, ASG="READONLY")
    builder.records.waveform("empty", NELM=16, FTVL="DOUBLE")
    builder.records.waveform("shorts", NELM=4, FTVL="SHORT")
    builder.records.bo("half", ZNAM="Off")
    builder.records.waveform("texts", NELM=4, FTVL="STRING")
    builder.records.calc("scanned", CALC="7", SCAN=".1 second", EGU="x", PREC=1)
    builder.records.waveform("floats", NELM=4, FTVL="FLOAT")
    builder.records.bo("gate", VAL=1, PINI="YES", ZNAM="closed", ONAM="open")
    builder.records.ao("guarded", VAL=3.5, PINI="YES", PREC=1, EGU="V", ASG="GATED")
    rates = {
        "fast": builder.aOut("fast_rate", initial_value=0.0, EGU="Hz", DRVL=0.0, DRVH=20000.0),
        "big": builder.aOut("big_rate", initial_value=0.0, EGU="Hz", DRVL=0.0, DRVH=100.0),
    }
    fast = builder.longOut("fast", initial_value=0)
    big = builder.WaveformIn("big", np.zeros(BIG_LENGTH, dtype=np.float64))
    for i in range(count):
        name = f"scale:c{i:05d}"
        builder.records.calc(name, CALC="A+1", INPA=f"{prefix}{name} NPP", SCAN="1 second")
        builder.records.ai(f"scale:s{i:05d}", VAL=float(i), PREC=1)
    return rates, fast, big


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", default="rsrv:")
    parser.add_argument("--count", type=int, default=0,
                        help="scale records: this many 1 Hz calc and this many static ai")  # fmt: skip
    parser.add_argument("--interfaces", default=LOOPBACK,
                        help="accepted for SimulatedIOC; must be 127.0.0.1 (Rule 1)")  # fmt: skip
    # caproto's ioc_arg_parser options that a launcher may pass along; meaningless here.
    parser.add_argument("--list-pvs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="count", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.interfaces != LOOPBACK:
        parser.error(f"--interfaces must be {LOOPBACK}")
    die_with_parent()
    os.environ.setdefault("EPICS_CAS_INTF_ADDR_LIST", LOOPBACK)
    os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", MAX_ARRAY_BYTES)

    from softioc import asyncio_dispatcher, builder, imports, softioc

    rates, fast, big = build(args.prefix, args.count)
    with tempfile.NamedTemporaryFile("w", prefix="rsrv-", suffix=".acf", delete=False) as acf:
        acf.write(_ACF.replace("{prefix}", args.prefix))
    try:
        imports.dbCore.asSetFilename(acf.name.encode())
        builder.LoadDatabase()
        softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher(), enable_pva=False)
    finally:
        os.unlink(acf.name)  # read by iocInit

    import numpy as np

    Clock("fast-clock", rates["fast"].get, fast.set)
    Clock("big-clock", rates["big"].get, lambda n: big.set(np.full(BIG_LENGTH, float(n))))
    print(f"rsrv IOC ready: prefix {args.prefix!r}, {args.count} scale records of each kind",
          flush=True)  # fmt: skip

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    sys.stdout.flush()
    os._exit(0)  # Rule 2: nothing to save; epicsExit could wait on the IOC's threads


if __name__ == "__main__":
    raise SystemExit(main())
