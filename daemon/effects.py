"""What the router asks the broker loop to do: one frozen dataclass per kind of effect.

Rule 1: an effect says what is to be done, never how. The router (``daemon/routing.py``)
returns effects and the broker loop (``daemon/broker.py``) carries them out; nothing here
decides anything, and nothing here does I/O.
Rule 2: effects are carried out in the order they come. ``coalesce`` may merge adoptions but
never moves a request ahead of the adoption of its PV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pvhub import protocol as p
from pvhub.errors import PvhubError


@dataclass(frozen=True)
class ToClient:
    client: bytes
    message: p.Message


@dataclass(frozen=True)
class ToActor:
    actor: str  # the incarnation's identity
    client: bytes
    payload: bytes
    request_id: int = field(default=0, compare=False)  # to answer, should the broker fail to hand it over


@dataclass(frozen=True)
class Adopt:
    """Tell the incarnation ``actor`` (an identity) that it owns ``pvs`` from now on."""

    actor: str
    pvs: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """Tell the actor process ``identity`` its ``pvs`` are no longer its own
    (``daemon/placement.py`` Rule 5)."""

    identity: str
    pvs: tuple[str, ...]


@dataclass(frozen=True)
class SpawnActor:
    actor: str
    identity: str  # the incarnation's identity at the broker (see ``placement.identity_of``)
    pvs: int = 0  # how many PVs it will adopt once ready (for the log)


@dataclass(frozen=True)
class KillActor:
    actor: str
    reason: str


@dataclass(frozen=True)
class RetireActor:
    """Stop ``actor``'s process for good: it owns no PV any more (``daemon/placement.py``
    Rule 5)."""

    actor: str
    reason: str


@dataclass(frozen=True)
class Announce:
    """Publish ``message`` on ``topic`` (a PV's, or ``HUB_TOPIC``)."""

    topic: bytes
    message: p.Message


@dataclass(frozen=True)
class ClientForgotten:
    client: bytes
    name: str
    idle: float


@dataclass(frozen=True)
class Stalled:
    seconds: float  # between two ticks


@dataclass(frozen=True)
class Quarantined:
    """PVs moved out of a process that kept dying (``daemon/placement.py`` Rule 4), to
    ``actor``."""

    pvs: tuple[str, ...]
    source: str
    actor: str


Effect = (ToClient | ToActor | Adopt | Release | SpawnActor | KillActor | RetireActor | Announce
          | ClientForgotten | Stalled | Quarantined)


def coalesce(effects: list[Effect]) -> list[Effect]:
    """``effects`` with every ``Adopt`` of one incarnation merged into its first: a burst of
    new PVs becomes one message per actor. Adopting earlier than asked is harmless, and each
    request still follows the adoption of its PV (Rule 2)."""
    merged: dict[str, list[str]] = {}
    out: list[Effect | str] = []
    for effect in effects:
        if isinstance(effect, Adopt):
            if effect.actor not in merged:
                merged[effect.actor] = []
                out.append(effect.actor)  # the first one's place
            merged[effect.actor].extend(effect.pvs)
        else:
            out.append(effect)
    return [Adopt(e, tuple(merged[e])) if isinstance(e, str) else e for e in out]


def error_reply(request_id: int, exc: PvhubError, pv: str = "") -> p.ErrorReply:
    return p.ErrorReply(id=request_id, code=exc.code, message=str(exc), pv=pv)
