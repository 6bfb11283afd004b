"""Finding names: the actor's UDP side of Channel Access, its name searches and the IOCs' beacons.

The backend (``actors/backend.py``) starts and stops the search for a channel; a server's
answer goes back to it (``found(channel, address)``), which connects to the server there.

Rule 1: searching. A name is searched at once, then again after ``MIN_RETRY`` seconds,
doubling up to ``MAX_RETRY`` (caproto's client settings, from the same environment
variables), until a server answers; a name whose circuit or channel drops starts again from
the shortest interval. Searches wait in a heap by due time, so a tick costs what is due, not
what is searched; a name's one entry that counts is the one at its ``search_due`` (a search
that could not be sent, the socket full, is due again in 10 ms, and its older entry is then
stale), so the heap holds at most a name's entries since it was last due. The first server to
answer a name gets it.
Rule 2: beacons. The search socket registers with the host's CA repeater (caRepeater or
caproto-repeater, on ``EPICS_CA_REPEATER_PORT``; again every ``REGISTER_RETRY`` seconds until
it confirms) and so hears the IOCs' beacons. A server that is new on the network sends every
name not yet found searching again at once, from the shortest interval: an IOC that comes back
is found as it starts, not at the next search up to ``MAX_RETRY`` later. ``BeaconWatch`` tells
a new server as libca does: not by its first beacon (every IOC already running is heard for
the first time within one beacon period of our start), but by a second one that came sooner
than we had been listening before the first (a starting IOC beacons fast), by beacons four
fifths of their usual interval apart or closer (it restarted), or by a gap of over 3.25 usual
intervals (its network came back); once new, not again for ``NEW_HOLDOFF_S`` (a starting
server's beacons ramp from 20 ms to 15 s apart, and every step would look new). A beacon
number just before, equal to, or two or three past the last is a duplicate route's copy and
is not counted (CA 4.10 on: older servers number none). "We had been listening" counts from
the repeater's confirmation. At most one such search per
``BEACON_SEARCH_GAP``, so a network of starting IOCs costs a few searches a second; servers
are remembered up to ``MAX_BEACON_SERVERS``. Without a repeater nothing changes but that.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

import caproto
import structlog
from caproto.client import common as _ca_common

from pvhub.actors.circuit import POLLIN

if TYPE_CHECKING:
    from pvhub.actors.backend import Channel

log = structlog.get_logger("pvhub.actor")

MIN_RETRY = _ca_common.MIN_RETRY_SEARCHES_INTERVAL
MAX_RETRY = _ca_common.MAX_RETRY_SEARCHES_INTERVAL
SEARCH_DATAGRAM_BYTES = 1472  # one Ethernet frame
REGISTER_RETRY = 10.0  # Rule 2: caproto's client waits as long
BEACON_SEARCH_GAP = 0.5
MAX_BEACON_SERVERS = 10_000
# Rule 2: a server new on the network is not new again for this long (its beacons' ramp).
NEW_HOLDOFF_S = 30.0
SOCKET_FULL_RETRY = 0.01  # seconds before searches the full socket refused go again
# Rule 2: beacons carry a count from CA protocol 4.10 on; older servers send 0 each time.
NUMBERED_BEACONS = 10


class NameSearch:
    """The search socket of one actor: the names searched, when each goes next, and what the
    repeater's beacons said of each server.

    ``found(channel, address)`` takes each name a server answered; ``watch(fd, flags)`` is the
    actor loop's poller registration.
    """

    def __init__(
        self, found: Callable[[Channel, tuple[str, int]], None], watch: Callable[[int, int], None]
    ) -> None:
        self._found = found
        self._watch = watch
        self._searching: dict[int, Channel] = {}  # search id -> channel
        self._due: list[tuple[float, int]] = []  # (when, search id): a heap (Rule 1)
        self._search_ids = itertools.count(1)
        self._servers = caproto.get_client_address_list()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self._udp.setblocking(False)
        self._udp.bind(("", 0))
        self._watch(self._udp.fileno(), POLLIN)
        # Rule 2: the repeater, and what its beacons said of each server (last seen, interval).
        environment = caproto.get_environment_variables()
        self._repeater = (caproto.get_local_address(), int(environment["EPICS_CA_REPEATER_PORT"]))
        self._registered = False
        self._register_due = 0.0
        self._beacons = BeaconWatch(time.monotonic())
        self._beacon_search_at = -BEACON_SEARCH_GAP

    @property
    def registered(self) -> bool:
        """The repeater confirmed our registration: its beacons reach us."""
        return self._registered

    def fileno(self) -> int:
        return self._udp.fileno()

    def close(self) -> None:
        self._watch(self._udp.fileno(), 0)
        self._udp.close()

    # --- searching (Rule 1) ---------------------------------------------------------------------

    def start(self, channel: Channel, delay: float) -> None:
        """Search ``channel``'s name after ``delay`` seconds, then at its growing interval."""
        if channel.search_id is not None:
            self._searching.pop(channel.search_id, None)
        search_id = next(self._search_ids) & 0xFFFFFFFF
        channel.search_id = search_id
        self._searching[search_id] = channel
        self._due_at(channel, time.monotonic() + delay)

    def _due_at(self, channel: Channel, when: float) -> None:
        channel.search_due = when
        heapq.heappush(self._due, (when, channel.search_id))

    def stop(self, channel: Channel) -> None:
        """Search ``channel``'s name no more (it was removed)."""
        if channel.search_id is not None:
            self._searching.pop(channel.search_id, None)

    def timeout(self, now: float) -> float | None:
        """Seconds until ``tick`` has something to do (0 or less: now), or None."""
        due = self._due[0][0] - now if self._due else None
        if not self._registered:
            register = self._register_due - now
            due = register if due is None else min(due, register)
        return due

    def tick(self, now: float) -> None:
        """Register with the repeater, and send the searches, that are due."""
        if not self._registered and now >= self._register_due:
            self._register(now)
        if self._due and self._due[0][0] <= now:
            self._send_searches(now)

    def _send_searches(self, now: float) -> None:
        batch: list[bytes] = []
        batched: list[Channel] = []
        size = 0
        version = bytes(caproto.VersionRequest(priority=0, version=caproto.DEFAULT_PROTOCOL_VERSION))
        while self._due and self._due[0][0] <= now:
            channel = self._live(*heapq.heappop(self._due))
            if channel is None:
                continue
            request = bytes(caproto.SearchRequest(channel.name, channel.search_id, caproto.DEFAULT_PROTOCOL_VERSION))
            if size + len(request) > SEARCH_DATAGRAM_BYTES - len(version) and batch:
                if not self._send_batch(now, version, batch, batched):
                    self._due_at(channel, now + SOCKET_FULL_RETRY)
                    self._defer_due(now)
                    return
                batch, batched, size = [], [], 0
            batch.append(request)
            batched.append(channel)
            size += len(request)
        if batch:
            self._send_batch(now, version, batch, batched)

    def _defer_due(self, now: float) -> None:
        """The socket is full: every search due now waits ``SOCKET_FULL_RETRY`` with the rest,
        rather than the loop spinning until the socket drains."""
        while self._due and self._due[0][0] <= now:
            channel = self._live(*heapq.heappop(self._due))
            if channel is not None:
                self._due_at(channel, now + SOCKET_FULL_RETRY)

    def _live(self, when: float, search_id: int) -> Channel | None:
        """The channel a heap entry stands for, or None: answered or forgotten since, or a
        stale entry (Rule 1)."""
        channel = self._searching.get(search_id)
        if channel is None or channel.search_id != search_id or channel.search_due != when:
            return None
        return channel

    def _send_batch(self, now: float, version: bytes, batch: list[bytes], channels: list[Channel]) -> bool:
        """Send one datagram of searches; each name is due again at its interval, which
        doubles, or (the socket full) in ``SOCKET_FULL_RETRY``, its interval unchanged."""
        sent = self._send_datagram(version + b"".join(batch))
        for channel in channels:
            if sent:
                self._due_at(channel, now + channel.interval)
                channel.interval = min(MAX_RETRY, channel.interval * 2)
            else:
                self._due_at(channel, now + SOCKET_FULL_RETRY)
        return sent

    def _send_datagram(self, datagram: bytes) -> bool:
        for address in self._servers:
            try:
                self._udp.sendto(datagram, address)
            except BlockingIOError:
                return False
            except OSError as exc:  # an address the host cannot reach now: the others still may
                log.warning("search_not_sent", address="%s:%d" % address, error=str(exc))
        return True

    def receive(self) -> None:
        """The socket is readable: search answers, beacons, the repeater's confirmation."""
        for _ in range(100):
            try:
                data, sender = self._udp.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable from a server that is gone
                log.debug("search_receive_failed", error=str(exc))
                continue
            try:
                commands = caproto._commands.read_datagram(data, sender, caproto.SERVER)
            except Exception as exc:  # not Channel Access, or broken: nothing to do with it
                log.warning("bad_datagram", sender="%s:%d" % sender[:2], error=str(exc))
                continue
            for command in commands:
                if isinstance(command, caproto.SearchResponse):
                    self._answered(command)
                elif isinstance(command, caproto.Beacon):
                    self._beacon(command, sender)
                elif isinstance(command, caproto.RepeaterConfirmResponse) and not self._registered:
                    self._registered = True
                    self._beacons = BeaconWatch(time.monotonic())  # beacons reach us from now on
                    log.debug("repeater_registered", repeater="%s:%d" % self._repeater)

    def _answered(self, response: Any) -> None:
        channel = self._searching.pop(response.cid, None)
        if channel is None or channel.search_id != response.cid:
            return  # answered already (another server, or an earlier datagram)
        channel.search_id = None
        self._found(channel, caproto.extract_address(response))

    # --- beacons (Rule 2) -----------------------------------------------------------------------

    def _register(self, now: float) -> None:
        self._register_due = now + REGISTER_RETRY
        try:
            self._udp.sendto(bytes(caproto.RepeaterRegisterRequest("0.0.0.0")), self._repeater)
        except OSError as exc:  # no repeater reachable now: later, again
            log.debug("repeater_not_reached", repeater="%s:%d" % self._repeater, error=str(exc))

    def _beacon(self, beacon: Any, sender: tuple[str, int]) -> None:
        now = time.monotonic()
        host = beacon.address if beacon.address not in ("0.0.0.0", "") else sender[0]
        numbered = beacon.version >= NUMBERED_BEACONS  # older servers send 0 every time
        new = self._beacons.heard((host, beacon.server_port), beacon.beacon_id, now, numbered)
        if new and self._searching and now - self._beacon_search_at >= BEACON_SEARCH_GAP:
            self._beacon_search_at = now
            for channel in list(self._searching.values()):
                channel.interval = MIN_RETRY
                self.start(channel, delay=0.0)


