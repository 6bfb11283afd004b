"""Simulated IOCs: caproto IOCs run as subprocesses on loopback, for tests and ``pvhub demo``.

Rule 1: an IOC listens on 127.0.0.1 only, on a Channel Access port picked at run time, and
sends its beacons to a UDP port picked at run time, so that the IOCs of parallel tests never
meet each other and nothing reaches the site network.
Rule 2: an IOC is ready when a real Channel Access read of one of its PVs succeeds, found by a
UDP search like any client would, from the port it was given. An open TCP port proves less:
the UDP search socket is bound separately (caproto 1.3 happens to bind it first, but nothing
promises that), and when the port asked for is taken caproto silently serves on a random one.
Rule 3: nothing here reads or changes this process's ``EPICS_*`` environment. The readiness
probe speaks Channel Access to an explicit address with caproto's sans-I/O core, because
caproto's sync client reads ``os.environ`` (shared by every thread of a test run) and, unless
told ``repeater=False``, spawns a ``caproto-repeater`` that outlives us.
Rule 4: ``stop()`` leaves no process behind, whatever state ``start()`` reached.
Rule 5: a port picked here is only free when it is picked; another process may bind it before
the IOC does. Found taken (the IOC serves elsewhere; a caproto IOC exits with "Address already
in use" beside a UDP socket bound without SO_REUSEADDR; EPICS base's server, unable to bind its
UDP search socket, prints ``CAS: No TCP server started`` and suspends), the IOC is started again
on freshly picked ports, up to ``_PORT_ATTEMPTS`` times. Ports given, as in a restart on the
address clients know, are never changed: a taken one is an error.
"""

from __future__ import annotations

import getpass
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import caproto as ca

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.02
_SEARCH_RETRY_INTERVAL = 0.1
_STOP_TIMEOUT = 5.0
_LOG_TAIL_CHARS = 4000
_PORT_ATTEMPTS = 5
# What EPICS base's server prints, then suspends, when it cannot bind its ports (Rule 5).
_RSRV_NO_SERVER = "CAS: No TCP server started"
# What a caproto IOC dies of when a socket without SO_REUSEADDR holds its UDP port.
_ADDRESS_IN_USE = "Address already in use"

__all__ = [
    "LOOPBACK",
    "SimulatedIOC",
    "ca_read",
    "free_tcp_port",
    "free_udp_port",
    "merge_ca_env",
    "signal_group",
]


# --- ports -------------------------------------------------------------------------------------


