"""``python -m pvhub.actors``: one actor process, started by the daemon's supervisor."""

from __future__ import annotations

import argparse
import signal

from pvhub import logs
from pvhub.actors.loop import Actor, die_with_parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvhub.actors")
    parser.add_argument("--actor", required=True, help="the actor's identity at the broker")
    parser.add_argument("--broker", required=True, help="the broker's actor endpoint")
    parser.add_argument("--readings", required=True, help="the readings forwarder's endpoint")
    parser.add_argument("--log-format", default="json", choices=["auto", "json", "console"])
    parser.add_argument("--log-level", default="info")
    parser.add_argument("pvs", nargs="+", help="the PVs this actor owns")
    args = parser.parse_args(argv)
    die_with_parent()
    logs.configure(args.log_format, args.log_level)
    actor = Actor(args.actor, args.pvs, args.broker, args.readings)
    signal.signal(signal.SIGTERM, actor.request_stop)
    signal.signal(signal.SIGINT, actor.request_stop)
    return actor.run()


if __name__ == "__main__":
    raise SystemExit(main())
