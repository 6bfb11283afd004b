"""Run ophyd's own tests of its EPICS classes through ophyd's caproto layer or through pvhub.

    python -m tests.ophyd_shipped.runner --layer caproto --write-expected   # the baseline
    python -m tests.ophyd_shipped.runner --layer pvhub                      # compare to it

Rule 1: everything stays on loopback. The IOCs ophyd's fixtures start inherit a Channel Access
environment that binds them to 127.0.0.1; their beacons, and the repeater ophyd's fixtures try
to spawn, go to a UDP port this process holds bound (so no ``caproto-repeater`` starts, and
none outlives the run). The motor the tests call motorsim is caproto's fake motor record
(``motorsim_ioc.py``), and caproto's ``fake_motor_record`` example serves the ``sim:mtr*``
motors some tests name; each on a port of its own.
Rule 2: each test's IOC gets the next of a few server ports chosen here (the plugin moves
``EPICS_CA_SERVER_PORT`` on before each test), and clients search them all. caproto binds a
server's UDP port with SO_REUSEPORT, so an IOC on the port of the one just stopped (which may
take a second to exit) would share its searches with it, and often miss them.
Rule 3: one pytest subprocess per test file, in a process group of its own that is killed
when the file is done, so nothing it started outlives it. Outcomes come from its JUnit XML.
Files (or chunks of one) run side by side in ``lanes``, each with server ports of its own:
most of their time is spent waiting for IOCs to start and motors to move.
Rule 4: ``expected.json`` lists, per file, the tests that pass with ophyd's caproto layer
(made by ``--write-expected`` with ``--layer caproto``); through pvhub every one of them must
pass too. An expected test that does not pass is run once more on its own before it counts
as lost: some of ophyd's tests depend on timing (a 0.2 s sleep before an assertion) that a
loaded machine sometimes misses, with either layer.
Rule 5: ``KNOWN_DIFFERENCES`` names the tests that cannot pass through pvhub as it is, and
why; they run and are reported, but are not required. Everything else expected is.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ophyd.tests

from pvhub.testing import DaemonProcess
from pvhub.testing import LOOPBACK, SimulatedIOC, free_tcp_port

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
OPHYD_TESTS = Path(ophyd.tests.__file__).resolve().parent
EXPECTED = HERE / "expected.json"
FILES = ("test_signal.py", "test_pvpositioner.py", "test_scaler.py", "test_mca.py", "test_epicsmotor.py")
MOTOR_PREFIX = "XF:31IDA-OP{Tbl-Ax:X1}"
PER_TEST_TIMEOUT = 60
SERVER_PORTS = 6  # Rule 2: more than the IOCs that may be alive at once
CHUNK = 24  # tests per pytest process when only the expected ones run
FILE_TIMEOUT = 480.0


# Rule 5: test id prefix -> why it cannot pass through pvhub today. None now: the alarm tests
# that read right after a put became possible with fresh reads (``ReadRequest.fresh``).
KNOWN_DIFFERENCES: dict[str, str] = {}


def known_difference(test_id: str) -> str | None:
    """Why ``test_id`` is not required to pass through pvhub, if it is one of those."""
    return next((why for prefix, why in KNOWN_DIFFERENCES.items() if test_id.startswith(prefix)), None)


def _free_server_ports(count: int) -> list[int]:
    """Distinct ports free for both TCP and UDP on loopback (a CA server binds the number
    for both)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_tcp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class FileResult:
    """How one of ophyd's test files went: ``{test id: outcome}``, what was run again, the
    output of the first run, and how long it all took."""

    name: str
    outcomes: dict[str, str]
    output: str
    seconds: float
    rerun: dict[str, str] = field(default_factory=dict)

    def passed(self) -> set[str]:
        return {test for test, outcome in self.outcomes.items() if outcome == "passed"}


