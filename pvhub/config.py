"""The daemon's configuration: a TOML file, every key optional.

```toml
[daemon]
address = "tcp://127.0.0.1:5570"    # where clients connect (requests; hello names readings)
readings = "tcp://127.0.0.1:5571"   # where readings are published (default: port + 1)
readings_hwm = 10000                # readings queued per client before a slow one loses some

[pvs]
allow = ["*"]                       # glob patterns; a PV that matches none is refused
start = ["random_walk:x"]           # actors started with the daemon, one process each

[groups.motors]                     # one process owns all of these PVs, started with the daemon
pvs = ["IOC:m1", "IOC:m2"]
```
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ADDRESS = "tcp://127.0.0.1:5570"
# Readings the daemon queues for one client that does not read them; past this many that
# client loses updates (and learns it from a seq gap); memory per slow client stays bounded.
DEFAULT_READINGS_HWM = 10_000

# Printable ASCII without spaces: what EPICS record and field names are made of.
_PV_NAME = re.compile(r"^[!-~]{1,256}$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """The configuration file is unreadable or says something impossible."""


@dataclass(frozen=True)
class Config:
    address: str = DEFAULT_ADDRESS
    readings: str | None = None
    readings_hwm: int = DEFAULT_READINGS_HWM
    allow: tuple[str, ...] = ("*",)
    start: tuple[str, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def allows(self, pv: str) -> bool:
        return bool(_PV_NAME.match(pv)) and any(fnmatch.fnmatchcase(pv, pat) for pat in self.allow)

    def group_of(self, pv: str) -> str | None:
        for name, pvs in self.groups.items():
            if pv in pvs:
                return name
        return None


def valid_pv_name(pv: str) -> bool:
    return bool(_PV_NAME.match(pv))


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
    known = {"daemon", "pvs", "groups"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}")
    for section in known & set(data):
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
    daemon = data.get("daemon", {})
    pvs = data.get("pvs", {})
    groups_raw = data.get("groups", {})
    address = _string(daemon.get("address", DEFAULT_ADDRESS), "daemon.address", source)
    readings = daemon.get("readings")
    if readings is not None:
        readings = _string(readings, "daemon.readings", source)
    hwm = daemon.get("readings_hwm", DEFAULT_READINGS_HWM)
    if not isinstance(hwm, int) or isinstance(hwm, bool) or hwm < 1:
        raise ConfigError(f"{source}: daemon.readings_hwm must be a positive integer")
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
    return Config(address=address, readings=readings, readings_hwm=hwm, allow=allow, start=start, groups=groups)


def _string(value: object, key: str, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty string")
    return value


def _strings(value: object, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {key} must be a list of strings")
    return value
