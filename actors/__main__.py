"""``python -m pvhub.actors``: one actor process, started by the daemon's supervisor.

Rule: the actor never outlives its daemon. Before anything else (before the imports that make
up most of its start-up) it asks Linux to SIGKILL it when its parent dies, and then checks
that its parent is still the daemon that started it (``--parent-pid``): a daemon that died
while this process was being started is noticed here, since the parent-death signal only
covers deaths after the request. The daemon's supervisor makes the same request sooner, in
the bootstrap it starts the interpreter with (``daemon/supervisor.py`` Rule 1); this one
covers an actor started by hand.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the actor loop's parent check remains
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def _parent_pid(argv: list[str]) -> int | None:
    try:
        return int(argv[argv.index("--parent-pid") + 1])
    except (ValueError, IndexError):
        return None


die_with_parent(_parent_pid(sys.argv))

import argparse  # noqa: E402  (after the parent check, on purpose)

from pvhub import logs  # noqa: E402
from pvhub.actors.loop import Actor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvhub.actors")
    parser.add_argument("--actor", required=True, help="the actor's identity at the broker")
    parser.add_argument("--broker", required=True, help="the broker's actor endpoint")
    parser.add_argument("--readings", required=True, help="the readings forwarder's endpoint")
    parser.add_argument("--parent-pid", type=int, default=None, help="the daemon's pid")
    parser.add_argument("--epoch", type=int, default=None, help="this incarnation's epoch (the daemon's count)")
    parser.add_argument("--log-format", default="json", choices=["auto", "json", "console"])
    parser.add_argument("--log-level", default="info")
    parser.add_argument("pvs", nargs="*", help="PVs to own from the start (the broker adopts more)")
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    actor = Actor(args.actor, args.pvs, args.broker, args.readings, parent_pid=args.parent_pid, epoch=args.epoch)
    signal.signal(signal.SIGTERM, actor.request_stop)
    signal.signal(signal.SIGINT, actor.request_stop)
    return actor.run()


if __name__ == "__main__":
    raise SystemExit(main())
