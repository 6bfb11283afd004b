"""The daemon's configuration: a TOML file, every key optional.

```toml
[daemon]
address = "tcp://127.0.0.1:5570"    # where clients connect (requests; hello names readings)
readings = "tcp://127.0.0.1:5571"   # where readings are published (default: port + 1)
readings_hwm = 10000                # readings queued per client before a slow one loses some
large_readings = "tcp://127.0.0.1:5572"  # where arrays of 64 KiB or more are (readings' port + 1)
large_readings_hwm = 16             # large readings queued per client before a slow one loses some

[actors]
pool_size = 4                       # pooled actor processes started with the daemon
                                    # (default: the CPU count, at least 2; 0: a process per PV)
max_pvs_per_actor = 2500            # a pooled process takes no more; the pool grows past it
isolate = ["IOC:fragile*"]          # glob patterns: PVs that get a process of their own

[pvs]
allow = ["*"]                       # glob patterns; a PV that matches none is refused
start = ["random_walk:x"]           # PVs connected when the daemon starts (READY waits)

[groups.motors]                     # one process owns all of these PVs, started with the daemon
pvs = ["IOC:m1", "IOC:m2"]

[security]                          # CurveZMQ on both sockets (required off loopback)
server_key = "/etc/pvhub/keys/server.key_secret"
clients = "/etc/pvhub/clients"      # NAME.key per client allowed in; NAME is its identity

[access]                            # who may read and write what: see pvhub.access
default = "read"

[limits]                            # per daemon and per client: see ``Limits``
max_pvs_per_client = 20000
```

Rule 1: listening anywhere but loopback (or an ipc:// path) needs ``[security]``, or
``[daemon] insecure = true`` said on purpose (``exposure_problem``).
Rule 2: ``[access]``, ``[limits]`` and the clients directory may change while the daemon runs
(SIGHUP reloads them, ``reloadable``); anything else needs a restart.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from pvhub.access import AccessConfigError, AccessRules, parse_access

DEFAULT_ADDRESS = "tcp://127.0.0.1:5570"
# Readings the daemon queues for one client that does not read them; past this many that
# client loses updates (and learns it from a seq gap); memory per slow client stays bounded.
DEFAULT_READINGS_HWM = 10_000
# The same for large readings (arrays of protocol.LARGE_BYTES or more, an image each): what a
# client that stops reading costs the daemon is this many times the largest such reading,
# not ``DEFAULT_READINGS_HWM`` times (a client stopped with Ctrl-Z while it follows a
# detector's images would otherwise make the daemon hold ten thousand of them).
DEFAULT_LARGE_READINGS_HWM = 16
# A pooled actor process owns at most this many PVs: a process that dies takes its PVs down
# for a moment, and one Python process serves a few thousand updating PVs comfortably.
DEFAULT_MAX_PVS_PER_ACTOR = 2_500


def default_pool_size() -> int:
    """One pooled actor process per CPU this process may run on, at least two (so that one
    process's death or a busy IOC never holds every PV)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 2
    return max(2, cpus)

# Printable ASCII without spaces: what EPICS record and field names are made of.
_PV_NAME = re.compile(r"^[!-~]{1,256}$")
# Channel Access (EPICS 3.14 on, and caproto's client) takes record names of at most this
# many characters; caproto raises on a longer one inside its search thread, which then dies
# and takes every search of that actor process with it.
MAX_RECORD_LENGTH = 59
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """The configuration file is unreadable or says something impossible."""


@dataclass(frozen=True)
class Limits:
    """What one client, and the daemon as a whole, may hold or ask (``[limits]``).

    Each one bounds something that would otherwise grow with what clients send: past it the
    client gets a ``limit`` error for that request alone, and nobody else notices.
    """

    # Every socket: ZeroMQ drops the connection of a peer that sends a bigger message.
    max_message_bytes: int = 16 * 1024 * 1024
    # PVs the daemon holds at once (each costs an actor's channel and a few kB).
    max_pvs: int = 100_000
    # Distinct PVs one client connection has asked for.
    max_pvs_per_client: int = 20_000
    # Requests of one client sent to actors and not yet answered (a put waiting for its
    # completion counts).
    max_requests_in_flight: int = 10_000
    # Requests per second from one client, with a burst of one second's worth.
    max_request_rate: float = 10_000.0
    # A PV that found no IOC for this long, with no request waiting on it, is released: its
    # channel closed, its searches stopped. 0: never.
    release_unconnected_s: float = 300.0


@dataclass(frozen=True)
class Security:
    """``[security]``: the daemon's CURVE key pair and the directory of allowed client keys."""

    server_key: str
    clients: str


@dataclass(frozen=True)
class Config:
    address: str = DEFAULT_ADDRESS
    readings: str | None = None
    readings_hwm: int = DEFAULT_READINGS_HWM
    large_readings: str | None = None
    large_readings_hwm: int = DEFAULT_LARGE_READINGS_HWM
    allow: tuple[str, ...] = ("*",)
    start: tuple[str, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pool_size: int = field(default_factory=default_pool_size)
    max_pvs_per_actor: int = DEFAULT_MAX_PVS_PER_ACTOR
    isolate: tuple[str, ...] = ()
    insecure: bool = False
    security: Security | None = None
    access: AccessRules = field(default_factory=AccessRules)
    limits: Limits = field(default_factory=Limits)

    def isolated(self, pv: str) -> bool:
        """Whether ``pv`` gets an actor process of its own (``[actors] isolate``, or no pool)."""
        return self.pool_size == 0 or any(fnmatch.fnmatchcase(pv, pat) for pat in self.isolate)

    def allows(self, pv: str) -> bool:
        return valid_pv_name(pv) and any(fnmatch.fnmatchcase(pv, pat) for pat in self.allow)

    def __post_init__(self) -> None:
        # PV -> group, so that placing a PV costs one lookup however many groups there are.
        index = {pv: name for name, pvs in self.groups.items() for pv in pvs}
        object.__setattr__(self, "_group_index", index)
        object.__setattr__(self, "_start_set", frozenset(self.start))

    def group_of(self, pv: str) -> str | None:
        return self._group_index.get(pv)  # type: ignore[attr-defined]

    def starts_with_daemon(self, pv: str) -> bool:
        """Whether ``pv`` is in ``start`` (one lookup, however long the list)."""
        return pv in self._start_set  # type: ignore[attr-defined]


def reloadable(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``old`` with what a reload may change taken from ``new`` (Rule 2), and the names of the
    other settings that differ (ignored until a restart)."""
    ignored = [
        name for name in ("address", "readings", "readings_hwm", "large_readings", "large_readings_hwm", "allow",
                          "start", "groups", "pool_size", "max_pvs_per_actor", "isolate", "insecure")
        if getattr(old, name) != getattr(new, name)
    ]
    if (old.security is None) != (new.security is None) or (
            old.security and new.security and old.security.server_key != new.security.server_key):
        ignored.append("security.server_key")
    security = old.security
    if old.security is not None and new.security is not None:
        security = replace(old.security, clients=new.security.clients)
    if old.limits.max_message_bytes != new.limits.max_message_bytes:
        ignored.append("limits.max_message_bytes")
    limits = replace(new.limits, max_message_bytes=old.limits.max_message_bytes)
    return replace(old, access=new.access, limits=limits, security=security), ignored


def is_local(address: str) -> bool:
    """Whether ``address`` can be reached from this host only: loopback TCP, or ipc."""
    parts = urlsplit(address)
    if parts.scheme == "ipc":
        return True
    if parts.scheme != "tcp":
        return False
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a host name: not known to be loopback


def exposure_problem(config: Config, *addresses: str | None) -> str | None:
    """Why the daemon must not listen on ``addresses`` with ``config`` (Rule 1), or None."""
    exposed = [a for a in addresses if a and not is_local(a)]
    if not exposed or config.security is not None or config.insecure:
        return None
    return (f"{', '.join(exposed)} is reachable from other hosts, and without CURVE anyone there could read "
            f"and write every allowed PV: give [security] server_key and clients (see docs/security.md), "
            f"listen on loopback, or say [daemon] insecure = true")


def default_large_readings_address(readings: str) -> str:
    """Large readings next to readings: TCP port + 1 (any port for ``*``), or
    ``<path>.large`` for IPC."""
    scheme, _, rest = readings.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme == "tcp" and colon and port == "*":
        return readings
    if scheme == "tcp" and colon and port.isdigit():
        return f"tcp://{host}:{int(port) + 1}"
    return readings + ".large"


def valid_pv_name(pv: str) -> bool:
    """Printable ASCII without spaces, at most 256 characters, a record name Channel Access takes."""
    return bool(_PV_NAME.match(pv)) and len(pv.partition(".")[0]) <= MAX_RECORD_LENGTH


def load(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse(data, source=str(path))


def parse(data: dict, source: str = "<config>") -> Config:
    known = {"daemon", "pvs", "groups", "actors", "security", "access", "limits"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
    for section in known & set(data) - {"access"}:
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
    daemon = data.get("daemon", {})
    pvs = data.get("pvs", {})
    groups_raw = data.get("groups", {})
    actors = data.get("actors", {})
    unknown_keys = set(actors) - {"pool_size", "max_pvs_per_actor", "isolate"}
    if unknown_keys:
        raise ConfigError(f"{source}: unknown key(s) in [actors]: {sorted(unknown_keys)}")
    pool_size = actors.get("pool_size", default_pool_size())
    if not isinstance(pool_size, int) or isinstance(pool_size, bool) or not 0 <= pool_size <= 256:
        raise ConfigError(f"{source}: actors.pool_size must be an integer from 0 to 256")
    max_pvs = actors.get("max_pvs_per_actor", DEFAULT_MAX_PVS_PER_ACTOR)
    if not isinstance(max_pvs, int) or isinstance(max_pvs, bool) or max_pvs < 1:
        raise ConfigError(f"{source}: actors.max_pvs_per_actor must be a positive integer")
    isolate = tuple(_strings(actors.get("isolate", []), "actors.isolate", source))
    address = _string(daemon.get("address", DEFAULT_ADDRESS), "daemon.address", source)
    readings = daemon.get("readings")
    if readings is not None:
        readings = _string(readings, "daemon.readings", source)
    large_readings = daemon.get("large_readings")
    if large_readings is not None:
        large_readings = _string(large_readings, "daemon.large_readings", source)
    unknown_keys = set(daemon) - {"address", "readings", "readings_hwm", "large_readings", "large_readings_hwm",
                                  "insecure"}
    if unknown_keys:
        raise ConfigError(f"{source}: unknown key(s) in [daemon]: {sorted(unknown_keys)}")
    insecure = daemon.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{source}: daemon.insecure must be true or false")
    hwm = daemon.get("readings_hwm", DEFAULT_READINGS_HWM)
    if not isinstance(hwm, int) or isinstance(hwm, bool) or hwm < 1:
        raise ConfigError(f"{source}: daemon.readings_hwm must be a positive integer")
    large_hwm = daemon.get("large_readings_hwm", DEFAULT_LARGE_READINGS_HWM)
    if not isinstance(large_hwm, int) or isinstance(large_hwm, bool) or large_hwm < 1:
        raise ConfigError(f"{source}: daemon.large_readings_hwm must be a positive integer")
    allow = tuple(_strings(pvs.get("allow", ["*"]), "pvs.allow", source))
    start = tuple(_strings(pvs.get("start", []), "pvs.start", source))
    groups: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for name, table in groups_raw.items():
        if not _GROUP_NAME.match(name):
            raise ConfigError(f"{source}: group name {name!r} may hold only letters, digits, '_', '-' and '.'")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: groups.{name} must be a table")
        members = tuple(_strings(table.get("pvs", []), f"groups.{name}.pvs", source))
        for pv in members:
            if pv in seen:
                raise ConfigError(f"{source}: {pv} is in both groups {seen[pv]!r} and {name!r}")
            seen[pv] = name
        groups[name] = members
    for pv in (*start, *seen):
        if not valid_pv_name(pv):
            raise ConfigError(f"{source}: {pv!r} is not a valid PV name")
    try:
        access = parse_access(data.get("access"), source)
    except AccessConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return Config(address=address, readings=readings, readings_hwm=hwm, large_readings=large_readings,
                  large_readings_hwm=large_hwm, allow=allow, start=start, groups=groups,
                  pool_size=pool_size, max_pvs_per_actor=max_pvs, isolate=isolate, insecure=insecure,
                  security=_security(data.get("security"), source), access=access,
                  limits=_limits(data.get("limits", {}), source))


def _security(table: dict | None, source: str) -> Security | None:
    if table is None:
        return None
    unknown = set(table) - {"server_key", "clients"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in [security]: {sorted(unknown)}")
    for key in ("server_key", "clients"):
        if key not in table:
            raise ConfigError(f"{source}: [security] needs {key}")
    return Security(server_key=_string(table["server_key"], "security.server_key", source),
                    clients=_string(table["clients"], "security.clients", source))


def _limits(table: dict, source: str) -> Limits:
    defaults = Limits()
    values = {}
    for key, value in table.items():
        if not hasattr(defaults, key):
            raise ConfigError(f"{source}: unknown key in [limits]: {key!r}")
        wanted = type(getattr(defaults, key))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (wanted is int and not isinstance(value, int)) or value < 0 or (
                value == 0 and key != "release_unconnected_s"):
            kind = "a positive integer" if wanted is int else "a positive number"
            raise ConfigError(f"{source}: limits.{key} must be {kind}")
        values[key] = wanted(value)
    return Limits(**values)


def _string(value: object, key: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty string")
    return value


def _strings(value: object, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {key} must be a list of strings")
    return value