def free_tcp_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody is bound to right now (the kernel's choice, so rarely reused soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_udp_port(host: str = LOOPBACK) -> int:
    """A UDP port nobody is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _free_ca_server_port(host: str = LOOPBACK) -> int:
    """A port free for both TCP and UDP: a CA server binds the same number for both.

    The UDP check matters: caproto binds its search socket with ``SO_REUSEPORT``, so two
    servers sharing a UDP number would both start and the kernel would split searches
    between them.
    """
    while True:
        port = free_tcp_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port


# --- a Channel Access read with an explicit address --------------------------------------------


def ca_read(pv: str, address: tuple[str, int], timeout: float = 2.0) -> ca.ReadNotifyResponse:
    """Read ``pv`` by searching for it at ``address`` (a server's UDP search port).

    Raises ``TimeoutError`` when nobody answers in time, ``ConnectionError`` when the server
    goes away, and caproto's ``ErrorResponseReceived`` when the server refuses the read.
    """
    deadline = time.monotonic() + timeout
    server = _search(pv, address, deadline)
    return _read_from(pv, server, deadline)


def _search(pv: str, address: tuple[str, int], deadline: float) -> tuple[str, int]:
    """The TCP address of the server that answers a search for ``pv`` sent to ``address``."""
    broadcaster = ca.Broadcaster(our_role=ca.CLIENT)
    cid = random.randint(0, 0xFFFF)
    request = broadcaster.send(
        ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
        ca.SearchRequest(pv, cid, ca.DEFAULT_PROTOCOL_VERSION),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        broadcaster.client_address = sock.getsockname()
        while True:
            # Searches are datagrams: one sent before the server bound its port is lost
            # without a trace, so repeat it until the deadline.
            sock.sendto(request, address)
            resend_at = time.monotonic() + _SEARCH_RETRY_INTERVAL
            while (now := time.monotonic()) < resend_at:
                sock.settimeout(min(resend_at - now, _remaining(deadline, f"search for {pv!r}")))
                try:
                    data, sender = sock.recvfrom(ca.MAX_UDP_RECV)
                except TimeoutError:
                    continue
                commands = broadcaster.recv(data, sender)
                broadcaster.process_commands(commands)
                for command in commands:
                    if isinstance(command, ca.SearchResponse) and command.cid == cid:
                        return ca.extract_address(command)


def _read_from(pv: str, server: tuple[str, int], deadline: float) -> ca.ReadNotifyResponse:
    """Create a channel to ``pv`` on a fresh circuit to ``server`` and read it once."""
    circuit = ca.VirtualCircuit(our_role=ca.CLIENT, address=server, priority=0)
    channel = ca.ClientChannel(pv, circuit)
    timeout = _remaining(deadline, f"connect to {server}")
    with socket.create_connection(server, timeout=timeout) as sock:
        _send(
            sock,
            circuit,
            channel.version(),
            channel.host_name(socket.gethostname()),
            channel.client_name(getpass.getuser()),
            channel.create(),
        )
        while channel.states[ca.CLIENT] is not ca.CONNECTED:
            _receive(sock, circuit, deadline, f"create channel {pv!r}")
        request = channel.read()
        _send(sock, circuit, request)
        while True:
            for command in _receive(sock, circuit, deadline, f"read {pv!r}"):
                if isinstance(command, ca.ReadNotifyResponse) and command.ioid == request.ioid:
                    return command
                if isinstance(command, ca.ErrorResponse):
                    raise ca.ErrorResponseReceived(command)


def _send(sock: socket.socket, circuit: ca.VirtualCircuit, *commands: ca.Message) -> None:
    sock.sendall(b"".join(circuit.send(*commands)))


def _receive(
    sock: socket.socket, circuit: ca.VirtualCircuit, deadline: float, doing: str
) -> list[Any]:
    sock.settimeout(_remaining(deadline, doing))
    try:
        data = sock.recv(65536)
    except TimeoutError:
        raise TimeoutError(f"timed out: {doing}") from None
    if not data:
        raise ConnectionError(f"server closed the circuit during: {doing}")
    commands, _ = circuit.recv(data)
    for command in commands:
        circuit.process_command(command)
    return commands


def _remaining(deadline: float, doing: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"timed out: {doing}")
    return remaining


# --- the IOC process ---------------------------------------------------------------------------


class SimulatedIOC:
    """A caproto IOC in a subprocess, reachable on loopback only; a context manager.

    ``module`` is run as ``python -m module --prefix P --interfaces 127.0.0.1 *args``, so any
    IOC built on caproto's ``ioc_arg_parser`` works. ``ready_pv`` is the PV (without the
    prefix) whose successful read means the IOC is ready; ``None`` settles for an open TCP
    port (see Rule 2 for why that is weaker). ``env`` adds variables for the IOC process only
    (``PYTHONPATH`` for an IOC module outside site-packages); ``cwd`` is its working
    directory. ``stdout`` receives the IOC's output instead of a temporary log file.

    ``start()`` after ``stop()`` runs a fresh IOC on the same ports, so that clients which
    found the first one (``ca_env()`` is unchanged) find the second: a restart as they would
    see it. Its PVs start again from their initial values.
    """

    def __init__(
        self,
        module: str = "caproto.ioc_examples.random_walk",
        prefix: str = "random_walk:",
        args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        python: str = sys.executable,
        stdout: IO[Any] | int | None = None,
        *,
        ready_pv: str | None = "dt",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.module = module
        self._prefix = prefix
        self.args = tuple(args)
        self.startup_timeout = startup_timeout
        self.python = python
        self.ready_pv = ready_pv
        self._stdout = stdout
        self._extra_env = dict(env or {})
        self._cwd = cwd
        self._port: int | None = None
        self._repeater_port: int | None = None
        self._beacon_sink: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_path: Path | None = None

    # -- lifecycle

    def start(self) -> SimulatedIOC:
        """Start the IOC and return once it answers Channel Access; stops it on any failure."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"{self!r} is already running")
        picked = self._port is None  # Rule 5: only ports picked here may be picked again
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._launch()
                self._wait_until_ready()
            except _PortTaken as exc:
                self.stop()
                if not picked or attempt == _PORT_ATTEMPTS:
                    raise RuntimeError(f"{exc} (attempt {attempt} of {_PORT_ATTEMPTS})") from None
                self._port = self._repeater_port = None
            except BaseException:
                self.stop()
                raise
            else:
                return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def stop(self) -> int | None:
        """Terminate the IOC (SIGTERM, then SIGKILL after 5 s); safe to call more than once.

        Returns the exit code, or ``None`` if the IOC was never started.
        """
        returncode = None
        if self._process is not None:
            returncode = _terminate(self._process, _STOP_TIMEOUT)
        if self._beacon_sink is not None:
            self._beacon_sink.close()
            self._beacon_sink = None
        if self._log_file is not None:
            # The log only explains a failed start, and start() quotes it in its error.
            self._log_file.close()
            self._log_file = None
            _started(self._log_path).unlink(missing_ok=True)
        return returncode

    def __enter__(self) -> SimulatedIOC:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatedIOC({self.module!r}, prefix={self._prefix!r}, port={self._port})"

    # -- what clients need

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def port(self) -> int:
        """The IOC's CA server port (TCP, and UDP for searches)."""
        return _started(self._port)

    @property
    def repeater_port(self) -> int:
        """The UDP port the IOC sends beacons to, which clients take as their repeater port."""
        return _started(self._repeater_port)

    @property
    def pid(self) -> int:
        return _started(self._process).pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return _started(self._process)

    @property
    def log_path(self) -> Path | None:
        """The IOC's output while it runs (removed by ``stop()``), unless ``stdout`` was given."""
        return self._log_path

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def ca_env(self) -> dict[str, str]:
        """The environment a CA client needs to find this IOC and nothing else."""
        return {
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": f"{LOOPBACK}:{self.port}",
            "EPICS_CA_REPEATER_PORT": str(self.repeater_port),
        }

    def pv(self, suffix: str) -> str:
        """The full name of one of this IOC's PVs."""
        return self._prefix + suffix

    def read(self, suffix: str, timeout: float = 2.0) -> ca.ReadNotifyResponse:
        """Read one of this IOC's PVs directly over Channel Access (bypassing any hub)."""
        return ca_read(self.pv(suffix), (LOOPBACK, self.port), timeout=timeout)

    # -- internals

    def _launch(self) -> None:
        if self._port is None:
            self._port = _free_ca_server_port()
        # Holding the beacon port bound reserves it for as long as the IOC runs, keeps the
        # IOC's beacons from bouncing back as "port unreachable" errors in its log, and
        # stops a careless client from spawning a caproto-repeater there (it finds the
        # port taken and assumes a repeater already runs). Nobody reads it: once its
        # buffer is full the kernel drops further beacons silently.
        self._beacon_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._beacon_sink.bind((LOOPBACK, self._repeater_port or 0))
        self._repeater_port = self._beacon_sink.getsockname()[1]
        output = self._stdout
        if output is None:
            self._log_file = tempfile.NamedTemporaryFile(  # closed (and removed) by stop()
                prefix=f"pvhub-ioc-{self.module.rsplit('.', 1)[-1]}-", suffix=".log", delete=False
            )
            self._log_path = Path(self._log_file.name)
            output = self._log_file
        self._process = subprocess.Popen(
            self._command(),
            env=self._environment(),
            cwd=self._cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C at the terminal reaches the parent, which
            # stops the IOC in order instead of both racing to print tracebacks.
            start_new_session=True,
        )

    def _command(self) -> list[str]:
        return [
            self.python, "-m", self.module,
            "--prefix", self._prefix, "--interfaces", LOOPBACK, *self.args,
        ]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        port, udp = str(self._port), str(self._repeater_port)
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "EPICS_CA_SERVER_PORT": port,
            "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
            "EPICS_CA_REPEATER_PORT": udp,
            "EPICS_CAS_BEACON_PORT": udp,
            "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_ADDR_LIST": LOOPBACK,
            **self._extra_env,
        }

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while True:
            returncode = self.process.poll()
            if _RSRV_NO_SERVER in self.log_text():
                raise _PortTaken(f"{self!r} could not bind its ports:\n{self._log_tail()}")
            if returncode is not None and _ADDRESS_IN_USE in self.log_text():
                raise _PortTaken(f"{self!r} could not bind its ports:\n{self._log_tail()}")
            if returncode is not None:
                raise RuntimeError(
                    f"{self!r} exited with code {returncode} during startup:\n{self._log_tail()}"
                )
            try:
                self._check_ready()
            except (OSError, ca.CaprotoError) as exc:
                last_error = exc
            else:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self!r} was not ready after {self.startup_timeout} s "
                    f"(last error: {last_error!r}):\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def _check_ready(self) -> None:
        """Return if the IOC serves; raise ``OSError`` or ``CaprotoError`` if not yet."""
        with socket.create_connection((LOOPBACK, self.port), timeout=1.0):
            pass
        if self.ready_pv is None:
            return
        name = self.pv(self.ready_pv)
        server = _search(name, (LOOPBACK, self.port), time.monotonic() + 0.5)
        if server != (LOOPBACK, self.port):
            # caproto silently takes a random port when the one asked for is taken.
            raise _PortTaken(
                f"{self!r}: {name} is served from {server}, not from port {self.port}; "
                f"did another process take the port?\n{self._log_tail()}"
            )
        _read_from(name, server, time.monotonic() + 1.0)

    def _log_tail(self) -> str:
        text = self.log_text()
        return text[-_LOG_TAIL_CHARS:] if text else "(no log captured)"


class _PortTaken(Exception):
    """Another process took the IOC's port before the IOC bound it (Rule 5)."""


def _started(value: Any) -> Any:
    if value is None:
        raise RuntimeError("the IOC has not been started")
    return value


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """Stop ``process`` and its process group: SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
    return process.wait()


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to the process group ``process`` leads (started with
    ``start_new_session``); a group already gone is not an error."""
    # The IOC leads its own process group (start_new_session), so the group id is its pid;
    # signalling the group also reaches anything the IOC itself may have spawned.
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def merge_ca_env(*iocs: SimulatedIOC) -> dict[str, str]:
    """One client environment that finds all of ``iocs``.

    The repeater port is the first IOC's: a client registers with one repeater only. No
    repeater runs there; the port only has to be one that no real repeater uses.
    """
    if not iocs:
        raise ValueError("merge_ca_env needs at least one IOC")
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": " ".join(ioc.ca_env()["EPICS_CA_ADDR_LIST"] for ioc in iocs),
        "EPICS_CA_REPEATER_PORT": str(iocs[0].repeater_port),
    }
