"""The systemd deployment in ``deploy/``: the unit passes systemd's own checks, its sandbox
lets the daemon do its work, and the example config and the unit's command line are what
pvhub reads.

Rule 1: systemd's tools judge the unit (``systemd-analyze verify`` and ``security``); where
they are missing the tests are skipped and say why, they never pass by default.
Rule 2: the sandbox is tried on the real daemon. No service manager runs here, so the part
of the unit that is seccomp (``SystemCallFilter=``, ``SystemCallErrorNumber=``,
``RestrictAddressFamilies=``, ``MemoryDenyWriteExecute=``, ``RestrictRealtime=``) is built
from the unit's own lines with libseccomp, as systemd 252 builds it, around a real
``pvhub serve`` with actors talking to a real IOC. Namespaces, mounts and the dynamic user
are not emulated: they hide files, and the daemon reads only its venv and its config.
Run as a script, this file is that launcher: ``python test_deploy.py --sandbox SPEC -- CMD``.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from helpers import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT = REPO_ROOT / "deploy" / "pvhub.service"
EXAMPLE_CONFIG = REPO_ROOT / "deploy" / "pvhub.toml"
DEPLOY_README = REPO_ROOT / "deploy" / "README.md"
# Where deploy/README.md installs things; the unit names them.
INSTALLED_PVHUB = "/opt/pvhub/venv/bin/pvhub"
INSTALLED_CONFIG = "/etc/pvhub/pvhub.toml"
MAX_EXPOSURE = 2.0  # systemd-analyze security's "overall exposure level"; lower is better

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
LIBSECCOMP = ctypes.util.find_library("seccomp") if sys.platform == "linux" else None

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)
needs_libseccomp = pytest.mark.skipif(
    LIBSECCOMP is None, reason="libseccomp is not installed (Debian: apt-get install libseccomp2)"
)


# --- the unit file ------------------------------------------------------------------------------


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` for every assignment, in order (systemd keys repeat)."""
    settings = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit_settings(UNIT.read_text()) if (s, k) == (section, key)]


def value(key: str, section: str = "Service") -> str:
    found = values(key, section)
    assert len(found) == 1, f"{key}= appears {len(found)} times in [{section}]"
    return found[0]


def seconds(timespan: str) -> float:
    """A systemd time span as the unit writes them here ("15", "15s", "2min")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|min)?", timespan)
    assert match, f"not a time span this test understands: {timespan!r}"
    return float(match[1]) * {"ms": 0.001, None: 1, "s": 1, "sec": 1, "min": 60}[match[2]]


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    # None of the caller's SYSTEMD_* settings (log level, colours, pager): the output must
    # mean the same on every machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0", LC_ALL="C.UTF-8")
    return subprocess.run(
        [SYSTEMD_ANALYZE, "--no-pager", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def unit_runnable_here(directory: Path) -> Path:
    """The unit, with ExecStart= pointing at this venv's ``pvhub`` instead of /opt's:
    ``verify`` checks that the program exists, and /opt/pvhub is not installed here."""
    pvhub = Path(sys.executable).with_name("pvhub")
    if not pvhub.exists():
        pytest.skip(f"no pvhub console script next to {sys.executable}")
    text = UNIT.read_text()
    assert INSTALLED_PVHUB in text
    unit = directory / UNIT.name
    unit.write_text(text.replace(INSTALLED_PVHUB, str(pvhub)))
    return unit


@needs_systemd_analyze
def test_systemd_analyze_verify_says_nothing(tmp_path: Path) -> None:
    result = systemd_analyze("verify", "--man=no", str(unit_runnable_here(tmp_path)))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
def test_verify_does_speak_up_about_a_mistake(tmp_path: Path) -> None:
    """The test above is worth something: an unknown key is only a warning (exit code 0),
    so it is the silence that is checked."""
    unit = unit_runnable_here(tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchDogSec=10\n"))
    result = systemd_analyze("verify", "--man=no", str(unit))
    assert "Unknown key 'WatchDogSec'" in result.stderr


@needs_systemd_analyze
def test_security_exposure_is_low() -> None:
    result = systemd_analyze("security", "--offline=true", str(UNIT))
    assert result.stderr == ""
    match = re.search(r"Overall exposure level for pvhub\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_exec_start_is_a_serve_command_line_pvhub_accepts() -> None:
    from pvhub import cli

    argv = shlex.split(value("ExecStart"))
    assert argv[0] == INSTALLED_PVHUB
    args = cli._parser().parse_args(argv[1:])
    assert args.command == "serve" and args.func is cli._serve
    assert args.config == INSTALLED_CONFIG
    # The program is the console script pip installs into the venv.
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[Path(argv[0]).name] == "pvhub.cli:main"


def test_the_readme_installs_what_the_unit_runs() -> None:
    readme = DEPLOY_README.read_text()
    for path in (INSTALLED_PVHUB.removesuffix("/bin/pvhub"), INSTALLED_CONFIG, "/etc/systemd/system"):
        assert path in readme


def test_the_unit_leaves_the_daemon_time_to_stop() -> None:
    """SIGTERM: the daemon lets puts in flight finish, then stops its actors (SIGTERM, SIGKILL
    at a deadline). systemd's SIGKILL must not come first."""
    from pvhub.daemon import broker, supervisor

    grace = getattr(broker, "STOP_GRACE_S", 0.0)
    actors = inspect.signature(supervisor.Supervisor.stop_all).parameters["timeout"].default
    assert seconds(value("TimeoutStopSec")) >= grace + actors + 2.0
    assert value("KillMode") == "mixed"
    # The loop pings every WatchdogSec/2, on one of its ticks.
    assert seconds(value("WatchdogSec")) / 2 >= 5 * broker.TICK_S
    assert (value("Type"), value("NotifyAccess")) == ("notify", "main")
    assert value("RuntimeDirectory") == "pvhub"


