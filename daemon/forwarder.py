"""The readings forwarder: actors publish readings into it, clients subscribe out of it, and
every subscription is vetted.

Rule 1: the readings socket is an ``XPUB_MANUAL``: a subscription is applied only if its
sender's identity may read that PV (or, for the empty prefix, every PV), so readings of a PV
a client may not read never reach it, whatever it subscribes. Upstream (to the actors) each
allowed topic is subscribed once and stays subscribed while the daemon holds its PV (an
unsubscription cannot be told apart from one of a subscription that was refused); an XPUB
drops, in C, what nobody takes. When the topics reach ``max_topics``, those of PVs the daemon
did not hold at two looks at least a second apart are unsubscribed upstream and forgotten, so
names subscribed once over a long life never fill the forwarder. (Two looks: a PV released a
moment ago still has its ``PvLost`` on the way, on its topic.)
Rule 2: the forwarder's work per reading is a receive and a send of its frames, untouched,
and a look at its topic (Rule 4); per subscription, one access decision (cached,
``AccessRules``).
Rule 3: a client's unsubscription is not applied here; its subscription stays until it
disconnects, and its own SUB socket drops what it no longer follows. A client proves a
subscription by unsubscribing and subscribing again (client hub.py Rule 4), and applied, the
pair left a moment in which the stream to it was cut: readings published then were lost to
it (a gap in ``seq``). What one connection keeps is every topic it was allowed (Rule 1) over
its life: the names of PVs the daemon held when it subscribed. That is not bounded by the
topics the forwarder holds now (those turn over as PVs are released), but by the names the
client used, as the client's own channels are (client hub.py), and a disconnection frees
them. A subscription message names no connection (an XPUB gives only its identity), so no
count per connection can be kept here; libzmq keeps each as a node of a trie, tens of bytes.
Rule 4: ZeroMQ bounds what waits for a client in messages, not bytes: ten thousand readings
of a counter are a megabyte, ten thousand of a detector's images are tens of gigabytes. So
large readings (an array of ``protocol.LARGE_BYTES`` or more; the actor marks them, protocol
Rule 4) leave through a second XPUB, vetted alike, whose queue per client holds
``large_readings_hwm`` messages: a client that stops reading (stopped with Ctrl-Z, say)
costs the daemon at most that many of its largest readings, and loses the rest, as an EPICS
server drops a slow client's events. From a PV's first large message on, all its messages
take that socket, so that none overtakes another (the topics are kept in ``large_topics``,
bounded as the upstream topics are); what came before on the other socket may still be
overtaken once, at the switch, which a client sees as a gap in ``seq`` and mends with a
snapshot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
import zmq

from pvhub import protocol as p
from pvhub.access import AccessRules
from pvhub.config import DEFAULT_LARGE_READINGS_HWM, DEFAULT_READINGS_HWM, valid_pv_name
from pvhub.daemon.security import RefusalLog, Security, identity_of

log = structlog.get_logger("pvhub.daemon")

# A readings socket not bound again after this long is logged at every try (an error).
REBIND_WARNING_S = 2.0
# Rule 1: how often, at most, a full forwarder looks for topics of PVs no longer held, and
# within how long a second look must follow the first to count (clients whose subscription
# was refused subscribe again every tenth of a second until it is taken).
PRUNE_INTERVAL_S = 1.0
PRUNE_LOOKS_WITHIN_S = 10.0


class ReadingsForwarder:
    """XSUB (actors publish here) -> XPUB (clients subscribe here), every subscription vetted
    (Rules 1 and 2), large readings through an XPUB of their own (Rule 4)."""

    def __init__(self, ctx: zmq.Context, inward: str, outward: str, hwm: int, access: Callable[[], AccessRules],
                 allows: Callable[[str], bool], security: Security | None = None,
                 max_topics: Callable[[], int] = lambda: 100_000,
                 held: Callable[[str], bool] = lambda pv: True, *,
                 large_outward: str, large_hwm: int = DEFAULT_LARGE_READINGS_HWM) -> None:
        self._ctx = ctx
        self._inward = inward
        # Rule 4: the readings socket, and the one for large readings, with their queues.
        self._outward = [outward, large_outward]
        self._hwms = [hwm, large_hwm]
        self.large_topics: set[bytes] = set()  # topics whose messages go through the second
        self._access = access
        self._allows = allows
        self._security = security
        self._stop = threading.Event()
        self._revet = threading.Event()
        self._revet_reason = ""
        self._thread: threading.Thread | None = None
        self._wake_endpoint = f"inproc://pvhub-readings-wake-{id(self)}"
        self._wake: zmq.Socket | None = None
        # Topics subscribed upstream, at most ``max_topics()`` (the daemon's PV limit, which a
        # reload may change): a client
        # subscribing to every name the allow list admits must not grow the daemon unbounded.
        self.upstream: set[bytes] = set()
        self._max_topics = max_topics
        self._held = held  # whether the daemon holds a PV (Rule 1's pruning)
        self._pruned_at = -PRUNE_INTERVAL_S
        self._unheld: set[bytes] = set()  # topics of PVs not held at the last look (Rule 1)
        self.refused = RefusalLog(event="subscription_refused")
        self._ready = threading.Event()
        self._endpoints = ["", ""]
        self._error: BaseException | None = None

    def start(self) -> tuple[str, str]:
        """Bind, and the endpoints bound: readings, and large readings (Rule 4)."""
        self._thread = threading.Thread(target=self._run, name="readings-forwarder", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self._endpoints[0], self._endpoints[1]

    def revet(self, reason: str) -> None:
        """Vet every subscription again (the rules or the keys changed): both readings sockets
        are bound anew, and each client's SUB socket reconnects (through ZAP) and subscribes
        again by itself."""
        self._revet_reason = reason
        self._revet.set()
        if self._wake is not None:
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._wake is not None:
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._wake is not None:
            self._wake.close(linger=0)
            self._wake = None

    def _run(self) -> None:
        try:
            xsub = self._ctx.socket(zmq.XSUB)
            xsub.setsockopt(zmq.LINGER, 0)
            xsub.setsockopt(zmq.RCVHWM, DEFAULT_READINGS_HWM)
            # Subscriptions travel up through here, to every actor; past the mark they would
            # be dropped, and a client would wait for a topic that never comes.
            xsub.setsockopt(zmq.SNDHWM, p.SUBSCRIPTION_QUEUE_HWM)
            xsub.bind(self._inward)
            outs: list[zmq.Socket | None] = []
            try:
                for endpoint, hwm in zip(self._outward, self._hwms):
                    outs.append(self._outward_socket(endpoint, hwm))
            except BaseException:
                for xpub in outs:
                    xpub.close(linger=0)  # type: ignore[union-attr]
                raise
            wake = self._ctx.socket(zmq.PAIR)
            wake.bind(self._wake_endpoint)
            self._wake = self._ctx.socket(zmq.PAIR)
            self._wake.connect(self._wake_endpoint)
            self._endpoints = [xpub.getsockopt_string(zmq.LAST_ENDPOINT) for xpub in outs]  # type: ignore[union-attr]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(xsub, zmq.POLLIN)
        for xpub in outs:
            poller.register(xpub, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        unbound_since: float | None = None  # the readings sockets are being bound anew
        try:
            while not self._stop.is_set():
                # Unbound: try again soon, then (past REBIND_WARNING_S, logging) once a second.
                quick = None in outs and time.monotonic() - (unbound_since or 0.0) < REBIND_WARNING_S
                ready = dict(poller.poll(50 if quick else 1000))
                if wake in ready:
                    while wake.poll(0):
                        wake.recv()
                if xsub in ready:
                    self._forward(xsub, outs[0], outs[1])
                for xpub in outs:
                    if xpub is not None and xpub in ready:
                        self._vet(xpub, xsub)
                if self._revet.is_set() and None not in outs:
                    self._revet.clear()
                    for xpub in outs:
                        poller.unregister(xpub)
                        xpub.close(linger=0)  # type: ignore[union-attr]
                    outs, unbound_since = [None, None], time.monotonic()
                for at, xpub in enumerate(outs):
                    if xpub is None and not self._stop.is_set():
                        xpub = outs[at] = self._rebind(at, unbound_since)
                        if xpub is not None:
                            poller.register(xpub, zmq.POLLIN)
        except zmq.ContextTerminated:
            pass
        finally:
            xsub.close()
            for xpub in outs:
                if xpub is not None:
                    xpub.close()
            wake.close()

    def _outward_socket(self, endpoint: str, hwm: int) -> zmq.Socket:
        xpub = self._ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.SNDHWM, hwm)
        xpub.setsockopt(zmq.RCVHWM, p.SUBSCRIPTION_QUEUE_HWM)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        # A subscription is a topic: a PV name and a NUL. Anything longer is not one.
        xpub.setsockopt(zmq.MAXMSGSIZE, 1024)
        if self._security is not None:
            self._security.serve(xpub, "readings")
        try:
            xpub.bind(endpoint)
        except zmq.ZMQError:
            xpub.close(linger=0)
            raise
        return xpub

    def _rebind(self, at: int, since: float | None) -> zmq.Socket | None:
        """Readings socket ``at`` on the same endpoint again, or None (tried again on the
        loop's next pass: the port may be a moment in releasing). Readings meanwhile reach
        nobody, and clients see the gap."""
        endpoint = self._endpoints[at]
        try:
            xpub = self._outward_socket(endpoint, self._hwms[at])
        except zmq.ZMQError as exc:
            waited = time.monotonic() - (since or 0.0)
            if exc.errno != zmq.EADDRINUSE or waited > REBIND_WARNING_S:
                log.error("readings_not_rebound", endpoint=endpoint, error=str(exc), waited=round(waited, 1))
            return None
        log.info("readings_rebound", endpoint=endpoint, reason=self._revet_reason)
        return xpub

    def _forward(self, xsub: zmq.Socket, xpub: zmq.Socket | None, large: zmq.Socket | None) -> None:
        large_topics = self.large_topics
        for _ in range(2000):  # bounded, so subscriptions get their turn
            try:
                frames = xsub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            # Rule 4: a PV's messages go through the large readings socket from its first
            # large one on, so that none of its messages overtakes another.
            topic = frames[0].bytes
            if topic[-1:] == p.LARGE_MARK and topic[-2:-1] == b"\0":
                out = large
                if topic[:-1] not in large_topics:
                    if len(large_topics) >= self._max_topics():
                        large_topics.clear()  # names of long ago; a PV's next large one adds it
                    large_topics.add(topic[:-1])
            else:
                out = large if topic in large_topics else xpub
            if out is None:
                continue  # being bound anew: nobody could take it
            try:
                out.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # no subscriber takes it (an XPUB never blocks): as a C proxy would

    def _vet(self, xpub: zmq.Socket, xsub: zmq.Socket) -> None:
        for _ in range(2000):
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue  # not a subscription: nothing to do with it
            topic = data[1:]
            if data[0] == 0:
                continue  # kept until the client goes: Rule 3
            if len(self.upstream) >= self._max_topics() and topic not in self.upstream:
                self._prune(xsub)
            identity = identity_of(frame)
            if not self._may_subscribe(identity, topic):
                self.refused.refused_connection("subscription", identity=identity,
                                                topic=topic[:80].decode(errors="replace"))
                continue
            xpub.setsockopt(zmq.SUBSCRIBE, topic)
            if topic not in self.upstream:
                self.upstream.add(topic)
                xsub.send(data)

    def _prune(self, xsub: zmq.Socket) -> None:
        """Rule 1: forget the topics of PVs the daemon no longer holds."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        previous = self._unheld if now - self._pruned_at <= PRUNE_LOOKS_WITHIN_S else set()
        self._pruned_at = now
        unheld = {topic for topic in self.upstream if topic.endswith(b"\0")  # not HUB_TOPIC
                  and not self._held(topic[:-1].decode(errors="replace"))}
        gone = unheld & previous
        self._unheld = unheld - gone
        for topic in gone:
            self.upstream.discard(topic)
            self.large_topics.discard(topic)
            xsub.send(b"\0" + topic)
        if gone:
            log.info("subscriptions_pruned", count=len(gone), kept=len(self.upstream))

    def _may_subscribe(self, identity: str, topic: bytes) -> bool:
        access = self._access()
        if topic == p.HUB_TOPIC:
            return True
        if len(self.upstream) >= self._max_topics() and topic not in self.upstream:
            return False
        if topic == b"":
            return access.reads_everything(identity)
        if not topic.endswith(b"\0"):
            return False  # a prefix of names: only whole names are vetted
        try:
            pv = topic[:-1].decode()
        except UnicodeDecodeError:
            return False
        return valid_pv_name(pv) and self._allows(pv) and access.may_read(identity, pv)
