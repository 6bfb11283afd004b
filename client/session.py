"""The hub's session with its daemon, kept by the I/O thread: its two sockets opened, hello
said and answered, pings sent, replies and readings taken, and a daemon that went away given
up. ``Hub`` (``pvhub.client.hub``) is a ``Session``.

Rule 1 (Paranoid Pirate, decided in ``pvhub.client.liveness``): the client pings the daemon
every ``CLIENT_HEARTBEAT_S``; a daemon silent for ``LIVENESS`` beats, or one that announces it
is stopping, is lost: every request in flight fails at once (a put's outcome is then unknown;
nothing is ever re-sent), every channel turns disconnected, and the client says hello again
until a daemon answers, then re-attaches every channel from a fresh snapshot. Requests are
never queued for a daemon that is not there (``ZMQ_IMMEDIATE``), so nothing sent during an
outage is delivered to the next daemon.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import zmq

from pvhub import protocol as p
from pvhub.client.curve import HANDSHAKE_EVENTS, handshake_failure
from pvhub.client.liveness import Lose, SayHello
from pvhub.config import DEFAULT_READINGS_HWM
from pvhub.client.dispatcher import DISPATCH_BATCH
from pvhub.client.requests import answer_all
from pvhub.errors import HubUnavailableError, ProtocolError
from pvhub.logs import library_logger
from pvhub.readings import decode_readings

if TYPE_CHECKING:
    from pvhub.client.channel import Channel, ProofSchedule
    from pvhub.client.dispatcher import Dispatcher
    from pvhub.client.liveness import Liveness
    from pvhub.client.requests import ReplyHandler, RequestTable
    from pvhub.waker import Waker

log = library_logger("pvhub.client")

# The readings socket's flags, as plain ints: pyzmq turns its enum constants back into enums
# on every call, a microsecond per reading.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


class Session:
    """What the hub's I/O thread does with its sockets (the hub's Rule 1). Its state is the
    hub's, made by ``Hub.__init__`` (named here); it asks the hub for ``_all_channels`` and
    ``_request_snapshot`` (attaching channels, the hub's Rules 3 and 4)."""

    address: str
    name: str
    readings_endpoints: tuple[str, ...]
    server_version: str | None
    identity: bytes
    max_message_bytes: int
    known_as: str
    handshake_problem: str | None
    _curve: tuple[bytes, bytes, bytes] | None
    _ctx: zmq.Context
    _waker: Waker
    _ids: itertools.count
    _requests: RequestTable
    _liveness: Liveness
    _channels: dict[str, Channel]
    _channels_lock: threading.Lock
    _proofs: ProofSchedule
    _dispatcher: Dispatcher
    _unsent: dict[object, ReplyHandler]
    _unsent_lock: threading.Lock
    _io_failure: BaseException | None
    _io_finished: bool
    _dealer: zmq.Socket
    _sub: zmq.Socket
    _handshakes: zmq.Socket

    def _open_sockets(self) -> zmq.Poller:
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._sub = self._ctx.socket(zmq.SUB)
        for sock in (self._dealer, self._sub):
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:  # curve.py Rule 1: before connecting, or the socket speaks NULL
                public, secret, server = self._curve
                sock.curve_secretkey = secret
                sock.curve_publickey = public
                sock.curve_serverkey = server
        self._dealer.setsockopt(zmq.IMMEDIATE, 1)
        # Unbounded both ways: what is queued is what this process asked for, and a bound
        # here would fail a burst of requests (thousands of Signals attaching at once) as
        # "not sent", or hold replies back until the daemon's queue for us overflows and it
        # drops them.
        self._dealer.setsockopt(zmq.SNDHWM, 0)
        self._dealer.setsockopt(zmq.RCVHWM, 0)
        self._dealer.connect(self.address)
        self._sub.setsockopt(zmq.RCVHWM, DEFAULT_READINGS_HWM)  # and the daemon's own bound
        # Subscriptions travel as outgoing messages: past SNDHWM (1000 by default) a SUB drops
        # them without a word, and a process may subscribe to thousands of PVs at once (or
        # again, all together, when it reconnects).
        self._sub.setsockopt(zmq.SNDHWM, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, p.HUB_TOPIC)
        self._handshakes = self._dealer.get_monitor_socket(HANDSHAKE_EVENTS)
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._handshakes, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        return poller

    def _finish(self, failure: BaseException | None) -> None:
        """The I/O thread's last words: answer everything, and after a failure, lose every
        channel (the hub's Rule 6)."""
        with self._unsent_lock:
            self._io_failure = failure
            self._io_finished = True
            unsent, self._unsent = self._unsent, {}
        answer_all(((0, h) for h in unsent.values()), self._ended_text("the request was not sent"))
        self._requests.fail_all(self._ended_text("the outcome is unknown"))
        if failure is not None:
            self._liveness.ended()
            reason = f"the pvhub client's I/O thread failed ({type(failure).__name__}: {failure})"
            error_text = self._ended_text("the PV cannot connect")
            with self._channels_lock:  # with ``channel()``: a channel made from now on refuses too
                channels = list(self._channels.values())
            for channel in channels:
                channel.lose(reason)
                with channel.cond:
                    channel.error = HubUnavailableError(error_text)
                    channel.cond.notify_all()
        self._close_sockets()

    def _closed_text(self, outcome: str) -> str:
        return f"the connection to the pvhub daemon at {self.address} was closed; {outcome}"

    def _ended_text(self, outcome: str) -> str:
        """Why nothing goes through any more: closed, or the I/O thread's failure (the hub's Rule 6)."""
        failure = self._io_failure
        if failure is None:
            return self._closed_text(outcome)
        return (f"the pvhub client's I/O thread for the daemon at {self.address} failed "
                f"({type(failure).__name__}: {failure}); {outcome}")

    def _drain_readings(self) -> None:
        # The hot path: a thousand readings a second to each of a hundred processes. A
        # readings message is its topic, then a frame holding one or more messages of that
        # topic back to back (an actor sends the updates of a PV it has gathered together;
        # protocol Rule 8), each decoded as ``decode_reading`` would (as thorough as
        # ``decode``, quicker for an ``Update``) and applied to its channel; the dispatcher
        # is woken once per batch (Rule 2). Asking whether more frames follow costs two
        # microseconds: it is asked twice a message, not once per update.
        recv, more, channels = self._sub.recv, self._sub.get, self._channels
        count = 0  # updates, for the dispatcher's batches
        for _ in range(10_000):  # messages: then the rest of the loop has its turn
            try:
                recv(_NOBLOCK)  # the topic; each message names its PV itself
            except zmq.Again:
                return
            while more(_RCVMORE):  # a message's frames arrive together: no Again here
                messages = decode_readings(recv(_NOBLOCK))
                while True:
                    try:
                        update = next(messages)
                    except StopIteration:
                        break
                    except ProtocolError as exc:  # the rest of this frame is lost: a seq gap tells
                        log.error("bad_reading", error=str(exc))
                        break
                    kind = type(update)
                    if kind is p.Updates:
                        channel = channels.get(update.pv)
                        items = update.items
                        for at in range(0, len(items), DISPATCH_BATCH):  # the hub's Rule 2 batch, held
                            chunk = items[at:at + DISPATCH_BATCH] if len(items) > DISPATCH_BATCH else items
                            if channel is not None:
                                channel.apply_updates(update.epoch, chunk)  # live from here on
                            count += len(chunk)
                            if count >= DISPATCH_BATCH:
                                count = 0
                                self._dispatcher.flush()
                        continue
                    if kind is p.Update:
                        channel = channels.get(update.pv)
                        if channel is not None:
                            channel.apply(update.epoch, update.seq, update.connected, update.reading,
                                          update.metadata, from_stream=True)  # live from here on
                    else:
                        self._other_reading(update)
                    count += 1
                    if count >= DISPATCH_BATCH:
                        count = 0
                        self._dispatcher.flush()

    def _other_reading(self, update: p.Message) -> None:
        """What the readings socket carries besides updates."""
        if isinstance(update, p.HubStopping):
            # Requests in flight are still answered (the daemon lets puts finish); new
            # ones are refused here, and the hub counts as lost once it owes nothing.
            log.info("hub_stopping", address=self.address, reason=update.reason)
            self._liveness.stopping_announced()
        elif isinstance(update, p.PvLost):
            lost = self._channels.get(update.pv)
            if lost is not None:
                lost.lose(update.reason)
                self._proofs.lost(lost, time.monotonic())

    def _close_sockets(self) -> None:
        """The I/O thread's last act: close whatever ``_open_sockets`` opened, then the context."""
        handshakes = getattr(self, "_handshakes", None)
        if handshakes is not None:
            self._dealer.disable_monitor()
            handshakes.close()
        for sock in (getattr(self, "_dealer", None), getattr(self, "_sub", None)):
            if sock is not None:
                sock.close()
        self._ctx.term()

    def _read_handshakes(self) -> None:
        """curve.py Rule 2: keep why the daemon does not let us in, in words an operator can act on."""
        # Here, not at the top: pyzmq's monitor helpers import asyncio, a tenth of the time a
        # short-lived client (``pvhub status``) takes to start, for a few events per connection.
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._handshakes, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_problem = None
                self._liveness.handshake_succeeded()
                continue
            problem = handshake_failure(kind, value, with_keys=self._curve is not None)
            if problem != self.handshake_problem:  # ZeroMQ retries every 100 ms: say it once
                log.warning("handshake_failed", address=self.address, problem=problem)
            self.handshake_problem = problem

    def _try_send(self, payload: bytes) -> bool:
        try:
            self._dealer.send(payload, zmq.NOBLOCK)
        except zmq.Again:  # no daemon connected (ZMQ_IMMEDIATE): nothing is queued
            return False
        return True

    def _send(self, message: p.Message) -> bool:
        return self._try_send(p.encode(message))

    def _keep_alive(self, now: float) -> None:
        """Rule 1: whatever ``Liveness`` says is due."""
        action = self._liveness.due(now, self._requests.waiting_besides)
        if action is None:
            return
        if isinstance(action, SayHello):
            self._send_hello(now)
        elif isinstance(action, Lose):
            self._lose_hub(action.reason)
        else:
            with_pvs = self._liveness.take_pvs_change(now, len(self._channels))
            pvs = [channel.pv for channel in self._all_channels()] if with_pvs else None
            request_id = next(self._ids)
            sent = self._send(p.PingRequest(id=request_id, pvs=pvs))
            self._liveness.ping_sent(request_id, now, sent, with_pvs)
            if sent:  # in the table only so that its answer is taken; ``Liveness`` counts it
                self._requests.add(request_id, lambda message: True, now)

    def _lose_hub(self, reason: str) -> None:
        """The daemon is gone (Rule 1): fail what it owed, disconnect, start saying hello."""
        if not self._liveness.lost():
            return
        log.warning("hub_lost", address=self.address, reason=reason)
        self._requests.fail_all(f"the pvhub daemon at {self.address} went away ({reason}); the outcome is unknown")
        for channel in self._all_channels():
            channel.lose(reason, daemon_lost=True)

    def _send_hello(self, now: float) -> None:
        request_id = next(self._ids)
        replaced = self._liveness.hello_sent(request_id, now)
        if replaced is not None:  # unanswered: its answer would no longer count
            self._requests.discard(replaced)

        def on_hello(message: p.Message) -> bool:
            if not self._liveness.is_current_hello(message.id):  # type: ignore[attr-defined]
                return True  # an answer to an earlier attempt
            if isinstance(message, p.HelloReply):
                endpoints = tuple(_reachable(endpoint, self.address)
                                  for endpoint in (message.readings, message.large_readings) if endpoint)
                if endpoints != self.readings_endpoints:
                    for endpoint in self.readings_endpoints:
                        self._sub.disconnect(endpoint)
                    for endpoint in endpoints:
                        self._sub.connect(endpoint)
                    self.readings_endpoints = endpoints
                self.server_version = message.server_version
                self.identity = message.client
                self.max_message_bytes = message.max_message_bytes
                self.known_as = message.identity
                self._liveness.connected_at(time.monotonic())
                log.info("hub_connected", address=self.address, readings=endpoints)
                # Attaching waited for the readings endpoint; after a loss, everything resyncs.
                for channel in self._all_channels():
                    if not channel.attached:
                        self._request_snapshot(channel)
            elif isinstance(message, p.ErrorReply):
                log.error("hello_refused", address=self.address, code=message.code, error=message.message)
            return True

        if self._send(p.HelloRequest(id=request_id, client=self.name)):
            self._requests.add(request_id, on_hello, now)

    def _drain_replies(self) -> None:
        while True:
            try:
                payload = self._dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = p.decode(payload)
            except ProtocolError as exc:
                log.error("bad_reply", error=str(exc))
                continue
            for ping in self._liveness.heard(time.monotonic()):  # older pings are moot now
                self._requests.discard(ping)
            if isinstance(message, p.Pong):
                if message.pvs_wanted:
                    self._liveness.pvs_changed(wanted=True)  # the daemon forgot us (we were away)
                if message.lost:
                    self._requests.fail_lost(message.lost)
            self._requests.answer(message)


def _reachable(endpoint: str, request_address: str) -> str:
    """The readings endpoint as this client can reach it: a daemon bound to all interfaces
    names 0.0.0.0, which means the host we already reach it at."""
    parts = urlsplit(endpoint)
    if parts.scheme == "tcp" and parts.hostname in ("0.0.0.0", "::", "*"):
        host = urlsplit(request_address).hostname or "127.0.0.1"
        return f"tcp://{host}:{parts.port}"
    return endpoint

