"""What one reading costs a client process: CPU microseconds per reading received.

    .venv/bin/python bench/client_cost.py [--rates 1000 2000] [--seconds 5] [--py-spy DIR]

Starts the zoo IOC and a daemon, then one client process (this script with ``--client``)
holding an ``EpicsSignalRO`` on ``fast`` with one subscribed callback, as a fan-out
subscriber does. For each rate it sets ``fast_rate``, lets the stream settle, and has the
client measure a window: its own CPU time (``time.process_time``: every thread), the readings its
callback received, the readings lost (``missed_updates``: seq gaps) and any that came out of
order. It prints a table and one JSON line per rate. With ``--py-spy DIR`` it then records
the client with py-spy at each rate (``DIR/RATE.txt``, raw collapsed stacks) and prints where
the samples fall.

Rule 1: the client's CPU is measured by the client over a window the parent opens and it
closes, with py-spy never attached at the same time (py-spy stops the process to sample).
Rule 2: the callback does as little as a real one could (a count and a comparison), so the
cost measured is the library's.
Rule 3: every wait has a deadline; the client ends at end of input or after
``MAX_LIFETIME``; the IOC and the daemon are stopped by their context managers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).absolute().parent.parent
MAX_LIFETIME = 600.0
SETTLE_S = 1.5  # after a rate change, before the window opens
READY_TIMEOUT = 60.0
ANSWER_GRACE = 30.0
# Frames py-spy samples that are the library's path for a reading, by what they stand for.
HOT_FRAMES = ("_run", "poll", "_drain_readings", "recv_multipart", "decode", "decode_reading", "apply",
              "_on_channel", "dispatch", "flush", "_keep_alive", "_prove_subscriptions",
              "_run_queued", "_run_subs", "_run_value_subs", "_call")


# --- the client process ------------------------------------------------------------------


def run_client(pv: str) -> None:
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from pvhub.client import EpicsSignalRO, close_hubs

    threading.Timer(MAX_LIFETIME, os._exit, args=(3,)).start()
    signal = EpicsSignalRO(pv, name="fast")
    signal.wait_for_connection(timeout=60)
    counts = {"readings": 0, "disorder": 0, "last": None}

    def callback(value, **kwargs):
        counts["readings"] += 1
        last = counts["last"]
        if last is not None and value <= last:
            counts["disorder"] += 1
        counts["last"] = value

    signal.subscribe(callback)
    print("ready", flush=True)
    hub = signal._hub
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "window":
            seconds = float(words[1])
            start_missed, start_readings = signal.missed_updates, counts["readings"]
            start_disorder, start_wakeups = counts["disorder"], hub.wakeups
            # CPU time of the whole process (every thread), to the nanosecond: os.times counts
            # in clock ticks, 10 ms, too coarse for a few hundred ms in a window.
            start_cpu, start_wall = time.process_time(), time.monotonic()
            time.sleep(seconds)
            end_cpu, end_wall = time.process_time(), time.monotonic()
            cpu = end_cpu - start_cpu
            print(json.dumps({
                "wall": end_wall - start_wall,
                "cpu": cpu,
                "readings": counts["readings"] - start_readings,
                "missed": signal.missed_updates - start_missed,
                "disorder": counts["disorder"] - start_disorder,
                "wakeups": hub.wakeups - start_wakeups,
            }), flush=True)
    signal.unsubscribe_all()
    close_hubs()


# --- the parent ----------------------------------------------------------------------------


class Client:
    """The client process and its stdout, line by line."""

    def __init__(self, pv: str, address: str) -> None:
        env = {**os.environ, "PVHUB_ADDRESS": address}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).absolute()), "--client", pv],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the client did not answer within {timeout} s") from None
        if line is None:
            raise RuntimeError(f"the client exited (code {self.process.poll()})")
        return line

    def window(self, seconds: float) -> dict:
        self.process.stdin.write(f"window {seconds}\n")
        self.process.stdin.flush()
        return json.loads(self.next_line(seconds + ANSWER_GRACE))

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def py_spy(pid: int, out: Path, seconds: float) -> dict[str, float]:
    """Record ``pid`` for ``seconds``: the samples in each hot frame (inclusive), and the
    top frames by self time (a C function's time is its Python caller's)."""
    spy = REPO_ROOT / ".venv" / "bin" / "py-spy"
    # --gil: only the thread holding the GIL is sampled, so a thread waiting (for work, for
    # the GIL) is not mistaken for one working.
    subprocess.run([str(spy), "record", "-r", "300", "-d", str(int(seconds)), "-f", "raw", "-o", str(out),
                    "--gil", "-p", str(pid)], check=True, capture_output=True, timeout=seconds + 60)  # fmt: skip
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0].rsplit(".", 1)[-1] for f in stack.split(";")]
        n = int(count)
        samples += n
        for name in set(frames):
            inclusive[name] += n
        leaf[frames[-1]] += n
    return {"samples": samples,
            "inclusive": {name: inclusive[name] for name in HOT_FRAMES if inclusive[name]},
            "self_top": dict(leaf.most_common(15))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 2000.0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=2, help="windows per rate (the best is kept)")
    parser.add_argument("--py-spy", type=Path, default=None, dest="py_spy")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.client:
        run_client(options.client)
        return
    sys.path.insert(0, str(Path(__file__).absolute().parent))
    from fanout import IOCControl

    from pvhub.testing import DaemonProcess
    from pvhub.testing import SimulatedIOC, merge_ca_env

    prefix = f"cc{uuid.uuid4().hex[:6]}:"
    with SimulatedIOC("tests.iocs.zoo", prefix=prefix, cwd=REPO_ROOT, ready_pv="dt") as ioc:
        os.environ.update(merge_ca_env(ioc))  # IOCControl's sync client reads it
        control = IOCControl(ioc)
        control.set_rate(0)
        with DaemonProcess(env=merge_ca_env(ioc)) as daemon:
            client = Client(ioc.pv("fast"), daemon.address)
            try:
                line = client.next_line(READY_TIMEOUT)
                if line != "ready":
                    raise RuntimeError(f"the client did not start: {line!r}")
                idle = client.window(2.0)
                print(f"idle: {1e6 * idle['cpu'] / idle['wall']:.0f} us of CPU per second", flush=True)
                rows = []
                for rate in options.rates:
                    control.set_rate(rate)
                    time.sleep(SETTLE_S)  # the stream reaching its rate; no readiness to wait on
                    best = None
                    for _ in range(options.repeat):
                        window = client.window(options.seconds)
                        window["rate"] = rate
                        window["us_per_reading"] = 1e6 * window["cpu"] / max(window["readings"], 1)
                        window["us_per_reading_net"] = 1e6 * (
                            window["cpu"] - idle["cpu"] * window["wall"] / idle["wall"]) / max(window["readings"], 1)
                        if best is None or window["us_per_reading"] < best["us_per_reading"]:
                            best = window
                    rows.append(best)
                    print(json.dumps(best), flush=True)
                print(f"{'rate':>6} {'readings/s':>10} {'us/reading':>10} {'net':>6} {'missed':>6} "
                      f"{'disorder':>8} {'wakeups/s':>9}")
                for row in rows:
                    print(f"{row['rate']:>6.0f} {row['readings'] / row['wall']:>10.0f} {row['us_per_reading']:>10.1f} "
                          f"{row['us_per_reading_net']:>6.1f} {row['missed']:>6} {row['disorder']:>8} "
                          f"{row['wakeups'] / row['wall']:>9.0f}")
                if options.py_spy is not None:
                    options.py_spy.mkdir(parents=True, exist_ok=True)
                    for rate in options.rates:
                        control.set_rate(rate)
                        time.sleep(SETTLE_S)
                        picture = py_spy(client.process.pid, options.py_spy / f"{rate:.0f}.txt", 8)
                        print(json.dumps({"rate": rate, **picture}, indent=1), flush=True)
            finally:
                control.set_rate(0)
                client.close()


if __name__ == "__main__":
    main()