# --- the example configuration ------------------------------------------------------------------

# Each key of the file and the Config field it sets; a new setting needs a line in the example.
CONFIG_KEYS = {
    ("daemon", "address"): "address",
    ("daemon", "readings"): "readings",
    ("daemon", "readings_hwm"): "readings_hwm",
    ("daemon", "large_readings"): "large_readings",
    ("daemon", "large_readings_hwm"): "large_readings_hwm",
    ("pvs", "allow"): "allow",
    ("pvs", "start"): "start",
    ("groups", "*", "pvs"): "groups",
    ("actors", "pool_size"): "pool_size",
    ("actors", "max_pvs_per_actor"): "max_pvs_per_actor",
    ("actors", "isolate"): "isolate",
    ("daemon", "insecure"): "insecure",
    ("security", "server_key"): "security",
    ("security", "clients"): "security",
    ("access", "default"): "access",
    ("access", "groups", "*"): "access",
    ("access", "rule"): "access",
    ("limits", "max_message_bytes"): "limits",
    ("limits", "max_pvs"): "limits",
    ("limits", "max_pvs_per_client"): "limits",
    ("limits", "max_requests_in_flight"): "limits",
    ("limits", "max_request_rate"): "limits",
    ("limits", "release_unconnected_s"): "limits",
}


def example() -> dict[str, Any]:
    with EXAMPLE_CONFIG.open("rb") as f:
        return tomllib.load(f)