class ShippedRun:
    """The IOCs, daemon and environment that ophyd's test files run in; a context manager."""

    def __init__(self, layer: str, workdir: Path | None = None, lanes: int = 2) -> None:
        if layer not in ("caproto", "pvhub"):
            raise ValueError(f"layer must be 'caproto' or 'pvhub', not {layer!r}")
        self.layer = layer
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ophyd-shipped-"))
        self.lanes = lanes
        self.server_ports = _free_server_ports(SERVER_PORTS * lanes)
        self._free_lanes: queue.SimpleQueue[int] = queue.SimpleQueue()
        for lane in range(lanes):
            self._free_lanes.put(lane)
        self._runs = itertools.count()
        self._sink: socket.socket | None = None
        self.motor_ioc: SimulatedIOC | None = None
        self.sim_motors_ioc: SimulatedIOC | None = None
        self.daemon: DaemonProcess | None = None

    def __enter__(self) -> ShippedRun:
        try:
            self._sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sink.bind((LOOPBACK, 0))
            self.motor_ioc = SimulatedIOC(
                "tests.ophyd_shipped.motorsim_ioc", prefix=MOTOR_PREFIX, ready_pv="Mtr", cwd=REPO_ROOT
            ).start()
            self.sim_motors_ioc = SimulatedIOC(
                "caproto.ioc_examples.fake_motor_record", prefix="sim:", ready_pv="mtr1"
            ).start()
            if self.layer == "pvhub":
                directory = self.workdir / "daemon"
                directory.mkdir(exist_ok=True)
                self.daemon = DaemonProcess(env=self.ca_env(), directory=directory).start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        for ioc in (self.motor_ioc, self.sim_motors_ioc):
            if ioc is not None:
                ioc.stop()
        if self._sink is not None:
            self._sink.close()

    @property
    def repeater_port(self) -> int:
        assert self._sink is not None
        return self._sink.getsockname()[1]

    def ca_env(self) -> dict[str, str]:
        """What finds the tests' IOCs and the motor, and nothing else (Rule 1)."""
        assert self.motor_ioc is not None and self.sim_motors_ioc is not None
        ports = [*self.server_ports, self.motor_ioc.port, self.sim_motors_ioc.port]
        return {
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": " ".join(f"{LOOPBACK}:{port}" for port in ports),
            "EPICS_CA_REPEATER_PORT": str(self.repeater_port),
        }

    def test_env(self, lane: int = 0) -> dict[str, str]:
        ports = self.server_ports[lane * SERVER_PORTS:(lane + 1) * SERVER_PORTS]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "PVHUB_"))}
        env = {
            **inherited,
            **self.ca_env(),
            "EPICS_CA_SERVER_PORT": str(ports[0]),
            "PVHUB_SHIPPED_SERVER_PORTS": " ".join(map(str, ports)),
            "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CAS_BEACON_ADDR_LIST": f"{LOOPBACK}:{self.repeater_port}",
            "PVHUB_SHIPPED_LAYER": self.layer,
            # shim/: what caproto's IOC launcher imports and this environment lacks.
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE / "shim"), str(REPO_ROOT),
                                           os.environ.get("PYTHONPATH", "")]),
        }
        if self.daemon is not None:
            env["PVHUB_ADDRESS"] = self.daemon.address
        return env

    def run_files(self, names: list[str] | tuple[str, ...], expected: dict[str, list[str]],
                  only_expected: bool = False) -> dict[str, Future]:
        """Start every file, ``lanes`` pytest processes at a time; a future of its
        ``FileResult`` each. With ``only_expected``, only the tests of ``expected`` run, in
        chunks of ``CHUNK`` (so a long file is not the one lane everyone waits for)."""
        pool = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="ophyd-shipped")
        futures = {}
        for name in names:
            wanted = set(expected.get(name, ()))
            if only_expected and wanted:
                ids = sorted(wanted)
                groups = [[str(OPHYD_TESTS / t) for t in ids[i:i + CHUNK]] for i in range(0, len(ids), CHUNK)]
            else:
                groups = [[str(OPHYD_TESTS / name)]]
            futures[name] = self._start_file(pool, name, groups, wanted)
        pool.shutdown(wait=False)
        return futures

    def _start_file(self, pool: ThreadPoolExecutor, name: str, groups: list[list[str]],
                    wanted: set[str]) -> Future:
        """Run ``groups`` of one file's targets in the pool; once all are done, run again the
        wanted tests that did not pass (Rule 4), and finish the returned future."""
        finished: Future = Future()
        start = time.monotonic()
        parts = [pool.submit(self._pytest, name, targets) for targets in groups]
        left = [len(parts)]
        lock = threading.Lock()

        def part_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                result = FileResult(name, {}, "", 0.0)
                for part in parts:
                    outcomes_, output = part.result()
                    result.outcomes.update(outcomes_)
                    result.output += output
                again = sorted(t for t in wanted
                               if result.outcomes.get(t) != "passed" and known_difference(t) is None)
                if again:
                    rerun, more = self._pytest(name, [str(OPHYD_TESTS / t) for t in again])
                    result.rerun = {t: rerun.get(t, "not run") for t in again}
                    result.outcomes.update({t: o for t, o in result.rerun.items() if o == "passed"})
                    result.output += "\n--- run again ---\n" + more
                result.seconds = time.monotonic() - start
                finished.set_result(result)
            except BaseException as exc:  # the caller sees it from the future
                finished.set_exception(exc)

        for part in parts:
            part.add_done_callback(part_done)
        return finished

    def _pytest(self, name: str, targets: list[str],
                timeout: float = FILE_TIMEOUT) -> tuple[dict[str, str], str]:
        """pytest on ``targets`` (files or test ids) in the next free lane; ``({test id:
        outcome}, its output)``."""
        lane = self._free_lanes.get()
        try:
            return self._pytest_in_lane(name, targets, lane, timeout)
        finally:
            self._free_lanes.put(lane)

    def _pytest_in_lane(self, name: str, targets: list[str], lane: int,
                        timeout: float) -> tuple[dict[str, str], str]:
        report = self.workdir / f"{name}.{self.layer}.{next(self._runs)}.xml"
        command = [
            sys.executable, "-m", "pytest", *targets,
            "-p", "pvhub_layer_plugin", "-p", "no:cacheprovider",
            "-c", os.devnull, "--rootdir", str(OPHYD_TESTS),
            "-k", "not pyepics", "-q", "-rfE", "--durations=10", f"--timeout={PER_TEST_TIMEOUT}",
            f"--junitxml={report}",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, env=self.test_env(lane), cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            output, _ = process.communicate()
            output += f"\n(killed after {timeout} s)".encode()
        finally:
            _kill_group(process.pid)  # whatever the file's tests left running (Rule 2)
        text = output.decode(errors="replace")
        return (outcomes(report, name) if report.exists() else {}), text


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def outcomes(report: Path, name: str) -> dict[str, str]:
    """``{"<file>::<test>": "passed" | "failed" | "error" | "skipped"}`` from JUnit XML."""
    results: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        classname = case.get("classname", "")
        owner = classname.split(".", 1)[1] + "::" if "." in classname else ""
        test_id = f"{name}::{owner}{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        if results.get(test_id, "passed") == "passed":  # a teardown error makes a pass count less
            results[test_id] = outcome
    return results


def load_expected() -> dict[str, list[str]]:
    return json.loads(EXPECTED.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=("caproto", "pvhub"), default="pvhub")
    parser.add_argument("--write-expected", action="store_true",
                        help="record the tests that pass as expected.json (with --layer caproto)")
    parser.add_argument("--merge", action="store_true",
                        help="with --write-expected: add to expected.json instead of replacing it")
    parser.add_argument("--only-expected", action="store_true",
                        help="run only the tests expected to pass, in chunks (faster)")
    parser.add_argument("--lanes", type=int, default=2, help="files run side by side")
    parser.add_argument("files", nargs="*", default=list(FILES))
    args = parser.parse_args(argv)
    expected = {} if args.write_expected else (load_expected() if EXPECTED.exists() else {})
    passed: dict[str, list[str]] = {}
    missing = 0
    start = time.monotonic()
    with ShippedRun(args.layer, lanes=args.lanes) as run:
        for name, future in run.run_files(args.files, expected, args.only_expected).items():
            result: FileResult = future.result()
            passed[name] = sorted(result.passed())
            values = list(result.outcomes.values())
            counts = {o: values.count(o) for o in ("passed", "failed", "error", "skipped")}
            lost = sorted(t for t in set(expected.get(name, [])) - result.passed() if known_difference(t) is None)
            known = sorted(t for t in expected.get(name, []) if known_difference(t) is not None)
            if known:
                print(f"  known differences: {[(t, result.outcomes.get(t, 'not run')) for t in known]}")
            missing += len(lost)
            print(f"{name}: {counts} in {result.seconds:.1f} s; run again: {result.rerun}", flush=True)
            for test_id in lost:
                print(f"  expected to pass, did not: {test_id} ({result.outcomes.get(test_id, 'not run')})")
            if lost or not result.outcomes:
                print(result.output[-6000:])
    print(f"all files: {time.monotonic() - start:.1f} s")
    if args.write_expected:
        if args.merge and EXPECTED.exists():  # a test that passed in any baseline run counts
            for name, tests in load_expected().items():
                passed[name] = sorted(set(passed.get(name, [])) | set(tests))
        EXPECTED.write_text(json.dumps(passed, indent=1, sort_keys=True) + "\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
