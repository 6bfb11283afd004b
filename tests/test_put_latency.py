"""A put does not wait for a delayed ACK, whatever the IOC's server does with Nagle's algorithm.

caproto's IOC server leaves Nagle's algorithm on; EPICS base's rsrv turns it off. Against the
first, an actor's put used to take about 45 ms instead of 2: the IOC held the read-back's
reply behind a monitor update that our kernel acknowledged only after its delayed-ACK timer
(``actors/circuit.py``, Rule 2; ``bench/nagle_probe.py`` shows the sequence). The actor now
tells the kernel to acknowledge at once after every receipt from an IOC.

Timing is not asserted here (a shared machine makes any bound either loose or flaky); the
mechanism is: every receive on the actor's Channel Access socket is followed, on the same
thread and before anything else happens on that socket, by ``setsockopt(TCP_QUICKACK)``.
strace watches the real actor process during real puts, against both kinds of server.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from helpers import wait_until

from pvhub.client import EpicsSignal, close_hubs
from pvhub.testing import DaemonProcess
from pvhub.testing import SimulatedIOC

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

TIMEOUT = 10.0
PUTS = 20
STRACE_STOP_TIMEOUT = 10.0

# One line of strace's output for one thread (``-ff`` writes a file per thread).
_RECEIVED = re.compile(r"^recvfrom\((\d+), .*\) = (\d+)$")
# A call strace was detached from in the middle (stopping the trace) ends "<detached ...>".
_QUICKACK = re.compile(
    r"^setsockopt\((\d+), SOL_TCP, TCP_QUICKACK, \[1\], 4(\) = 0| <detached \.\.\.>)$"
)
_ANY_ON_FD = re.compile(r"^\w+\((\d+),")

# (module, the PV whose read says it is ready): caproto's server with Nagle on, and rsrv.
_IOCS = {
    "caproto": ("tests.iocs.zoo", "dt"),
    "rsrv": ("tests.iocs.rsrv", "motor"),
}


@pytest.fixture(params=sorted(_IOCS))
def ioc(request: pytest.FixtureRequest, prefix: str) -> Iterator[SimulatedIOC]:
    module, ready_pv = _IOCS[request.param]
    server = SimulatedIOC(module, prefix=prefix, ready_pv=ready_pv, cwd=REPO_ROOT)
    with server:
        yield server
    assert server.process.poll() is not None, f"{module} outlived its fixture"


@pytest.fixture
def daemon(
    ioc: SimulatedIOC, hub_factory: Callable[..., DaemonProcess], monkeypatch: pytest.MonkeyPatch
) -> Iterator[DaemonProcess]:
    """A daemon in front of ``ioc``; ``$PVHUB_ADDRESS`` points the client library at it."""
    server = hub_factory(ioc)
    monkeypatch.setenv("PVHUB_ADDRESS", server.address)
    yield server
    close_hubs()  # clients first, so that the daemon's stop is no failure to them


def _tcp_inode_to(port: int) -> set[str]:
    """Inodes of the established loopback TCP sockets whose peer port is ``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            inodes.add(inode)
    return inodes


def ca_socket_fd(pid: int, ioc_port: int) -> int | None:
    """The file descriptor of process ``pid``'s TCP connection to the IOC, if it has one."""
    inodes = _tcp_inode_to(ioc_port)
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = entry.readlink()
        except OSError:
            continue  # closed while we looked
        match = re.fullmatch(r"socket:\[(\d+)\]", str(target))
        if match and match.group(1) in inodes:
            return int(entry.name)
    return None


def actor_pid(daemon: DaemonProcess, pv: str) -> int:
    from helpers import daemon_status

    def pid() -> int | None:
        rows = {row["pv"]: row for row in daemon_status()["pvs"]}
        row = rows.get(pv)
        return row["pid"] if row and row["connected"] and row["pid"] else None

    return wait_until(pid, TIMEOUT, message=f"no connected actor for {pv}")


