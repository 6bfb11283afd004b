"""Who may read and who may write which PV: the daemon's access rules.

In the spirit of Channel Access security and the CA gateway's pvlist, ``[access]`` in the
config maps identities and PV name patterns to rights:

```toml
[access]
default = "read"              # none | read | write: what no rule decides
[access.groups]
operators = ["alice", "bob"]
[[access.rule]]
pvs = ["BL1:mono:*"]          # shell-style patterns, whole name, case-sensitive
who = ["@operators"]          # identity names, "@group", or "*"
access = "write"              # none | read | write (write includes read)
[[access.rule]]
pvs = ["SR:*"]
who = ["*"]
write = false                 # or one right alone: read = true/false, write = true/false
```

Rule 1: each right (read, write) is decided on its own, by the first rule that matches the
identity and the PV and says something about that right; when none does, ``default`` does.
Rule 2: an identity is the name of the client's CURVE key (its key file's stem), or
``ANONYMOUS`` for a client without one (loopback or an ``insecure`` daemon).
Rule 3: a decision costs O(rules) once per (identity, PV); it is then remembered in a bounded
cache, so a request costs a dictionary lookup. A reload builds new rules and a new cache.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from dataclasses import dataclass, field

ANONYMOUS = "anonymous"
LEVELS = ("none", "read", "write")
# (identity, PV) decisions remembered; past this, the oldest are forgotten (and recomputed).
CACHE_SIZE = 100_000

_IDENTITY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class AccessConfigError(ValueError):
    """``[access]`` says something impossible."""


@dataclass(frozen=True)
class Rule:
    pvs: tuple[str, ...]
    who: tuple[str, ...]  # names, "@group", "*"
    read: bool | None  # None: this rule says nothing about reading
    write: bool | None

    def names(self, identity: str, groups_of: frozenset[str]) -> bool:
        """Whether ``who`` takes in ``identity`` (a member of ``groups_of``)."""
        return any(w == "*" or w == identity or (w[0] == "@" and w[1:] in groups_of) for w in self.who)

    def matches(self, identity: str, groups_of: frozenset[str], pv: str) -> bool:
        return self.names(identity, groups_of) and any(fnmatch.fnmatchcase(pv, pattern) for pattern in self.pvs)


@dataclass
class AccessRules:
    """The rules of ``[access]``; without that section everyone may read and write (the
    daemon then listens on loopback only, or says ``insecure``)."""

    default_read: bool = True
    default_write: bool = True
    groups: dict[str, frozenset[str]] = field(default_factory=dict)  # group -> members
    rules: tuple[Rule, ...] = ()
    # Derived, not part of what the rules are: two equal rule sets compare equal whatever
    # each has cached (a reload that changes nothing must not look like a change).
    _member_of: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    def __post_init__(self) -> None:
        member_of: dict[str, set[str]] = {}
        for group, members in self.groups.items():
            for name in members:
                member_of.setdefault(name, set()).add(group)
        self._member_of = {name: frozenset(groups) for name, groups in member_of.items()}

    @property
    def open(self) -> bool:
        """Whether everyone may do everything (no rule, default write)."""
        return not self.rules and self.default_read and self.default_write

    def may_read(self, identity: str, pv: str) -> bool:
        return self._rights(identity, pv)[0]

    def may_write(self, identity: str, pv: str) -> bool:
        return self._rights(identity, pv)[1]

    def reads_everything(self, identity: str) -> bool:
        """Whether ``identity`` may read every PV whatever its name: no rule that could deny
        it reading applies to it, and the default lets it read."""
        if not self.default_read:
            return False
        groups = self._member_of.get(identity, frozenset())
        return not any(rule.read is False and rule.names(identity, groups) for rule in self.rules)

    def _rights(self, identity: str, pv: str) -> tuple[bool, bool]:
        key = (identity, pv)
        rights = self._cache.get(key)
        if rights is not None:
            return rights
        groups = self._member_of.get(identity, frozenset())
        read: bool | None = None
        write: bool | None = None
        for rule in self.rules:
            if (read is None and rule.read is not None) or (write is None and rule.write is not None):
                if rule.matches(identity, groups, pv):
                    if read is None:
                        read = rule.read
                    if write is None:
                        write = rule.write
                    if read is not None and write is not None:
                        break
        rights = (self.default_read if read is None else read, self.default_write if write is None else write)
        self._cache[key] = rights
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return rights


def _level(value: object, key: str, source: str) -> tuple[bool, bool]:
    if value not in LEVELS:
        raise AccessConfigError(f"{source}: {key} must be one of {', '.join(LEVELS)}")
    return value in ("read", "write"), value == "write"


def parse_access(table: object, source: str = "<config>") -> AccessRules:
    """``AccessRules`` from the ``[access]`` table of the config (``None``: no section)."""
    if table is None:
        return AccessRules()
    if not isinstance(table, dict):
        raise AccessConfigError(f"{source}: [access] must be a table")
    unknown = set(table) - {"default", "groups", "rule"}
    if unknown:
        raise AccessConfigError(f"{source}: unknown key(s) in [access]: {sorted(unknown)}")
    default_read, default_write = _level(table.get("default", "read"), "access.default", source)
    groups_raw = table.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise AccessConfigError(f"{source}: [access.groups] must be a table")
    groups: dict[str, frozenset[str]] = {}
    for group, members in groups_raw.items():
        if not _IDENTITY.match(group):
            raise AccessConfigError(f"{source}: group name {group!r} may hold only letters, digits, '_', '-' and '.'")
        if not isinstance(members, list) or not all(isinstance(m, str) and _IDENTITY.match(m) for m in members):
            raise AccessConfigError(f"{source}: access.groups.{group} must be a list of identity names")
        groups[group] = frozenset(members)
    rules_raw = table.get("rule", [])
    if not isinstance(rules_raw, list):
        raise AccessConfigError(f"{source}: access.rule must be an array of tables ([[access.rule]])")
    rules = []
    for number, raw in enumerate(rules_raw, 1):
        where = f"access.rule #{number}"
        if not isinstance(raw, dict):
            raise AccessConfigError(f"{source}: {where} must be a table")
        unknown = set(raw) - {"pvs", "who", "access", "read", "write"}
        if unknown:
            raise AccessConfigError(f"{source}: unknown key(s) in {where}: {sorted(unknown)}")
        pvs = raw.get("pvs")
        who = raw.get("who")
        if not isinstance(pvs, list) or not pvs or not all(isinstance(v, str) and v for v in pvs):
            raise AccessConfigError(f"{source}: {where}.pvs must be a non-empty list of patterns")
        if not isinstance(who, list) or not who or not all(isinstance(v, str) and v for v in who):
            raise AccessConfigError(f"{source}: {where}.who must be a non-empty list of identities, '@group' or '*'")
        for name in who:
            if name.startswith("@"):
                if name[1:] not in groups:
                    raise AccessConfigError(f"{source}: {where} names group {name[1:]!r}, which [access.groups] does not define")
            elif name != "*" and not _IDENTITY.match(name):
                raise AccessConfigError(f"{source}: {where}.who: {name!r} is not an identity name")
        read: bool | None = None
        write: bool | None = None
        if "access" in raw:
            if "read" in raw or "write" in raw:
                raise AccessConfigError(f"{source}: {where} gives both access and read/write; give one")
            read, write = _level(raw["access"], f"{where}.access", source)
        for right in ("read", "write"):
            if right in raw and not isinstance(raw[right], bool):
                raise AccessConfigError(f"{source}: {where}.{right} must be true or false")
        read = raw.get("read", read)
        write = raw.get("write", write)
        if read is None and write is None:
            raise AccessConfigError(f"{source}: {where} decides nothing: give access, read or write")
        rules.append(Rule(pvs=tuple(pvs), who=tuple(who), read=read, write=write))
    return AccessRules(default_read=default_read, default_write=default_write, groups=groups, rules=tuple(rules))
