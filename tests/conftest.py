"""Fixtures for pvhub's tests: random PV prefixes, simulated IOCs and real daemons.

Rule 1: everything runs on loopback, on ports chosen at run time, under a PV prefix that no
other test uses, so tests can run side by side and never touch a site's IOCs.
Rule 2: readiness is a real condition polled against a deadline (a CA read, systemd's
``READY=1``), never a sleep.
Rule 3: a test leaves no process behind; teardown checks, kills what is left by its pid, and
fails the test.
Rule 4: a failing test that started a daemon shows that daemon's log in its report.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from uuid import uuid4

import pytest

from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC, free_udp_port, merge_ca_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DAEMON_READY_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 10.0
# How long the processes a daemon started may outlive it (their parent's exit reaches them
# as a closed socket or a signal, not instantly).
CHILDREN_EXIT_TIMEOUT = 5.0

_DAEMON_LOGS = pytest.StashKey[list[Path]]()


# --- PV names and IOCs -------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A PV prefix of this test's own, so that no two tests ever see each other's PVs."""
    return f"t{uuid4().hex[:8]}:"


@pytest.fixture
def zoo_ioc(prefix: str) -> Iterator[SimulatedIOC]:
    """``tests/iocs/zoo.py`` under ``prefix``, ready when ``{prefix}dt`` reads."""
    ioc = SimulatedIOC("tests.iocs.zoo", prefix=prefix, ready_pv="dt", cwd=REPO_ROOT)
    with ioc:
        yield ioc
    assert ioc.process.poll() is not None, "the zoo IOC outlived its fixture"


@pytest.fixture
def walk_ioc(prefix: str) -> Iterator[SimulatedIOC]:
    """caproto's random_walk example, under ``prefix + "walk:"``.

    Its own sub-prefix lets it run beside ``zoo_ioc``, which also serves ``dt`` and ``x``:
    two IOCs answering for one name would leave which one a client reaches to chance.
    """
    ioc = SimulatedIOC(
        "caproto.ioc_examples.random_walk", prefix=f"{prefix}walk:", ready_pv="dt"
    )
    with ioc:
        yield ioc
    assert ioc.process.poll() is not None, "the random_walk IOC outlived its fixture"


# --- the daemon --------------------------------------------------------------------------------


@pytest.fixture
def hub_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real ``pvhub serve`` processes: ``hub_factory(*iocs, args=(), env=None)``.

    Each daemon reaches only ``iocs``, listens on a fresh loopback port, logs JSON to a file
    in ``tmp_path``, and is ready when it sends ``READY=1`` to a notify socket of its own.
    At teardown every daemon is stopped, and every process it started must be gone too.
    """
    daemons: list[DaemonProcess] = []
    request.node.stash.setdefault(_DAEMON_LOGS, [])

    def start(
        *iocs: SimulatedIOC,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = DAEMON_READY_TIMEOUT,
    ) -> DaemonProcess:
        directory = tmp_path / f"daemon{len(daemons)}"
        directory.mkdir()
        daemon = DaemonProcess(
            env={**_ca_environment(iocs), **(env or {})},
            args=args,
            directory=directory,
            startup_timeout=ready_timeout,
        )
        daemons.append(daemon)
        request.node.stash[_DAEMON_LOGS].append(daemon.log_path)
        try:
            return daemon.start()
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(str(exc), pytrace=False)

    yield start

    problems = [problem for daemon in daemons if (problem := _tear_down(daemon))]
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def hub(
    zoo_ioc: SimulatedIOC,
    hub_factory: Callable[..., DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[DaemonProcess]:
    """One daemon serving ``zoo_ioc``; ``$PVHUB_ADDRESS`` points the client library at it.

    ``zoo_ioc`` comes first so that pytest, tearing down in reverse, stops the daemon before
    the IOC (a test that asks for both fixtures itself should name them in that order too).
    Its pool is one process: the zoo's PVs share one prefix, so the default placement puts
    them all in one pooled process anyway, and a second would only cost every test its start
    (the pool's own tests start daemons of their own).
    """
    config = tmp_path / "one-pooled-process.toml"
    config.write_text("[actors]\npool_size = 1\n")
    daemon = hub_factory(zoo_ioc, args=["--config", str(config)])
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    yield daemon
    from pvhub.client import close_hubs

    # Clients go first, so that the daemon's stop is not mistaken by them for a failure.
    close_hubs()


def _ca_environment(iocs: Sequence[SimulatedIOC]) -> dict[str, str]:
    """What finds ``iocs`` and nothing else (``DaemonProcess`` inherits no ``EPICS_*``)."""
    return merge_ca_env(*iocs) if iocs else _no_ioc_ca_env()


def _no_ioc_ca_env() -> dict[str, str]:
    # An empty address list makes caproto fall back to broadcasting on every interface,
    # so a daemon without IOCs searches a loopback port where nobody answers instead.
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": f"127.0.0.1:{free_udp_port()}",
        "EPICS_CA_REPEATER_PORT": str(free_udp_port()),
    }


def _tear_down(daemon: DaemonProcess) -> str | None:
    """Stop ``daemon`` and make sure all it started is gone; what went wrong, if anything."""
    if daemon.process is None:
        return None
    started = _descendants(daemon.pid)
    problems = []
    try:
        daemon.stop(DAEMON_STOP_TIMEOUT)
    except TimeoutError as exc:
        problems.append(str(exc))
    deadline = time.monotonic() + CHILDREN_EXIT_TIMEOUT
    while (left := _still_running(started, daemon.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        for pid, _ in left:
            _kill(pid)
        problems.append(
            f"processes started by the daemon outlived it (killed now): "
            f"{sorted(pid for pid, _ in left)}\n{daemon.log_text()}"
        )
    return "\n".join(problems) or None


# --- processes, from /proc ---------------------------------------------------------------------
# A process is named by (pid, start time): a pid alone may be reused by an unrelated process
# between the moment we list it and the moment we look again.

ProcessId = tuple[int, int]


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, process group, start time) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> set[ProcessId]:
    """Every living process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
            starts[pid] = stat[3]
    found: set[ProcessId] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add((child, starts[child]))
            stack.append(child)
    return found


def _still_running(started: set[ProcessId], group: int) -> set[ProcessId]:
    """Those of ``started``, and of process group ``group``, that have not exited."""
    running = set()
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        if (pid, stat[3]) in started or stat[2] == group:
            running.add((pid, stat[3]))
    return running


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --- reports -----------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the log of every daemon a failing test started to its report (Rule 4)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for path in item.stash.get(_DAEMON_LOGS, []):
            if path.exists():
                report.sections.append(
                    (f"pvhub daemon log ({path.parent.name})", path.read_text(errors="replace"))
                )