@contextmanager
def traced(pid: int, directory: Path) -> Iterator[Path]:
    """strace every thread of ``pid`` (receives and socket options), one file per thread.

    Yields the common prefix of the files. Skips the test where strace is missing or may not
    attach (no ptrace rights).
    """
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    output = directory / "trace"
    errors = directory / "strace.err"
    with errors.open("wb") as err:
        process = subprocess.Popen(
            [strace, "-f", "-ff", "-e", "trace=recvfrom,setsockopt", "-e", "signal=none",
             "-o", str(output), "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:

        def attached() -> bool:
            if process.poll() is not None:
                pytest.skip(f"strace could not attach: {errors.read_text(errors='replace')[-500:]}")
            # Printed once every thread is attached ("Process N attached with M threads").
            return f"Process {pid} attached" in errors.read_text(errors="replace")

        wait_until(attached, TIMEOUT, message=lambda: f"strace did not attach: {errors.read_text()}")
        yield output
    finally:
        process.send_signal(signal.SIGINT)  # strace detaches and flushes its files
        try:
            process.wait(STRACE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STRACE_STOP_TIMEOUT)


def receipts_and_acks(prefix: Path, fd: int) -> tuple[int, list[str]]:
    """How many receives with data on ``fd`` the trace holds, and those that were not followed
    at once (the next call on ``fd`` in the same thread) by ``TCP_QUICKACK``."""
    receipts, unacknowledged = 0, []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        pending: str | None = None
        for line in path.read_text(errors="replace").splitlines():
            on_fd = _ANY_ON_FD.match(line)
            if on_fd is None or int(on_fd.group(1)) != fd:
                continue
            if pending is not None:
                if _QUICKACK.match(line):
                    pending = None
                    continue
                unacknowledged.append(f"{path.name}: {pending}\n  then {line}")
                pending = None
            received = _RECEIVED.match(line)
            if received and int(received.group(2)) > 0:
                receipts += 1
                pending = line
        if pending is not None:
            # The trace ended between the receive and its acknowledgement: only stopping
            # strace can do that, so it is no finding.
            receipts -= 1
    return receipts, unacknowledged


def test_actor_acknowledges_every_receipt_from_the_ioc_at_once(daemon, ioc, prefix, tmp_path):
    if not hasattr(socket, "TCP_QUICKACK"):
        pytest.skip("TCP_QUICKACK is Linux's")
    pv = f"{prefix}motor"
    motor = EpicsSignal(pv, name="motor")
    motor.wait_for_connection(timeout=TIMEOUT)
    motor.set(0.5).wait(TIMEOUT)
    pid = actor_pid(daemon, pv)
    fd = wait_until(lambda: ca_socket_fd(pid, ioc.port), TIMEOUT, message="the actor has no CA circuit")

    values = [1.0 + i * 0.25 for i in range(PUTS)]
    with traced(pid, tmp_path) as trace:
        for value in values:
            status = motor.set(value)
            status.wait(TIMEOUT)
            assert status.success
    assert motor.get() == pytest.approx(values[-1])

    receipts, unacknowledged = receipts_and_acks(trace, fd)
    # Each put brings at least one receipt: the put's completion and the read-back's reply
    # (sent right behind the put, they often come back in one segment).
    assert receipts >= PUTS, f"only {receipts} receipts traced on fd {fd} for {PUTS} puts"
    assert unacknowledged == [], "receipts not acknowledged at once:\n" + "\n".join(unacknowledged[:10])


def test_a_trace_stopped_inside_the_acknowledgement_is_no_finding(tmp_path):
    """Stopping strace while the actor is inside ``setsockopt`` leaves the call unfinished."""
    received = 'recvfrom(15, "\\0\\17\\0\\30"..., 262144, 0, NULL, NULL) = 40'
    (tmp_path / "trace.7").write_text(
        f"{received}\nsetsockopt(15, SOL_TCP, TCP_QUICKACK, [1], 4) = 0\n"
        f"{received}\nsetsockopt(15, SOL_TCP, TCP_QUICKACK, [1], 4 <detached ...>\n"
    )
    (tmp_path / "trace.8").write_text(f"{received}\nrecvfrom(15, \"\"..., 262144, 0, NULL, NULL) = 0\n")
    receipts, unacknowledged = receipts_and_acks(tmp_path / "trace", 15)
    assert receipts == 3
    assert len(unacknowledged) == 1 and unacknowledged[0].startswith("trace.8: recvfrom")
