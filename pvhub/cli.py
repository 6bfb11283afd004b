"""The ``pvhub`` command: the daemon, operators' caget/caput/camonitor, status, CURVE keys, and a demo."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from typing import Any

from pvhub import __version__
from pvhub.config import DEFAULT_ADDRESS


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        from pvhub.keys import KeyFileError

        if not isinstance(exc, KeyFileError):
            raise
        print(f"pvhub: {exc}", file=sys.stderr)  # keys missing, unsafe or half given
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvhub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pvhub {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--address", help=f"where clients connect (default {DEFAULT_ADDRESS}, or the config's)")
    serve.add_argument("--readings", help="where readings are published (default: the address's port + 1)")
    serve.add_argument("--large-readings",
                       help="where arrays of 64 KiB or more are published (default: the readings' port + 1)")
    serve.add_argument("--config", help="a TOML configuration file")
    serve.add_argument("--readings-hwm", type=int, default=None, metavar="N",
                       help="readings queued per client before a slow client loses some (default 10000)")
    serve.add_argument("--log-format", default="auto", choices=["auto", "json", "console"],
                       help="auto: readable at a terminal, JSON lines otherwise (journald)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                       help="stop, as at SIGTERM, once process PID is no longer this one's parent "
                            "(for a launcher or harness whose daemon must not outlive it)")
    serve.set_defaults(func=_serve)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--address", default=None, help="the daemon (default $PVHUB_ADDRESS or %s)" % DEFAULT_ADDRESS)
        sub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the PV (default 5)")
        return sub

    get = client_command("get", "print PVs' values (caget through the hub)")
    get.add_argument("pvs", nargs="+", metavar="PV")
    get.add_argument("-S", "--string", action="store_true",
                     help="enum labels and char arrays as text, numbers at the PV's precision")
    get.add_argument("--describe", action="store_true", help="print the data keys too")
    get.set_defaults(func=_get)

    put = client_command("put", "put a value and wait for completion (caput through the hub)")
    put.add_argument("pv", metavar="PV")
    put.add_argument("value", nargs="+", metavar="VALUE", help="a number, text, or several for an array")
    put.add_argument("--no-wait", action="store_true", help="do not wait for the put to complete")
    put.set_defaults(func=_put)

    monitor = client_command("monitor", "print every update of PVs until Ctrl-C (camonitor)")
    monitor.add_argument("pvs", nargs="+", metavar="PV")
    monitor.add_argument("-S", "--string", action="store_true")
    monitor.add_argument("-n", "--count", type=int, default=0, help="stop after this many updates")
    monitor.set_defaults(func=_monitor)

    status = client_command("status", "show the daemon's PVs (connected, rate, subscribers, actor) and clients")
    status.add_argument("--json", action="store_true", help="print the raw status")
    status.set_defaults(func=_status)

    keys = commands.add_parser("keys", help="CURVE key pairs for the daemon and its clients")
    keys.set_defaults(func=lambda args: _usage(keys))
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    generate = keys_commands.add_parser(
        "generate", help="write a key pair NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    generate.add_argument("name", metavar="NAME",
                          help="the key's name: the client's identity in the daemon's access rules")
    generate.add_argument("--dir", default=".", help="where to write the files (default: here; created 0700)")
    generate.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    generate.set_defaults(func=_keys_generate)

    demo = commands.add_parser("demo", help="run the tutorial's plans against a simulated IOC")
    demo.add_argument("--duration", type=float, default=3.0, help="seconds of monitoring (default 3)")
    demo.set_defaults(func=_demo)
    return parser


# --- the daemon ---------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from pvhub import config as config_module
    from pvhub import logs
    from pvhub.daemon import Broker

    logs.configure(args.log_format, args.log_level)
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as exc:
        print(f"pvhub: {exc}", file=sys.stderr)
        return 2
    address = args.address or config.address
    readings = args.readings or config.readings
    large_readings = args.large_readings or config.large_readings
    log_format = "json" if args.log_format == "auto" and not sys.stderr.isatty() else args.log_format
    hwm = args.readings_hwm or config.readings_hwm
    broker = Broker(config, address, readings, log_format=log_format, log_level=args.log_level,
                    readings_hwm=hwm, config_path=args.config, large_readings=large_readings,
                    parent_pid=args.parent_pid)
    broker.install_signal_handlers()
    try:
        return broker.run()
    except Exception as exc:  # e.g. the address is in use: say so, exit non-zero
        import zmq

        from pvhub.keys import KeyFileError

        if isinstance(exc, (config_module.ConfigError, KeyFileError)):  # unsafe, or keys unusable
            print(f"pvhub: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, zmq.ZMQError):
            print(f"pvhub: cannot bind {address}: {exc}", file=sys.stderr)
            return 1
        raise


# --- operators' tools -------------------------------------------------------------------------


def parse_value(words: list[str]) -> Any:
    """Command-line words as a value: numbers become numbers, several words an array."""
    def one(word: str) -> Any:
        try:
            value = ast.literal_eval(word)
        except (ValueError, SyntaxError):
            return word
        return value if isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool) else word

    values = [one(w) for w in words]
    return values[0] if len(values) == 1 else values


def _signal(pv: str, args: argparse.Namespace, writable: bool = False):
    from pvhub.client import EpicsSignal, EpicsSignalRO

    cls = EpicsSignal if writable else EpicsSignalRO
    return cls(pv, name=pv, string=getattr(args, "string", False), address=args.address)


def _format(value: Any) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return f"{len(value)} " + " ".join(str(v) for v in value)
    return str(value)


def _stamp(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1e6):06d}"


def _get(args: argparse.Namespace) -> int:
    from pvhub.errors import PvhubError

    status = 0
    signals = [_signal(pv, args) for pv in args.pvs]
    for sig in signals:
        try:
            sig.wait_for_connection(timeout=args.timeout)
            print(f"{sig.pvname:<30} {_format(sig.get())}")
            if args.describe:
                print(json.dumps(sig.describe()[sig.name], indent=2, default=str))
        except (PvhubError, TimeoutError, ConnectionError) as exc:
            print(f"{sig.pvname:<30} *** {exc}", file=sys.stderr)
            status = 1
    return status


def _put(args: argparse.Namespace) -> int:
    from pvhub.errors import PvhubError

    sig = _signal(args.pv, args, writable=True)
    try:
        sig.wait_for_connection(timeout=args.timeout)
        old = sig.get()
        status = sig.set(parse_value(args.value))
        if not args.no_wait:
            status.wait()
        print(f"Old : {sig.pvname:<30} {_format(old)}")
        print(f"New : {sig.pvname:<30} {_format(sig.get())}")
    except (PvhubError, TimeoutError, ConnectionError, ValueError) as exc:
        print(f"pvhub put {args.pv}: {exc}", file=sys.stderr)
        return 1
    return 0


def _monitor(args: argparse.Namespace) -> int:
    import threading

    from pvhub.errors import PvhubError

    done = threading.Event()
    seen = 0
    lock = threading.Lock()

    def show(value: Any, timestamp: float, obj: Any, **kwargs: Any) -> None:
        nonlocal seen
        print(f"{obj.pvname:<30} {_stamp(timestamp)} {_format(value)}", flush=True)
        with lock:
            seen += 1
            if args.count and seen >= args.count:
                done.set()

    def show_meta(connected: bool, obj: Any, **kwargs: Any) -> None:
        if not connected:
            print(f"{obj.pvname:<30} *** disconnected", flush=True)

    signals = [_signal(pv, args) for pv in args.pvs]
    status = 0
    for sig in signals:
        try:
            sig.wait_for_connection(timeout=args.timeout)
        except (PvhubError, TimeoutError, ConnectionError) as exc:
            print(f"{sig.pvname:<30} *** {exc}", file=sys.stderr)
            status = 1
        sig.subscribe(show)
        sig.subscribe(show_meta, event_type="meta", run=False)
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    return status


def _status(args: argparse.Namespace) -> int:
    from pvhub import protocol as p
    from pvhub.client import get_hub
    from pvhub.errors import PvhubError

    hub = get_hub(args.address)
    try:
        reply = hub.call(lambda rid: p.StatusRequest(id=rid), timeout=args.timeout)
    except PvhubError as exc:
        print(f"pvhub status: {exc}", file=sys.stderr)
        return 1
    status = reply.status  # type: ignore[attr-defined]
    if args.json:
        sys.stdout.write(status_json(status))
        return 0
    print(format_status(status, hub.address))
    return 0


def status_json(status: dict) -> str:
    """The status as JSON, one PV, actor or client per line: readable, and quick to write for
    tens of thousands of PVs (``indent=`` goes through json's pure-Python encoder, four times
    slower)."""
    lines = ["{"]
    items = list(status.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value:
            lines.append(f"  {json.dumps(key)}: [")
            lines.append(",\n".join("    " + json.dumps(item) for item in value))
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_status(status: dict, address: str) -> str:
    """``pvhub status`` as tables: the daemon, its PVs, its clients."""
    now = time.time()
    lines = [f"pvhub {status['version']} at {address}, up {_duration(status['uptime'])}, "
             f"readings on {status['readings']}"
             + (f" (large on {status['large_readings']})" if status.get("large_readings") else ""), ""]
    rows = [("PV", "CONNECTED", "RATE/S", "SUBSCRIBERS", "LAST UPDATE", "ACTOR", "ACTOR PID", "RESTARTS")]
    for pv in status["pvs"]:
        last = pv["last_update"]
        actor = pv["actor"] + (" (quarantined)" if pv.get("quarantined") else "")
        rows.append((pv["pv"], "yes" if pv["connected"] else "NO", f"{pv['rate']:.1f}",
                     str(pv["subscribers"]), f"{_duration(now - last)} ago" if last else "-",
                     actor, str(pv["pid"] or "-"), str(pv["restarts"])))
    lines += _table(rows) + [""]
    rows = [("ACTOR", "KIND", "PVS", "PID", "READY", "RESTARTS")]
    for actor in status.get("actors", []):
        rows.append((actor["actor"], actor.get("kind", "-"), str(len(actor["pvs"])), str(actor["pid"] or "-"),
                     "yes" if actor["ready"] else "NO", str(actor["restarts"])))
    lines += _table(rows) + [""]
    rows = [("CLIENT", "NAME", "IDENTITY", "PVS", "REQUESTS", "IDLE")]
    for client in status["clients"]:
        rows.append((client["client"][:10], client["name"], client.get("identity", "-"), str(client["pvs"]),
                     str(client["requests"]), f"{client['idle']:.1f} s"))
    lines += _table(rows)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- keys ------------------------------------------------------------------------------------


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _keys_generate(args: argparse.Namespace) -> int:
    from pvhub.keys import KeyFileError, generate

    try:
        public, secret = generate(args.name, args.dir, force=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"pvhub keys generate: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public.absolute()}")
    print(f"secret key: {secret.absolute()}")
    print(f"{secret.name} stays on this machine, readable by its user only; {public.name} goes into the "
          f"daemon's clients directory (or, if this is the daemon's own key, to each client as PVHUB_SERVER_KEY).")
    return 0


# --- the demo ---------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from pvhub.demo import run_demo

    return run_demo(duration=args.duration)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