def leaf_keys(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, item in table.items():
        if isinstance(item, dict):
            yield from leaf_keys(item, (*prefix, key))
        else:
            yield (*prefix, key)


def without(data: dict[str, Any], key: tuple[str, ...]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    table = data
    for part in key[:-1]:
        table = table[part]
    del table[key[-1]]
    return data


def test_the_example_config_loads() -> None:
    from pvhub import config as pvhub_config

    config = pvhub_config.load(EXAMPLE_CONFIG)
    assert config == pvhub_config.parse(example())
    # What starts with the daemon must be allowed, or no client could use it.
    grouped = [pv for pvs in config.groups.values() for pv in pvs]
    assert [pv for pv in (*config.start, *grouped) if not config.allows(pv)] == []


def test_every_key_of_the_example_is_read() -> None:
    """``parse`` ignores keys it does not know, so a misspelt key would load; taking each key
    away must change the Config."""
    from pvhub.config import ConfigError, parse

    data = example()
    config = parse(data)
    keys = list(leaf_keys(data))
    assert keys
    for key in keys:
        try:
            changed = parse(without(data, key)) != config
        except ConfigError:
            changed = True  # a key the rest needs (server_key without clients...) is read too
        # access.default shows its default value ("read"); [access] refuses unknown keys.
        assert changed or key == ("access", "default"), f"{'.'.join(key)} changes nothing"


def test_the_example_shows_every_setting() -> None:
    from pvhub.config import Config

    assert {f.name for f in dataclasses.fields(Config)} == set(CONFIG_KEYS.values())
    def general(key: tuple[str, ...]) -> tuple[str, ...]:
        if key[0] == "groups":
            return ("groups", "*", key[-1])
        if key[:2] == ("access", "groups"):
            return ("access", "groups", "*")
        return key

    shown = {general(key) for key in leaf_keys(example())}
    # A secure example shows `insecure` only in a comment.
    assert shown == set(CONFIG_KEYS) - {("daemon", "insecure")}
    assert "\n#insecure = true\n" in EXAMPLE_CONFIG.read_text()


# --- the sandbox, on the real daemon ------------------------------------------------------------


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls a ``SystemCallFilter=`` word stands for (``@group`` or a name)."""
    if not name.startswith("@"):
        return frozenset([name])
    result = systemd_analyze("syscall-filter", name)
    assert result.returncode == 0, result.stderr
    found: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            found |= syscall_group(word)
    return frozenset(found)


def sandbox_spec(drop_families: tuple[str, ...] = (), drop_syscalls: tuple[str, ...] = ()) -> dict:
    """The unit's seccomp settings, resolved as systemd resolves them."""
    filters = values("SystemCallFilter")
    assert filters and not filters[0].startswith("~"), "expected an allow-list"
    allowed = set(syscall_group("@default"))  # systemd adds it to every allow-list
    for line in filters:
        words = line.removeprefix("~").split()
        named = set().union(*(syscall_group(word) for word in words))
        allowed = allowed - named if line.startswith("~") else allowed | named
    assert value("SystemCallErrorNumber") == "EPERM"
    assert value("SystemCallArchitectures") == "native"
    families = [f for f in value("RestrictAddressFamilies").split() if f not in drop_families]
    return {
        "syscalls": sorted(allowed - set(drop_syscalls)),
        "families": [int(getattr(socket, family)) for family in families],
        "memory_deny_write_execute": value("MemoryDenyWriteExecute") == "yes",
        "restrict_realtime": value("RestrictRealtime") == "yes",
        "umask": int(value("UMask"), 8),
        "environment": dict(
            assignment.split("=", 1) for line in values("Environment") for assignment in shlex.split(line)
        ),
    }


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET, read when asked (the daemon's sends never block)."""

    def __init__(self) -> None:
        self.address = f"@pvhub-deploy-test-{uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def wait_for(self, state: str, timeout: float, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(state in m.split("\n") for m in self.messages):
                return True
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                if process.poll() is not None:
                    timeout = 0.2  # it has exited: read what it left, then give up
                    deadline = min(deadline, time.monotonic() + timeout)
        return any(state in m.split("\n") for m in self.messages)

    def close(self) -> None:
        self.sock.close()


class SandboxedDaemon:
    """``pvhub serve`` started through this file's launcher, in a process group of its own."""

    def __init__(self, spec: dict, ioc_env: dict[str, str], directory: Path, config: Path) -> None:
        from pvhub.testing import LOOPBACK, free_tcp_port

        self.address = f"tcp://{LOOPBACK}:{free_tcp_port()}"
        self.notify = NotifyListener()
        self.log_path = directory / "daemon.log"
        self._runtime = tempfile.TemporaryDirectory(prefix="pvhub-run-")  # short: ipc paths
        spec_path = directory / "sandbox.json"
        spec_path.write_text(json.dumps(spec))
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("EPICS_", "NOTIFY_", "WATCHDOG_"))
        }
        env = {
            **inherited,
            **spec["environment"],  # the unit's Environment= lines, as systemd would set them
            **ioc_env,  # but our IOC, not the site's
            "NOTIFY_SOCKET": self.notify.address,
            "RUNTIME_DIRECTORY": self._runtime.name,
        }
        command = [
            sys.executable, __file__, "--sandbox", str(spec_path), "--",
            sys.executable, "-m", "pvhub", "serve",
            "--address", self.address, "--readings", f"tcp://{LOOPBACK}:*", "--config", str(config),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=directory, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            pytest.fail(f"the sandboxed daemon ignored SIGTERM:\n{self.log_text()}")

    def group_alive(self) -> bool:
        """Whether any process of its process group (the daemon, its actors) is left."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.kill_group()
        self.notify.close()
        self._runtime.cleanup()


@pytest.fixture
def sandboxed(tmp_path: Path) -> Iterator:
    daemons: list[SandboxedDaemon] = []

    def start(ioc, config_text: str, **spec_changes: tuple[str, ...]) -> SandboxedDaemon:
        config = tmp_path / f"pvhub{len(daemons)}.toml"
        config.write_text(config_text)
        directory = tmp_path / f"daemon{len(daemons)}"
        directory.mkdir()
        daemon = SandboxedDaemon(sandbox_spec(**spec_changes), ioc.ca_env(), directory, config)
        daemons.append(daemon)
        return daemon

    yield start
    from pvhub.client import close_hubs

    close_hubs()
    for daemon in daemons:
        daemon.close()


def seccomp_status(pid: int | str) -> dict[str, str]:
    """The seccomp lines of /proc/PID/status: mode, number of filters, no_new_privs."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return {key: status.get(key, "?") for key in ("Seccomp", "Seccomp_filters", "NoNewPrivs")}


@pytest.mark.system
@needs_systemd_analyze
@needs_libseccomp
def test_the_daemon_and_its_actors_work_inside_the_units_seccomp_filters(zoo_ioc, sandboxed) -> None:
    from pvhub.client import EpicsSignal, EpicsSignalRO, close_hubs

    # One actor started with the daemon, one group, and one started on demand below: each
    # is a subprocess that sets its parent-death signal (prctl) and speaks CA and ZeroMQ.
    daemon = sandboxed(
        zoo_ioc,
        f'[pvs]\nstart = ["{zoo_ioc.pv("x")}"]\n'
        f'[groups.g]\npvs = ["{zoo_ioc.pv("motor")}", "{zoo_ioc.pv("wave")}"]\n',
    )
    ready = daemon.notify.wait_for("READY=1", 30, daemon.process)
    assert ready, f"no READY=1 (exit code {daemon.process.poll()}):\n{daemon.log_text()}"
    # Seccomp mode 2 (filters): the launcher's three on top of any this test runs under.
    ours = seccomp_status("self")["Seccomp_filters"]
    expected_filters = str(int(ours) + 3) if ours.isdigit() else "?"
    assert seccomp_status(daemon.process.pid) == {
        "Seccomp": "2", "Seccomp_filters": expected_filters, "NoNewPrivs": "1",
    }  # fmt: skip

    x = EpicsSignalRO(zoo_ioc.pv("x"), name="x", address=daemon.address)
    wave = EpicsSignalRO(zoo_ioc.pv("wave"), name="wave", address=daemon.address)
    count = EpicsSignal(zoo_ioc.pv("count"), name="count", address=daemon.address)
    for sig in (x, wave, count):
        sig.wait_for_connection(timeout=15)
    assert isinstance(x.get(), float)
    assert list(wave.get()) == list(range(16))
    count.set(7).wait(timeout=10)
    assert count.get() == 7
    close_hubs()

    assert daemon.stop() == 0, daemon.log_text()
    assert daemon.notify.wait_for("STOPPING=1", 2, daemon.process)
    # The daemon waits for its actors before it exits; give the kernel a moment to reap.
    wait_until(lambda: not daemon.group_alive(), timeout=5, message="actors outlived the daemon")
    assert "Traceback" not in daemon.log_text(), daemon.log_text()


@pytest.mark.system
@needs_systemd_analyze
@needs_libseccomp
@pytest.mark.parametrize(
    ("change", "error"),
    [
        # libzmq lists the interfaces (getifaddrs, over netlink) to resolve a bind address.
        ({"drop_families": ("AF_NETLINK",)}, os.strerror(errno.EAFNOSUPPORT)),
        # libzmq sets the scheduling policy of each of its I/O threads.
        ({"drop_syscalls": ("sched_setscheduler",)}, os.strerror(errno.EPERM)),
    ],
    ids=["AF_NETLINK", "sched_setscheduler"],
)
def test_what_the_unit_allows_beyond_the_usual_is_needed(zoo_ioc, sandboxed, change, error) -> None:
    """The exceptions the unit makes are not there by habit: without either, libzmq aborts
    and the daemon dies before READY=1. Should this fail one day, drop the exception."""
    daemon = sandboxed(zoo_ioc, "", **change)
    ready = daemon.notify.wait_for("READY=1", 30, daemon.process)
    assert not ready, f"the daemon works without {change}: the unit need not allow it"
    assert daemon.process.wait(10) != 0
    assert error in daemon.log_text(), daemon.log_text()


# --- the launcher: this file run as a script ----------------------------------------------------


class _ArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_EQ, _SCMP_CMP_GE, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 4, 5, 6, 7
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
# Allowed: 0 OTHER, 3 BATCH, 5 IDLE; refused: 1 FIFO, 2 RR, 4 (reserved), 6 DEADLINE and up.
_SCHED_FIFO, _SCHED_RR, _SCHED_ISO, _SCHED_IDLE_MAX = 1, 2, 4, 5


def _errno_action(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def _sandbox_exec(spec: dict, command: list[str]) -> None:
    """Load the filters systemd would load for the unit, then exec ``command``."""
    lib = ctypes.CDLL(LIBSECCOMP or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    ]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def rule(ctx: int, action: int, name: str, *compare: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a system call of this architecture
        array = (_ArgCmp * max(1, len(compare)))(*(_ArgCmp(*c) for c in compare))
        code = lib.seccomp_rule_add_array(ctx, action, number, len(compare), array)
        if code < 0:
            raise OSError(-code, f"seccomp_rule_add({name}, {compare})")

    def load(ctx: int) -> None:
        code = lib.seccomp_load(ctx)
        lib.seccomp_release(ctx)
        if code < 0:
            raise OSError(-code, "seccomp_load")

    # RestrictAddressFamilies=: socket() of any other family fails with EAFNOSUPPORT.
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    refuse = _errno_action(errno.EAFNOSUPPORT)
    for family in range(64):
        if family not in spec["families"]:
            rule(ctx, refuse, "socket", (0, _SCMP_CMP_EQ, family, 0))
    rule(ctx, refuse, "socket", (0, _SCMP_CMP_GE, 64, 0))
    load(ctx)

    # MemoryDenyWriteExecute= and RestrictRealtime=, as systemd 252's seccomp rules.
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    eperm = _errno_action(errno.EPERM)
    if spec["memory_deny_write_execute"]:
        wx = _PROT_WRITE | _PROT_EXEC
        rule(ctx, eperm, "mmap", (2, _SCMP_CMP_MASKED_EQ, wx, wx))
        for name in ("mprotect", "pkey_mprotect"):
            rule(ctx, eperm, name, (2, _SCMP_CMP_MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        rule(ctx, eperm, "shmat", (2, _SCMP_CMP_MASKED_EQ, _SHM_EXEC, _SHM_EXEC))
    if spec["restrict_realtime"]:
        for policy in (_SCHED_FIFO, _SCHED_RR, _SCHED_ISO):
            rule(ctx, eperm, "sched_setscheduler", (1, _SCMP_CMP_EQ, policy, 0))
        rule(ctx, eperm, "sched_setscheduler", (1, _SCMP_CMP_GT, _SCHED_IDLE_MAX, 0))
    load(ctx)

    # SystemCallFilter= with SystemCallErrorNumber=EPERM; last, as it forbids seccomp() too.
    # libseccomp's filters admit the native architecture only (SystemCallArchitectures=).
    ctx = lib.seccomp_init(eperm)
    for name in spec["syscalls"]:
        rule(ctx, _SCMP_ACT_ALLOW, name)
    load(ctx)

    os.umask(spec["umask"])
    os.execv(command[0], command)


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] != "--sandbox" or sys.argv[3] != "--":
        raise SystemExit(f"usage: {sys.argv[0]} --sandbox SPEC.json -- COMMAND...")
    _sandbox_exec(json.loads(Path(sys.argv[2]).read_text()), sys.argv[4:])