class BeaconWatch:
    """What each server's beacons said: is it new on the network (Rule 2)? No I/O."""

    def __init__(self, started: float) -> None:
        self._started = started  # since when beacons reach us
        # server -> (last heard, its usual interval or None after one beacon, last number,
        # when it was last new)
        self._servers: dict[tuple[str, int], tuple[float, float | None, int, float]] = {}

    def __len__(self) -> int:
        return len(self._servers)

    def heard(self, server: tuple[str, int], number: int, now: float, numbered: bool = True) -> bool:
        """A beacon of ``server`` numbered ``number`` (``numbered``: a server whose beacons
        count, CA 4.10 and later) came at ``now``: is the server new?"""
        known = self._servers.pop(server, None)  # put back last: the oldest go first
        if known is None:
            if len(self._servers) >= MAX_BEACON_SERVERS:
                del self._servers[next(iter(self._servers))]
            self._servers[server] = (now, None, number, -NEW_HOLDOFF_S)
            return False
        last, usual, last_number, new_at = known
        advance = (number - last_number) & 0xFFFFFFFF
        if numbered and (advance == 0 or advance > 0xFFFFFFFF - 256 or 1 < advance < 4):
            self._servers[server] = (last, usual, number, new_at)  # a duplicate route's copy
            return False
        interval = now - last
        if usual is None:  # the second beacon: new if we would have heard it before at this rate
            new = interval <= last - self._started
            usual = interval
        else:
            new = interval <= usual * 0.8 or interval >= usual * 3.25
            # A new rhythm starts the average again: a starting server's beacons come twice
            # as far apart each time, and an average of the old ones would lag behind.
            usual = interval if new else usual * 0.875 + interval * 0.125
        # Once new, not new again for NEW_HOLDOFF_S: every other step of that ramp still
        # would be, and each would send all unfound names searching again.
        new = new and now - new_at >= NEW_HOLDOFF_S
        self._servers[server] = (now, usual, number, now if new else new_at)
        return new
