"""A Channel Access circuit: one TCP connection to an IOC, on caproto's sans-I/O ``VirtualCircuit``.

The backend (``actors/backend.py``) opens circuits and keeps the channels on them; a circuit
connects, sends what it is given, receives and parses, and hands every response but a monitor
update back to the backend (``handle``). When its connection fails it asks to be dropped
(``drop``): the backend decides what becomes of its channels.

Rule 1: caproto keeps the protocol's state (each circuit's and channel's state machine, ids)
and parses every response but two: a monitor update in the DBR_TIME form we subscribed with,
since it is nearly all a busy actor receives, and a read's or a put's answer that reports
success, since a plan step waits on it; both are read straight from the received bytes
(``actors/codec.py``, its Rule 3). A DBR_TIME read is put on the wire the same way
(``send_read``). caproto's command objects and state machine cost more than the IOC's whole
round trip on this path; caproto still records every ioid, as its own ``send`` and ``recv``
would.
Rule 2: we acknowledge every TCP segment from an IOC at once (``TCP_QUICKACK`` after each
receive). caproto's own IOC server leaves Nagle's algorithm on (EPICS base's rsrv turns it
off), so it holds a small reply until its previous one is acknowledged, and Linux delays an
acknowledgement by 40 ms or more when the receiver looks interactive. A put meets exactly
that: the IOC answers WRITE_NOTIFY and holds the monitor update the write caused, and the
read-back's reply waits behind it for our delayed ACK (``bench/nagle_probe.py``). Against
an IOC with ``TCP_NODELAY`` this costs one empty ACK per receive and changes nothing else.
Rule 3: liveness. A circuit silent for ``EPICS_CA_CONN_TMO`` seconds is sent an echo; still
silent ``min(5 s, EPICS_CA_CONN_TMO)`` later, it is dropped and its names searched again.
Rule 4: bounds. A circuit's receive buffer holds at most one incomplete message, which may
not claim more than ``MAX_MESSAGE_BYTES``; a circuit that announces more is dropped. The
loop reads our sockets only while its event queue is short (``service`` is not called
otherwise), so an IOC faster than the actor is held back by TCP, and EPICS servers coalesce
monitor updates for a slow client, as Channel Access intends.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

import caproto
import structlog
import zmq

from pvhub.actors.codec import (
    ANSWERS,
    ECA_NORMAL,
    EVENT_ADD,
    EXTENDED,
    HEADER,
    PUT_ANSWER,
    READ_NOTIFY,
    Answer,
    Event,
    ReadingEvent,
    time_reading,
)

if TYPE_CHECKING:
    from pvhub.actors.backend import Channel

log = structlog.get_logger("pvhub.actor")

_SLOW = (None, None, False)  # an ioid not waited for, or one whose answer caproto parses

# A message's payload may not claim more (Rule 4): twice the largest array the daemon carries.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
RECEIVE_BYTES = 256 * 1024
CONNECT_TIMEOUT = 5.0

# Plain ints: pyzmq's flags are enums, and enum arithmetic on every poll result costs.
POLLIN, POLLOUT, POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)

# Linux only; elsewhere delayed acknowledgements are left to the system (Rule 2).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def conn_timeout() -> float:
    """``EPICS_CA_CONN_TMO``: how long a circuit may be silent before it is sent an echo."""
    try:
        return max(0.1, float(os.environ.get("EPICS_CA_CONN_TMO", "30")))
    except ValueError:
        return 30.0


class Circuit:
    """One circuit to an IOC: its socket, caproto's VirtualCircuit, the bytes on their way out
    and in, and the channels and requests on it (the backend fills those tables).

    ``emit`` takes each monitor update read from the bytes, ``handle(circuit, command)`` every
    other response once caproto has processed it, ``drop(circuit, reason)`` a circuit whose
    connection failed, and ``watch(fd, flags)`` is the actor loop's poller registration.
    ``received`` is a buffer every circuit receives into before keeping what it got.
    """

    def __init__(
        self,
        address: tuple[str, int],
        sock: socket.socket,
        *,
        emit: Callable[[Event], None],
        handle: Callable[[Circuit, Any], None],
        drop: Callable[[Circuit, str], None],
        watch: Callable[[int, int], None],
        received: bytearray,
    ) -> None:
        self.address = address
        self.host = "%s:%d" % address
        self.sock = sock
        self.core = caproto.VirtualCircuit(caproto.CLIENT, address, 0)
        self.started = time.monotonic()
        self.connected = False  # the TCP connection is up
        self.ready = False  # and the IOC has told its version: channels may be created
        self.waiting: list[Channel] = []  # to create once ready
        self.by_cid: dict[int, Channel] = {}
        self.by_subscription: dict[int, Channel] = {}
        # ioid -> (the channel, what to do with the answer, whether its answer may be read
        # from the bytes: a put's, or a DBR_TIME read's; Rule 1)
        self.operations: dict[int, tuple[Channel, Callable[[Any], None], bool]] = {}
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.last_heard = 0.0
        self.echo_sent: float | None = None
        self._writing = False  # watched for POLLOUT: the outbox holds what the kernel did not take
        self._emit = emit
        self._handle = handle
        self._drop = drop
        self._watch = watch
        self._received = received
        self._received_view = memoryview(received)

    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        *,
        emit: Callable[[Event], None],
        handle: Callable[[Circuit, Any], None],
        drop: Callable[[Circuit, str], None],
        watch: Callable[[int, int], None],
        received: bytearray,
    ) -> Circuit | None:
        """Start connecting to ``address``; None if the system refuses at once."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            log.warning("circuit_not_opened", host="%s:%d" % address, error=os.strerror(code))
            sock.close()
            return None
        circuit = cls(address, sock, emit=emit, handle=handle, drop=drop, watch=watch, received=received)
        watch(sock.fileno(), POLLOUT)
        return circuit

    def finish_connecting(self, host_name: str, user: str) -> None:
        """The socket is writable or broken: the connection is up, or it failed."""
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._drop(self, f"connection refused: {os.strerror(code)}")
            return
        self.connected = True
        self.last_heard = time.monotonic()
        self._watch(self.sock.fileno(), POLLIN)
        self.send(
            caproto.VersionRequest(priority=0, version=caproto.DEFAULT_PROTOCOL_VERSION),
            caproto.HostNameRequest(host_name),
            caproto.ClientNameRequest(user),
        )

    def close(self) -> None:
        """Close the socket (the IOC drops our channels and monitors) and forget what was on it."""
        self._watch(self.sock.fileno(), 0)
        self.sock.close()
        self.by_cid.clear()
        self.by_subscription.clear()
        self.operations.clear()
        self.waiting.clear()
        self.inbox.clear()

    # --- sending --------------------------------------------------------------------------------

    def send(self, *commands: Any, push: bool = True) -> bool:
        """Queue ``commands`` and (``push``) send what the kernel takes; False if caproto's
        state machine refused them (nothing was queued)."""
        try:
            buffers = self.core.send(*commands)
        except caproto.CaprotoError as exc:
            log.error("request_not_sent", host=self.host, error=str(exc))
            return False
        for buffer in buffers:
            # A header (ctypes) or data (a numpy array, of any dtype): its raw bytes.
            self.outbox += buffer.tobytes() if hasattr(buffer, "tobytes") else bytes(buffer)
        if push:
            self.push()
        return True

    def send_read(self, channel: caproto.ClientChannel, ioid: int) -> bool:
        """Queue and send a READ_NOTIFY of ``channel`` in its DBR_TIME form, the bytes caproto's
        ``read`` and ``send`` would queue (Rule 1); False, with nothing queued, where caproto's
        state machine would refuse it (the channel is not connected)."""
        # Count 0: "as many as the PV holds now" (a waveform's NORD), from protocol 4.13 on.
        count = 0 if channel.protocol_version >= 13 else channel.native_data_count
        if count >= 0xFFFF:  # an old server's long array: a header caproto knows how to extend
            return self.send(channel.read(data_type="time", ioid=ioid))
        data_type = caproto.field_types["time"][channel.native_data_type]
        return self.send_bytes(channel, HEADER.pack(READ_NOTIFY, 0, data_type, count, channel.sid, ioid), ioid)

    def send_bytes(self, channel: caproto.ClientChannel, data: bytes, ioid: int, push: bool = True) -> bool:
        """Queue the request ``data`` of ``channel``, made by hand (``send_read``, a put of one
        number: Rule 1), and (``push``) send what the kernel takes; False, with nothing queued,
        where caproto's state machine would refuse it (the channel is not connected)."""
        if channel.states[caproto.CLIENT] is not caproto.CONNECTED:
            log.error("request_not_sent", host=self.host, error=f"{channel.name} is not connected")
            return False
        self.outbox += data
        self.core._ioids[ioid] = channel  # as caproto's send records it
        if push:
            self.push()
        return True

    def push(self) -> None:
        """Send what is queued, unless the kernel's buffer is full: then the poller says when
        it takes more (``flush``)."""
        if not self._writing:
            self.flush()

    def flush(self) -> None:
        """Send what the kernel takes of the outbox; the poller says when it takes more."""
        try:
            sent = self.sock.send(self.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(self, f"send failed: {exc}")
            return
        del self.outbox[:sent]
        waiting = bool(self.outbox)
        if waiting != self._writing:  # the poller is told only of a change
            self._writing = waiting
            self._watch(self.sock.fileno(), POLLIN | POLLOUT if waiting else POLLIN)

    def not_sent(self, *ioids: int) -> None:
        """Answer requests that never left (refused by caproto's state machine) with None, so
        that nothing waits for them (``actors/backend.py`` Rule 3)."""
        for ioid in ioids:
            self.core._ioids.pop(ioid, None)
            operation = self.operations.pop(ioid, None)
            if operation is not None:
                operation[1](None)

    def forget(self, channel: Channel) -> None:
        """Forget the channel's requests in flight and its monitor, here and in caproto (the
        channel went: cleared by us, or dropped by the IOC)."""
        # O(the circuit's requests in flight): only when a channel goes. caproto's own record
        # of each goes too: its ids are 16 bits, and an id never freed is never reused.
        for ioid in [ioid for ioid, operation in self.operations.items() if operation[0] is channel]:
            del self.operations[ioid]
            self.core._ioids.pop(ioid, None)
        # caproto's circuit keeps every subscription until it hears it cancelled: a channel the
        # IOC dropped, or one we cleared, is never cancelled, and on a long-lived circuit (a
        # gateway's) the 16-bit subscription ids would run out.
        if channel.subscription is None:
            return
        self.by_subscription.pop(channel.subscription, None)
        self.core.event_add_commands.pop(channel.subscription, None)
        self.core.event_cancel_commands.pop(channel.subscription, None)
        channel.subscription = None

    # --- receiving ------------------------------------------------------------------------------

    def receive(self) -> None:
        """The socket is readable: take what came and act on every whole message."""
        sock = self.sock
        try:
            # Into one buffer kept for all receives: ``recv(n)`` allocates n bytes each time,
            # and at 256 KiB the allocator maps and unmaps them, two system calls a receive.
            size = sock.recv_into(self._received)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(self, f"receive failed: {exc}")
            return
        if not size:
            self._drop(self, "the IOC closed the circuit")
            return
        if _TCP_QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass  # the socket is closing: the next receive says so
        self.last_heard = time.monotonic()
        self.echo_sent = None
        self.inbox += self._received_view[:size]
        try:
            self._parse()
        except Exception as exc:  # the IOC broke the protocol: start afresh
            log.exception("circuit_protocol_error", host=self.host)
            self._drop(self, f"protocol error: {exc}")

    def _parse(self) -> None:
        """Every whole message in the inbox (Rule 1 for monitor updates)."""
        buf = self.inbox
        end = len(buf)
        at = 0
        subscriptions = self.by_subscription
        operations = self.operations
        while end - at >= 16:
            command, size, data_type, count, parameter1, parameter2 = HEADER.unpack_from(buf, at)
            header = 16
            if size == 0xFFFF and count == 0:
                if end - at < 24:
                    break
                size, count = EXTENDED.unpack_from(buf, at + 16)
                header = 24
            if size > MAX_MESSAGE_BYTES:
                raise caproto.RemoteProtocolError(f"a message of {size} bytes announced")
            whole = header + size
            if end - at < whole:
                break
            if command == EVENT_ADD and parameter1 == ECA_NORMAL and size:
                channel = subscriptions.get(parameter2)
                if channel is not None:
                    reading = time_reading(buf, at + header, size, data_type, count)
                    if reading is not None:
                        self._emit(ReadingEvent(channel.name, reading))
                        at += whole
                        continue
            elif command in ANSWERS and parameter1 == ECA_NORMAL and operations.get(parameter2, _SLOW)[2]:
                if command == READ_NOTIFY:
                    reading = time_reading(buf, at + header, size, data_type, count)
                    answer = None if reading is None else Answer(reading)
                else:
                    answer = PUT_ANSWER
                if answer is not None:
                    self.core._ioids.pop(parameter2, None)  # as caproto's recv of it would
                    operations.pop(parameter2)[1](answer)
                    at += whole
                    if self.sock.fileno() == -1:
                        return  # dropped by what the answer led to
                    continue
            if (command == EVENT_ADD and parameter2 not in self.core.event_add_commands) or (
                    command in ANSWERS and parameter2 not in self.core._ioids):
                at += whole  # a late word for a channel cleared (``forget``)
                continue
            self._process(bytes(buf[at:at + whole]))
            at += whole
            if self.sock.fileno() == -1:
                return  # dropped while processing
        del buf[:at]

    def _process(self, message: bytes) -> None:
        core = self.core
        commands, _ = core.recv(message)
        for command in commands:
            try:
                core.process_command(command)
            except caproto.CaprotoError as exc:  # out of turn (a late answer): nothing to do
                log.warning("ca_message_ignored", host=self.host, message=type(command).__name__, error=str(exc))
                continue
            self._handle(self, command)

    # --- liveness (Rule 3) ----------------------------------------------------------------------

    def check_liveness(self, now: float, conn_timeout: float, echo_timeout: float) -> None:
        """Drop a circuit that never came up or stopped answering; send a silent one an echo."""
        if not self.ready:
            if now - self.started > CONNECT_TIMEOUT:
                self._drop(self, "no connection within %g s" % CONNECT_TIMEOUT)
        elif self.echo_sent is not None:
            if now - self.echo_sent > echo_timeout:
                self._drop(self, "the IOC stopped answering")
        elif now - self.last_heard > conn_timeout:
            self.echo_sent = now
            self.send(caproto.EchoRequest())
