"""A process's connection to a pvhub daemon, shared by all of its Signals. Its session with the
daemon (sockets, hello, pings, a daemon lost) is ``pvhub.client.session``'s, its CurveZMQ keys
``pvhub.client.curve``'s.

Rule 1: one I/O thread owns the sockets (a DEALER for requests, a SUB for readings); ZeroMQ
sockets are not thread-safe. User threads hand it work through a queue and a wake-up pipe.
Rule 2: user callbacks never run on the I/O thread; they run in order on the callback
thread (``pvhub.client.dispatcher``), which the I/O thread wakes once per batch (a pass of
its loop, or ``DISPATCH_BATCH`` readings), not once per reading.
Rule 3 (the Clone pattern): a PV's channel subscribes to its topic first, then asks for a
snapshot; ``pvhub.client.channel`` holds the rules for what it then accepts.
Rule 4: a subscription is known to be live once something arrives on it. Until then the
channel asks the actor to publish its snapshot again every ``PROOF_INTERVAL`` (one request
outstanding at a time), which proves the subscription without any fixed wait. Each time it
asks again it also subscribes again: a subscription is a message, and one that met a full
queue on its way to the actor (ZeroMQ drops those silently) is otherwise lost for good. For
the same reason a snapshot request unanswered after ``SNAPSHOT_TIMEOUT`` is given up (a late
answer is ignored) and asked again: a read changes nothing, so asking twice is harmless. Only
channels waiting for a proof or a snapshot are looked at, in a heap by when they are due: a
wake-up costs nothing per idle channel, so a process may hold thousands of them.
Rule 5: no request waits forever (``pvhub.client.requests``): each may have a deadline for
its final reply, checked on every pass of the I/O loop; a set has none by default (its
waiters bound their wait themselves, with ``Status`` timeouts). A request whose final reply
the daemon could not deliver (named in a ``Pong``'s ``lost``) fails at once, its outcome
unknown.
Rule 6: an I/O thread that dies of an error (not of ``close()``) takes the connection with it
in plain sight: every channel is lost and refuses to connect, every request pending fails,
and every later one fails at once, each with ``HubUnavailableError`` naming the cause. A
process never goes on serving its last values as if they were live.
Rule 7: a channel lives while something uses it. Each Signal, PV or ophyd-async backend that
asks for one is counted, and once the last of them has been collected for
``CHANNEL_LINGER_S`` (a script that makes a Signal per read finds it still attached), the I/O
thread unsubscribes its topic and forgets it: its readings are then dropped by ZeroMQ, in C,
and the daemon, told at the next ping, no longer counts this process among its subscribers.
(The daemon keeps the PV and its monitor for others and for the next use.) A channel asked
for without an owner is kept for the process's life.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable

import zmq

from pvhub import protocol as p
from pvhub.config import DEFAULT_ADDRESS
from pvhub.errors import HubUnavailableError, LimitError, ProtocolError, PvhubError, error_from_code
from pvhub.client.channel import Channel, ProofSchedule
from pvhub.client.curve import curve_keys, key_paths
from pvhub.client.dispatcher import Dispatcher
from pvhub.client.liveness import Liveness
from pvhub.client.requests import ReplyHandler, RequestTable, default_timeout, describe
from pvhub.client.session import Session
from pvhub.logs import library_logger
from pvhub.waker import Waker

log = library_logger("pvhub.client")

PROOF_INTERVAL = 0.1
SNAPSHOT_TIMEOUT = 5.0
CHANNEL_LINGER_S = 10.0  # Rule 7: how long a channel nothing uses is kept for the next use
# The I/O thread sleeps until its next due work (a hello, a ping, a proof, a deadline: Rule 1),
# at most this long.
POLL_MS = 1000
# ``Hub.call`` waits this much past its request's deadline, so that the deadline (checked
# once per pass of the I/O loop) is what fails the call.
CALL_GRACE = 0.5

# Errors to a snapshot request that asking again will not change.
PERMANENT_ERRORS = {"pv_not_allowed", "access_denied", "bad_message", "unsupported_version", "unknown_operation"}


def default_address() -> str:
    return os.environ.get("PVHUB_ADDRESS", DEFAULT_ADDRESS)


class Hub(Session):
    """The connection to one daemon. Use ``get_hub(address)`` (``pvhub.client.registry``): it is
    shared per address and keys."""

    def __init__(self, address: str | None = None, *, name: str | None = None,
                 client_key: str | os.PathLike[str] | None = None,
                 server_key: str | os.PathLike[str] | None = None) -> None:
        """``client_key``: this client's ``NAME.key_secret``; ``server_key``: the daemon's
        ``NAME.key`` (curve.py Rule 1; default ``$PVHUB_CLIENT_KEY``, ``$PVHUB_SERVER_KEY``)."""
        self.address = address or default_address()
        self.name = name or f"{os.path.basename(sys.argv[0] or 'python')}[{os.getpid()}]"
        # Read here, on the caller's thread, so that a bad key file fails the constructor.
        self.key_paths = key_paths(client_key, server_key)
        self._curve = curve_keys(*self.key_paths)
        # Where the SUB socket is connected: readings, and large readings (protocol Rule 4).
        self.readings_endpoints: tuple[str, ...] = ()
        self.server_version: str | None = None
        self.identity: bytes = b""
        # What the daemon said in its hello: the largest request it takes (0: not said), and
        # the identity it knows this process by (its CURVE key's name, or "anonymous").
        self.max_message_bytes = 0
        self.known_as = ""
        # Why the last security handshake with the daemon failed; None once one succeeds.
        self.handshake_problem: str | None = None
        self._closed = threading.Event()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._waker = Waker()
        self._ids = itertools.count(1)
        self._requests = RequestTable(self.address)  # Rule 5; the I/O thread's only
        # Requests handed to the I/O thread but not sent yet; whoever takes one out answers it.
        self._unsent: dict[object, ReplyHandler] = {}
        self._unsent_lock = threading.Lock()
        self._io_finished = False
        self._io_failure: BaseException | None = None  # why the I/O thread died (Rule 6)
        self._liveness = Liveness()  # session.py Rule 1; its ``connected`` is set once a daemon said hello
        self.wakeups = 0  # passes of the I/O loop (benchmarks: work per wake-up)
        self._channels: dict[str, Channel] = {}
        self._channels_lock = threading.Lock()
        self._released: collections.deque[Channel] = collections.deque()  # Rule 7: a user of each went
        # Rule 7: (since when, channel) for channels nothing used since, oldest first (a
        # channel used and dropped again has a later entry too; the earlier one is skipped).
        self._lingering: collections.deque[tuple[float, Channel]] = collections.deque()
        self._proofs = ProofSchedule(PROOF_INTERVAL, SNAPSHOT_TIMEOUT)  # Rule 4
        self._ctx = zmq.Context()
        self._dispatcher = Dispatcher()  # Rule 2
        # ``dispatch``: the dispatcher's own method, bound here, not a method of ours that
        # calls it: a Signal's subscription calls it per reading.
        self.dispatch = self._dispatcher.dispatch
        self.dispatch_change = self._dispatcher.dispatch_change  # a listener's (Rule 5 there)
        self._io = threading.Thread(target=self._run, name=f"pvhub-io {self.address}", daemon=True)
        self._io.start()

    # --- user-thread API ------------------------------------------------------------------

    def channel(self, pv: str, owner: object = None) -> Channel:
        """The channel of ``pv``, attached (subscribed and snapshotted) in the background; it
        is kept while ``owner`` lives (Rule 7), for good without one."""
        with self._channels_lock:
            channel = self._channels.get(pv)
            new = channel is None
            if new:
                channel = self._channels[pv] = Channel(self, pv)
            if owner is None:
                channel.kept = True
            else:
                channel.users += 1
                # No lock in it: it runs on any thread, at any allocation. Not at exit: nothing
                # is left to release then.
                weakref.finalize(owner, self._released.append, channel).atexit = False
            if new:
                if self._io_failure is not None:  # Rule 6: nobody will ever attach it
                    channel.error = HubUnavailableError(self._ended_text("the PV cannot connect"))
                    return channel
                self._liveness.pvs_changed()
                self._call_soon(lambda: self._attach(channel))
            elif channel.error is not None and self._io_failure is None:
                # Refused before (access rules, allow list): a new use asks again, since the
                # daemon's rules may have been reloaded since.
                with channel.cond:
                    channel.error = None
                self._call_soon(lambda: self._liveness.connected.is_set() and self._request_snapshot(channel))
            return channel

    def request(self, build: Callable[[int], p.Message], handler: ReplyHandler | None = None,
                timeout: float | None = None) -> Future:
        """Send the request ``build(id)``. The future gets the final reply (an ``ErrorReply``
        becomes its exception); ``handler``, if given, sees every reply first on the I/O thread
        and says whether it was the last. ``timeout``: seconds from sending to the final reply,
        past which the request fails with ``PvhubTimeoutError`` (Rule 5); None: the default
        for its kind (``REQUEST_TIMEOUT``, none for a set); ``math.inf``: none."""
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"a request's timeout must be a number of seconds >= 0, not {timeout!r}")
        future: Future = Future()

        def on_reply(message: p.Message) -> bool:
            final = handler(message) if handler is not None else isinstance(message, p.FINAL_REPLIES)
            if final and not future.done():
                if isinstance(message, p.ErrorReply):
                    future.set_exception(error_from_code(message.code, message.message))
                else:
                    future.set_result(message)
            return final

        token = object()

        def send() -> None:
            with self._unsent_lock:
                if self._unsent.pop(token, None) is None:
                    return  # refused already, by the I/O thread's ending
            request_id = next(self._ids)
            if self._closed.is_set():
                on_reply(p.ErrorReply(id=request_id, code=HubUnavailableError.code,
                                      message=self._closed_text("the request was not sent")))
                return
            try:
                message = build(request_id)
                payload = p.encode(message)
            except ProtocolError as exc:  # e.g. a value that cannot travel: fail this request only
                on_reply(p.ErrorReply(id=request_id, code=exc.code, message=str(exc)))
                return
            if self.max_message_bytes and len(payload) > self.max_message_bytes:
                # The daemon would drop the connection: refuse it here, saying why.
                on_reply(p.ErrorReply(id=request_id, code=LimitError.code, message=(
                    f"{describe(message)} is {len(payload)} bytes; the pvhub daemon at {self.address} takes "
                    f"at most {self.max_message_bytes} ([limits] max_message_bytes); the request was not sent")))
                return
            if not self._liveness.connected.is_set() or self._liveness.stopping or not self._try_send(payload):
                on_reply(p.ErrorReply(id=request_id, code=HubUnavailableError.code,
                                      message=f"the pvhub daemon at {self.address} is not connected; the request was not sent"))
                return
            limit = default_timeout(message) if timeout is None else timeout
            self._requests.add(request_id, on_reply, time.monotonic(), limit,
                               describe(message) if limit is not None else "")

        with self._unsent_lock:
            refused = self._closed.is_set() or self._io_finished
            if not refused:
                self._unsent[token] = on_reply
        if refused:  # no I/O thread will ever send it: refuse at once
            on_reply(p.ErrorReply(id=0, code=HubUnavailableError.code,
                                  message=self._ended_text("the request was not sent")))
        else:
            self._call_soon(send)
        return future

    def call(self, build: Callable[[int], p.Message], timeout: float) -> p.Message:
        """``request`` and wait for the final reply, all within ``timeout``: past it, a
        ``PvhubTimeoutError`` (or ``HubUnavailableError`` if no daemon answered hello)."""
        deadline = time.monotonic() + timeout
        self.wait_for_hello(timeout)
        remaining = max(0.0, deadline - time.monotonic())
        future = self.request(build, timeout=remaining)
        try:
            return future.result(remaining + CALL_GRACE)
        except PvhubError:
            raise
        except TimeoutError:  # the I/O thread did not get to the deadline: stuck, not slow
            raise HubUnavailableError(f"no answer from the pvhub daemon at {self.address} within {timeout} s") from None

    @property
    def unproven(self) -> int:
        """How many channels the I/O thread still looks after (Rule 4): not yet proven live,
        or not yet attached."""
        return len(self._proofs)

    @property
    def connected(self) -> bool:
        """Whether a daemon answered hello and has not been lost since."""
        return self._liveness.connected.is_set()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called: a closed hub never connects again."""
        return self._closed.is_set()

    @property
    def losses(self) -> int:
        """How many times a connected daemon was lost (session.py Rule 1)."""
        return self._liveness.losses

    def wait_for_hello(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # In slices, so that a dead I/O thread (Rule 6) is reported at once, not at the deadline.
        while not self._liveness.connected.wait(0.25 if deadline is None else min(0.25, max(0.0, deadline - time.monotonic()))):
            if self._io_failure is not None:
                raise HubUnavailableError(self._ended_text("nothing can be sent"))
            if deadline is not None and time.monotonic() >= deadline:
                problem = self.handshake_problem
                raise HubUnavailableError(
                    f"the pvhub daemon at {self.address} did not answer within {timeout} s: "
                    + (problem if problem else "is `pvhub serve` running?")
                )

    @property
    def dispatches(self) -> int:
        """Callbacks queued for the callback thread so far (benchmarks: work per reading)."""
        return self._dispatcher.dispatches

    @property
    def merged(self) -> int:
        """Readings that took the place of one still waiting for a slow callback (the
        dispatcher's Rule 5)."""
        return self._dispatcher.merged

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        if threading.current_thread() is not self._io:
            self._io.join(timeout=5)
        self._dispatcher.close()
        if not self._io.is_alive():
            self._waker.close()

    # --- the I/O thread -------------------------------------------------------------------

    def _call_soon(self, func: Callable[[], None]) -> None:
        self._calls.append(func)
        self._wake()

    def _wake(self) -> None:
        self._waker.wake()

    def _run(self) -> None:
        failure: BaseException | None = None
        self._dispatcher.batch_from_this_thread()
        try:
            poller = self._open_sockets()
            while not self._closed.is_set():
                ready = dict(poller.poll(self._sleep_ms(time.monotonic())))
                self.wakeups += 1
                if self._waker.fileno() in ready:
                    self._waker.drain()
                while self._calls:
                    call = self._calls.popleft()
                    try:
                        call()
                    except Exception:
                        log.exception("hub_call_failed", address=self.address)
                if self._released or self._lingering:
                    self._release_channels(time.monotonic())
                if self._dealer in ready:
                    self._drain_replies()
                if self._sub in ready:
                    self._drain_readings()
                if self._handshakes in ready:
                    self._read_handshakes()
                now = time.monotonic()
                self._keep_alive(now)
                self._prove_subscriptions(now)
                self._requests.expire(now)
                self._dispatcher.flush()
        except Exception as exc:
            failure = exc
            log.exception("hub_io_failed", address=self.address)
        finally:
            self._finish(failure)
            self._dispatcher.flush()

    def _sleep_ms(self, now: float) -> int:
        """How long the I/O thread may wait for its sockets: until the next thing due (Rule 1).
        An idle client wakes once a second, to ping, not twenty times."""
        if self._calls:
            return 0
        due = self._liveness.next_due()
        proof, deadline = self._proofs.next_due, self._requests.next_deadline
        if proof is not None and proof < due:
            due = proof
        if deadline is not None and deadline < due:
            due = deadline
        if due <= now:
            return 0
        return min(POLL_MS, int((due - now) * 1000) + 1)

    # --- attaching channels ----------------------------------------------------------------

    def _attach(self, channel: Channel) -> None:
        self._sub.setsockopt(zmq.SUBSCRIBE, p.topic(channel.pv))
        if self._liveness.connected.is_set():
            self._request_snapshot(channel)

    def _request_snapshot(self, channel: Channel) -> None:
        now = time.monotonic()
        request_id = next(self._ids)

        def on_snapshot(message: p.Message) -> bool:
            limited = isinstance(message, p.ErrorReply) and message.code == LimitError.code
            if not self._proofs.answered(channel, request_id, limited):
                return True  # given up (Rule 4), or the PV was lost since: a newer one counts
            if isinstance(message, p.Snapshot):
                channel.apply_reply(message)
            elif isinstance(message, p.ErrorReply) and message.code in PERMANENT_ERRORS:
                with channel.cond:
                    channel.error = error_from_code(message.code, message.message)
                    channel.cond.notify_all()
            elif isinstance(message, p.ErrorReply):
                channel.last_refusal = message.message  # said if the wait for it times out
            # Other errors (the actor or the daemon restarting) are passing: the channel
            # asks again (Rule 4) until it gets a snapshot.
            return True

        if self._send(p.ReadRequest(id=request_id, pv=channel.pv, publish=not channel.live)):
            self._requests.add(request_id, on_snapshot, now)
            self._proofs.sent(channel, request_id, now)
        else:
            self._proofs.not_sent(channel, now)

    def _release_channels(self, now: float) -> None:
        """Rule 7: a channel whose last user was collected lingers; one unused since
        ``CHANNEL_LINGER_S`` is unsubscribed and forgotten."""
        while self._released:
            channel = self._released.popleft()
            with self._channels_lock:
                channel.users -= 1
                if not channel.users:
                    channel.unused_since = now
                    self._lingering.append((now, channel))
        while self._lingering and self._lingering[0][0] + CHANNEL_LINGER_S <= now:
            since, channel = self._lingering.popleft()
            with self._channels_lock:
                if (channel.users or channel.kept or channel.unused_since != since
                        or self._channels.get(channel.pv) is not channel):
                    continue  # used again since (its later entry, if any, counts), or gone
                del self._channels[channel.pv]
            self._sub.setsockopt(zmq.UNSUBSCRIBE, p.topic(channel.pv))
            self._proofs.forget(channel)
            self._liveness.pvs_changed()

    def _all_channels(self) -> list[Channel]:
        with self._channels_lock:
            return list(self._channels.values())

    def resync(self, channel: Channel) -> None:
        """On the I/O thread: ask anew for ``channel``'s snapshot (its stream skipped, or has a new actor)."""
        self._request_snapshot(channel)

    def _prove_subscriptions(self, now: float) -> None:
        """Rule 4, for the channels that are due."""
        if not self._liveness.connected.is_set():
            return
        ask, given_up = self._proofs.due(now)
        for _, request_id in given_up:
            self._requests.discard(request_id)
        if given_up:
            log.warning("snapshots_unanswered", count=len(given_up), pvs=[c.pv for c, _ in given_up[:5]],
                        after_s=SNAPSHOT_TIMEOUT)
        for channel in ask:
            if not channel.live:
                # Anew, so that every hop forwards it again (a repeated subscribe is not).
                topic = p.topic(channel.pv)
                self._sub.setsockopt(zmq.UNSUBSCRIBE, topic)
                self._sub.setsockopt(zmq.SUBSCRIBE, topic)
            self._request_snapshot(channel)


