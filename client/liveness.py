"""Whether the daemon is there (the ZeroMQ guide's Paranoid Pirate), without sockets or a clock.

Rule 1: no I/O. The hub's I/O thread asks ``due(now)`` what to do (say hello, ping, or count
the daemon lost), does it, and reports what happened (``hello_sent``, ``connected_at``,
``ping_sent``, ``heard``, ``lost``). Every decision is here, testable with a fake clock.
Rule 2: until a daemon answers hello, hello is said again every ``HELLO_RETRY`` seconds; at
once when a security handshake has just succeeded (``handshake_succeeded``). An answer to an
earlier hello than the last one is ignored.
Rule 3: once connected, a ping goes every ``CLIENT_HEARTBEAT_S``. Any answer from the daemon
proves it alive and makes the pings before it moot. The daemon is lost when ``LIVENESS``
pings went unanswered *and* nothing was heard for ``LIVENESS`` heartbeats: counted in pings,
not only in time, so that a process that was itself suspended (SIGSTOP, a laptop's sleep)
first asks again before it judges. A ping that could not even be sent counts as unanswered.
Rule 4: a daemon that says it is stopping still answers what it owes; it counts as lost once
nothing but pings waits for it.
Rule 5: ``connected`` is an Event: user threads wait on it, only the I/O thread sets it.
Rule 6: a ping carries the full list of PVs the process follows (for ``pvhub status``) when
it changed, at most once per ``max(1 s, channels / PVS_REPORTED_PER_S)``: a process that opens
channels one by one does not send its ten thousand names every second. When the daemon asks
for the list (it forgot this client), or on a new connection, it goes with the next ping.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Collection

from pvhub import protocol as p

HELLO_RETRY = 0.1
# Rule 6: names of followed PVs a client sends per second, at most, in the long run.
PVS_REPORTED_PER_S = 1000


@dataclass(frozen=True)
class SayHello:
    pass


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Lose:
    reason: str


Action = SayHello | Ping | Lose | None


class Liveness:
    """The state of Rules 2-4 for one hub."""

    def __init__(self) -> None:
        self.connected = threading.Event()  # Rule 5
        self.stopping = False  # the daemon said it is stopping (Rule 4)
        self.losses = 0
        self.pings: set[int] = set()  # unanswered pings' request ids
        self.unanswered = 0  # pings sent (or tried) since the daemon last said anything
        self.last_heard = 0.0
        self._last_ping = 0.0
        self._last_hello = -math.inf  # the first hello goes at once
        self._hello_id: int | None = None
        self._pvs_changed = True
        self._pvs_wanted = True  # Rule 6: the list goes with the next ping, however soon
        self._next_pvs_report = -math.inf

    def next_due(self) -> float:
        """When ``due`` may next have something to do (Rules 2, 3)."""
        if not self.connected.is_set():
            return self._last_hello + HELLO_RETRY
        return self._last_ping + p.CLIENT_HEARTBEAT_S

    def due(self, now: float, waiting_besides: Callable[[Collection[int]], bool]) -> Action:
        """What to do at ``now``. ``waiting_besides(ids)``: whether any request other than
        those still waits for the daemon (asked only once it said it is stopping)."""
        if not self.connected.is_set():
            return SayHello() if now - self._last_hello >= HELLO_RETRY else None
        if self.stopping and not waiting_besides(self.pings):
            return Lose("the daemon stopped")
        if self.unanswered >= p.LIVENESS and now - self.last_heard > p.LIVENESS * p.CLIENT_HEARTBEAT_S:
            return Lose(f"{self.unanswered} pings unanswered, nothing heard for {now - self.last_heard:.1f} s")
        if now - self._last_ping >= p.CLIENT_HEARTBEAT_S:
            return Ping()
        return None

    # --- what happened ------------------------------------------------------------------

    def handshake_succeeded(self) -> None:
        """The daemon is reachable now: if not connected, say hello at once (Rule 2)."""
        if not self.connected.is_set():
            self._last_hello = -math.inf

    def hello_sent(self, request_id: int, now: float) -> int | None:
        """A hello left at ``now``; the earlier attempt it replaces (None: none), whose
        answer no longer counts."""
        self._last_hello = now
        replaced, self._hello_id = self._hello_id, request_id
        return replaced

    def is_current_hello(self, request_id: int) -> bool:
        return request_id == self._hello_id

    def stopping_announced(self) -> None:
        """The daemon said it is stopping (Rule 4)."""
        self.stopping = True

    def ended(self) -> None:
        """The I/O thread is gone: not connected, whatever the daemon does."""
        self.connected.clear()

    def connected_at(self, now: float) -> None:
        """The daemon answered the current hello."""
        self.last_heard = self._last_ping = now
        self._pvs_changed = self._pvs_wanted = True
        self.connected.set()

    def take_pvs_change(self, now: float, channels: int) -> bool:
        """Whether the ping at ``now`` carries the PVs followed (Rule 6; ``channels``: how
        many there are); if so the flags are cleared, and a change from now on goes later."""
        if not self._pvs_changed or (not self._pvs_wanted and now < self._next_pvs_report):
            return False
        self._pvs_changed = self._pvs_wanted = False
        self._next_pvs_report = now + max(1.0, channels / PVS_REPORTED_PER_S)
        return True

    def ping_sent(self, request_id: int, now: float, sent: bool, with_pvs: bool) -> None:
        """A ping was tried at ``now``; ``sent``: whether it left. PVs that did not leave
        go with the next one."""
        self._last_ping = now
        self.unanswered += 1  # Rule 3: one that cannot even be sent is unanswered too
        if sent:
            self.pings.add(request_id)
        elif with_pvs:
            self._pvs_changed = self._pvs_wanted = True

    def pvs_changed(self, wanted: bool = False) -> None:
        """The PVs followed changed (any thread may say so), or ``wanted``: the daemon asked
        for them (Rule 6)."""
        if wanted:
            self._pvs_wanted = True
        self._pvs_changed = True

    def heard(self, now: float) -> set[int]:
        """The daemon said something (Rule 3); the pings it made moot, to forget."""
        self.last_heard = now
        moot, self.pings = self.pings, set()
        self.unanswered = 0
        return moot

    def lost(self) -> bool:
        """The daemon is gone; whether it was connected until now."""
        if not self.connected.is_set():
            return False
        self.losses += 1
        self.connected.clear()
        self.stopping = False
        self.pings.clear()
        self.unanswered = 0
        return True
