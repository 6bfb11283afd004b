"""The Channel Access edge of an actor: a client on caproto's sans-I/O core, in the actor's loop.

Rule 1: this is the only module that speaks Channel Access. It decides nothing: every
response becomes an event on the actor's queue, and the actor's state machine decides.
Rule 2: one thread, no waiting. The actor loop polls our sockets beside its ZeroMQ ones and
hands us what is ready (``service``) and the time (``tick``). A request (a put, a read) is
on the wire when ``put``/``read`` returns, or in its circuit's send buffer while the kernel's
is full. There is no thread hand-off on any path: a put costs the IOC's round trip and the
loop's own work.
Rule 3: caproto keeps the protocol's state (each circuit's and channel's state machine, ids)
and parses every response but one: a monitor update in the DBR_TIME form we subscribed with
is read straight from the received bytes (``actors/codec.py``, its Rule 3), since it is
nearly all a busy actor receives.
Rule 4: a put's outcome comes from the IOC's WRITE_NOTIFY answer or its ErrorResponse, and
it is sent once. When a channel or its circuit drops, what was in flight is forgotten here:
the state machine answers it (its outcome unknown) as it hears of the disconnection.
Rule 5: we acknowledge every TCP segment from an IOC at once (``TCP_QUICKACK`` after each
receive). caproto's own IOC server leaves Nagle's algorithm on (EPICS base's rsrv turns it
off), so it holds a small reply until its previous one is acknowledged, and Linux delays an
acknowledgement by 40 ms or more when the receiver looks interactive. A put meets exactly
that: the IOC answers WRITE_NOTIFY and holds the monitor update the write caused, and the
read-back's reply waits behind it for our delayed ACK (``bench/nagle_probe.py``). Against
an IOC with ``TCP_NODELAY`` this costs one empty ACK per receive and changes nothing else.
Rule 6: a put's read-back travels right behind it. An IOC answers one circuit's requests in
order, so a read answered after the put's completion was read after it and is the read-back:
the put costs one round trip. A read answered first (an asynchronous record: a motor, a busy
record) read the value from before the completion; another read follows the completion.
Rule 7: searching. A name is searched at once, then again after ``MIN_RETRY`` seconds,
doubling up to ``MAX_RETRY`` (caproto's client settings, from the same environment
variables), until a server answers; a name whose circuit or channel drops starts again from
the shortest interval. Searches wait in a heap by due time, so a tick costs what is due, not
what is searched. The first server to answer a name gets it.
Rule 8: liveness. A circuit silent for ``EPICS_CA_CONN_TMO`` seconds is sent an echo; still
silent ``min(5 s, EPICS_CA_CONN_TMO)`` later, it is dropped and its names searched again.
Rule 9: bounds. A circuit's receive buffer holds at most one incomplete message, which may
not claim more than ``MAX_MESSAGE_BYTES``; a circuit that announces more is dropped. The
loop reads our sockets only while its event queue is short (``service`` is not called
otherwise), so an IOC faster than the actor is held back by TCP, and EPICS servers coalesce
monitor updates for a slow client, as Channel Access intends.
Rule 10: beacons. The search socket registers with the host's CA repeater (caRepeater or
caproto-repeater, on ``EPICS_CA_REPEATER_PORT``; again every ``REGISTER_RETRY`` seconds until
it confirms) and so hears the IOCs' beacons. A server heard for the first time, or whose
beacons come four times faster than before (it restarted), sends every name not yet found
searching again at once, from the shortest interval: an IOC that comes back is found as it
starts, not at the next search up to ``MAX_RETRY`` later. At most once per
``BEACON_SEARCH_GAP``, so a network of starting IOCs costs a few searches a second; servers
are remembered up to ``MAX_BEACON_SERVERS``. Without a repeater nothing changes but that.
"""

from __future__ import annotations

import collections
import errno
import getpass
import heapq
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import caproto
import structlog
import zmq
from caproto import ChannelType
from caproto.client import common as _ca_common

from pvhub.actors.codec import (
    ANSWERS,
    ECA_NORMAL,
    EVENT_ADD,
    EXTENDED,
    HEADER,
    AccessEvent,
    ConnectionEvent,
    Event,
    MetadataEvent,
    PutDoneEvent,
    ReadDoneEvent,
    ReadingEvent,
    metadata_of,
    put_error,
    reading_of,
    text,
    time_reading,
)

log = structlog.get_logger("pvhub.actor")

# A message's payload may not claim more (Rule 9): twice the largest array the daemon carries.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_RECV_BYTES = 256 * 1024
MIN_RETRY = _ca_common.MIN_RETRY_SEARCHES_INTERVAL
MAX_RETRY = _ca_common.MAX_RETRY_SEARCHES_INTERVAL
SEARCH_DATAGRAM_BYTES = 1472  # one Ethernet frame
CONNECT_TIMEOUT = 5.0
REGISTER_RETRY = 10.0  # Rule 10: caproto's client waits as long
BEACON_SEARCH_GAP = 0.5
MAX_BEACON_SERVERS = 10_000
LIVENESS_PERIOD = 0.5
_CREATE_FAILED_RETRY = 1.0

# Plain ints: pyzmq's flags are enums, and enum arithmetic on every poll result costs.
_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)

# Linux only; elsewhere delayed acknowledgements are left to the system (Rule 5).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _conn_timeout() -> float:
    try:
        return max(0.1, float(os.environ.get("EPICS_CA_CONN_TMO", "30")))
    except ValueError:
        return 30.0


# --- our state of channels and circuits ---------------------------------------------------------


@dataclass
class _PutRace:
    """A put and its pipelined read-back (Rule 6): which answered, and whether it is over."""

    read_pending: bool = True
    completed: bool = False
    finished: bool = False


@dataclass(eq=False)
class _Channel:
    name: str
    search_id: int | None = None
    interval: float = MIN_RETRY
    circuit: _Circuit | None = None
    ca: Any = None  # caproto's ClientChannel, once its circuit is up
    connected: bool = False
    subscription: int | None = None


@dataclass(eq=False)
class _Circuit:
    address: tuple[str, int]
    sock: socket.socket
    core: Any  # caproto's VirtualCircuit
    started: float
    connected: bool = False  # the TCP connection is up
    ready: bool = False  # and the IOC has told its version: channels may be created
    waiting: list[_Channel] = field(default_factory=list)  # to create once ready
    by_cid: dict[int, _Channel] = field(default_factory=dict)
    by_subscription: dict[int, _Channel] = field(default_factory=dict)
    # ioid -> (the channel, what to do with the answer)
    operations: dict[int, tuple[_Channel, Callable[[Any], None]]] = field(default_factory=dict)
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    last_heard: float = 0.0
    echo_sent: float | None = None
    writing: bool = False  # watched for POLLOUT: the outbox holds what the kernel did not take

    @property
    def host(self) -> str:
        return "%s:%d" % self.address


class ChannelAccessBackend:
    """The Channel Access client of one actor: its search socket, circuits and channels.

    ``watch(fd, flags)`` is the actor loop's poller registration (``flags`` 0: forget the fd);
    ``emit`` takes each event.
    """

    def __init__(self, emit: Callable[[Event], None], watch: Callable[[int, int], None]) -> None:
        self._emit = emit
        self._watch = watch
        self._channels: dict[str, _Channel] = {}
        self._circuits: dict[tuple[str, int], _Circuit] = {}
        self._by_fd: dict[int, _Circuit] = {}
        self._searching: dict[int, _Channel] = {}  # search id -> channel
        self._due: list[tuple[float, int]] = []  # (when, search id): a heap (Rule 7)
        self._search_ids = itertools.count(1)
        self._servers = caproto.get_client_address_list()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self._udp.setblocking(False)
        self._udp.bind(("", 0))
        self._watch(self._udp.fileno(), _POLLIN)
        # Rule 10: the repeater, and what its beacons said of each server (last seen, interval).
        environment = caproto.get_environment_variables()
        self._repeater = (caproto.get_local_address(), int(environment["EPICS_CA_REPEATER_PORT"]))
        self._registered = False
        self._register_due = 0.0
        self._beacons: dict[tuple[str, int], tuple[float, float]] = {}
        self._beacon_search_at = -BEACON_SEARCH_GAP
        self._received = bytearray(_RECV_BYTES)
        self._received_view = memoryview(self._received)
        self._conn_timeout = _conn_timeout()
        self._echo_timeout = min(5.0, self._conn_timeout)
        self._next_liveness = 0.0
        self._host_name = socket.gethostname()
        try:
            self._user = getpass.getuser()
        except Exception:  # no user name in this environment: the IOC only logs it
            self._user = "pvhub"

    # --- what the actor asks -------------------------------------------------------------------

    def add(self, name: str) -> None:
        """Connect ``name`` and keep it monitored (searched at the next ``tick``)."""
        if name in self._channels:
            return
        channel = _Channel(name)
        self._channels[name] = channel
        self._search(channel, delay=0.0)

    def remove(self, name: str) -> None:
        """Forget ``name``: its searches stop, its channel is cleared; a later ``add`` starts
        afresh."""
        channel = self._channels.pop(name, None)
        if channel is None:
            return
        if channel.search_id is not None:
            self._searching.pop(channel.search_id, None)
        circuit = channel.circuit
        if circuit is None:
            return
        if channel in circuit.waiting:
            circuit.waiting.remove(channel)
        self._forget_operations(circuit, channel)
        self._forget_subscription(circuit, channel)
        if channel.ca is not None and channel.connected:
            channel.connected = False
            self._send(circuit, channel.ca.clear())
        # A channel still being created is cleared when the IOC answers (``_created``).

    def put(self, name: str, put_id: int, value: Any) -> None:
        """Put with completion; a ``PutDoneEvent`` follows. The read-back is sent right
        behind the put, on the same circuit (Rule 6)."""
        channel = self._channels.get(name)
        if channel is None or not channel.connected or channel.circuit is None:
            self._emit(PutDoneEvent(name, put_id, "put could not be sent: the channel is not connected", None))
            return
        circuit = channel.circuit
        native = channel.ca.native_data_type
        race = _PutRace()

        def on_write(response: Any) -> None:
            error = put_error(response)
            race.completed = True
            if error is not None:
                race.finished = True
                self._emit(PutDoneEvent(name, put_id, error, None))
            elif not race.read_pending:  # the pipelined read was answered too early
                self._read(channel, "time", lambda r: self._put_read_back(name, put_id, native, r))

        def on_read(response: Any) -> None:
            race.read_pending = False
            if race.finished or not race.completed:
                return  # the put failed, or this read was answered before its completion
            race.finished = True
            self._put_read_back(name, put_id, native, response)

        try:
            write = channel.ca.write(value, notify=True, ioid=circuit.core.new_ioid())
            read = channel.ca.read(data_type="time", ioid=circuit.core.new_ioid())
        except Exception as exc:  # a value caproto cannot put on the wire
            self._emit(PutDoneEvent(name, put_id, f"put could not be sent: {exc}", None))
            return
        circuit.operations[write.ioid] = (channel, on_write)
        circuit.operations[read.ioid] = (channel, on_read)
        if not self._send(circuit, write, read):
            self._not_sent(circuit, write.ioid, read.ioid)

    def read(self, name: str, read_id: int) -> None:
        """A Channel Access read (DBR_TIME); a ``ReadDoneEvent`` follows."""
        channel = self._channels.get(name)
        if channel is None or not channel.connected:
            log.warning("read_not_sent", pv=name, error="not connected")
            self._emit(ReadDoneEvent(name, read_id, None))
            return
        native = channel.ca.native_data_type

        def on_read(response: Any) -> None:
            reading = None
            if response is not None and not isinstance(response, caproto.ErrorResponse):
                reading = reading_of(response, native)
            self._emit(ReadDoneEvent(name, read_id, reading))

        self._read(channel, "time", on_read)

    def close(self) -> None:
        """Close every socket. The IOCs see their circuits close and drop our monitors."""
        for circuit in list(self._circuits.values()):
            self._watch(circuit.sock.fileno(), 0)
            circuit.sock.close()
        self._circuits.clear()
        self._by_fd.clear()
        self._watch(self._udp.fileno(), 0)
        self._udp.close()

    # --- what the loop hands us ----------------------------------------------------------------

    def owns(self, fd: int) -> bool:
        return fd == self._udp.fileno() or fd in self._by_fd

    def service(self, fd: int, events: int) -> None:
        """``fd`` is ready (``events``: the poller's flags)."""
        if fd == self._udp.fileno():
            self._receive_datagrams()
            return
        circuit = self._by_fd.get(fd)
        if circuit is None:
            return
        if not circuit.connected:
            if events & (_POLLOUT | _POLLERR):
                self._connected(circuit)
            return
        if events & _POLLOUT and circuit.outbox:
            self._flush(circuit)
        if events & (_POLLIN | _POLLERR) and self._circuits.get(circuit.address) is circuit:
            self._receive(circuit)

    def timeout(self, now: float) -> float | None:
        """Seconds until ``tick`` has something to do, or None."""
        due = self._due[0][0] - now if self._due else None
        if not self._registered:
            register = self._register_due - now
            due = register if due is None else min(due, register)
        if self._circuits:
            liveness = self._next_liveness - now
            due = liveness if due is None else min(due, liveness)
        return None if due is None else max(0.0, due)

    def tick(self, now: float) -> None:
        """Send the searches that are due; check the circuits' liveness (Rule 8)."""
        if not self._registered and now >= self._register_due:
            self._register(now)
        if self._due and self._due[0][0] <= now:
            self._send_searches(now)
        if self._circuits and now >= self._next_liveness:
            self._next_liveness = now + LIVENESS_PERIOD
            self._check_liveness(now)

    # --- searching (Rule 7) --------------------------------------------------------------------

    def _search(self, channel: _Channel, delay: float) -> None:
        if channel.search_id is not None:
            self._searching.pop(channel.search_id, None)
        search_id = next(self._search_ids) & 0xFFFFFFFF
        channel.search_id = search_id
        self._searching[search_id] = channel
        heapq.heappush(self._due, (time.monotonic() + delay, search_id))

    def _send_searches(self, now: float) -> None:
        batch: list[bytes] = []
        batch_ids: list[int] = []
        size = 0
        version = bytes(caproto.VersionRequest(priority=0, version=caproto.DEFAULT_PROTOCOL_VERSION))
        while self._due and self._due[0][0] <= now:
            _, search_id = heapq.heappop(self._due)
            channel = self._searching.get(search_id)
            if channel is None or channel.search_id != search_id:
                continue  # answered or forgotten since
            request = bytes(caproto.SearchRequest(channel.name, search_id, caproto.DEFAULT_PROTOCOL_VERSION))
            if size + len(request) > SEARCH_DATAGRAM_BYTES - len(version) and batch:
                if not self._send_datagram(version + b"".join(batch)):
                    # The socket is full: this batch and the rest go again in 10 ms.
                    for unsent in (*batch_ids, search_id):
                        heapq.heappush(self._due, (now + 0.01, unsent))
                    return
                batch, batch_ids, size = [], [], 0
            batch.append(request)
            batch_ids.append(search_id)
            size += len(request)
            heapq.heappush(self._due, (now + channel.interval, search_id))
            channel.interval = min(MAX_RETRY, channel.interval * 2)
        if batch and not self._send_datagram(version + b"".join(batch)):
            for unsent in batch_ids:
                heapq.heappush(self._due, (now + 0.01, unsent))

    def _send_datagram(self, datagram: bytes) -> bool:
        for address in self._servers:
            try:
                self._udp.sendto(datagram, address)
            except BlockingIOError:
                return False
            except OSError as exc:  # an address the host cannot reach now: the others still may
                log.warning("search_not_sent", address="%s:%d" % address, error=str(exc))
        return True

    def _receive_datagrams(self) -> None:
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
                    self._found(command)
                elif isinstance(command, caproto.Beacon):
                    self._beacon(command, sender)
                elif isinstance(command, caproto.RepeaterConfirmResponse) and not self._registered:
                    self._registered = True
                    log.debug("repeater_registered", repeater="%s:%d" % self._repeater)

    # --- beacons (Rule 10) ---------------------------------------------------------------------

    def _register(self, now: float) -> None:
        self._register_due = now + REGISTER_RETRY
        try:
            self._udp.sendto(bytes(caproto.RepeaterRegisterRequest("0.0.0.0")), self._repeater)
        except OSError as exc:  # no repeater reachable now: later, again
            log.debug("repeater_not_reached", repeater="%s:%d" % self._repeater, error=str(exc))

    def _beacon(self, beacon: Any, sender: tuple[str, int]) -> None:
        now = time.monotonic()
        host = beacon.address if beacon.address not in ("0.0.0.0", "") else sender[0]
        server = (host, beacon.server_port)
        heard = self._beacons.pop(server, None)  # put back last: the oldest go first
        if heard is None:
            anomaly, interval = True, 0.0
            if len(self._beacons) >= MAX_BEACON_SERVERS:
                del self._beacons[next(iter(self._beacons))]
        else:
            interval = now - heard[0]
            anomaly = interval < heard[1] / 4  # faster than before: it restarted
        self._beacons[server] = (now, interval)
        if anomaly and self._searching and now - self._beacon_search_at >= BEACON_SEARCH_GAP:
            self._beacon_search_at = now
            for channel in list(self._searching.values()):
                channel.interval = MIN_RETRY
                self._search(channel, delay=0.0)

    def _found(self, response: Any) -> None:
        channel = self._searching.pop(response.cid, None)
        if channel is None or channel.search_id != response.cid:
            return  # answered already (another server, or an earlier datagram)
        channel.search_id = None
        address = caproto.extract_address(response)
        circuit = self._circuits.get(address) or self._open_circuit(address)
        if circuit is None:
            self._search(channel, delay=channel.interval)
            return
        channel.circuit = circuit
        if circuit.ready:
            self._create(circuit, channel)
        else:
            circuit.waiting.append(channel)

    # --- circuits -----------------------------------------------------------------------------

    def _open_circuit(self, address: tuple[str, int]) -> _Circuit | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            log.warning("circuit_not_opened", host="%s:%d" % address, error=os.strerror(code))
            sock.close()
            return None
        core = caproto.VirtualCircuit(caproto.CLIENT, address, 0)
        circuit = _Circuit(address, sock, core, started=time.monotonic())
        self._circuits[address] = circuit
        self._by_fd[sock.fileno()] = circuit
        self._watch(sock.fileno(), _POLLOUT)
        return circuit

    def _connected(self, circuit: _Circuit) -> None:
        code = circuit.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._drop(circuit, f"connection refused: {os.strerror(code)}")
            return
        circuit.connected = True
        circuit.last_heard = time.monotonic()
        self._watch(circuit.sock.fileno(), _POLLIN)
        self._send(
            circuit,
            caproto.VersionRequest(priority=0, version=caproto.DEFAULT_PROTOCOL_VERSION),
            caproto.HostNameRequest(self._host_name),
            caproto.ClientNameRequest(self._user),
        )

    def _ready(self, circuit: _Circuit) -> None:
        """The IOC told its version: create the channels that wait for the circuit."""
        if circuit.ready or circuit.core.states[caproto.CLIENT] is not caproto.CONNECTED:
            return
        circuit.ready = True
        waiting, circuit.waiting = circuit.waiting, []
        for channel in waiting:
            self._create(circuit, channel)

    def _create(self, circuit: _Circuit, channel: _Channel) -> None:
        channel.ca = caproto.ClientChannel(channel.name, circuit.core)
        circuit.by_cid[channel.ca.cid] = channel
        self._send(circuit, channel.ca.create())

    def _send(self, circuit: _Circuit, *commands: Any) -> bool:
        """Queue ``commands`` on the circuit and send what the kernel takes; False if caproto's
        state machine refused them (nothing was queued)."""
        try:
            buffers = circuit.core.send(*commands)
        except caproto.CaprotoError as exc:
            log.error("request_not_sent", host=circuit.host, error=str(exc))
            return False
        was_empty = not circuit.outbox
        for buffer in buffers:
            # A header (ctypes) or data (a numpy array, of any dtype): its raw bytes.
            circuit.outbox += buffer.tobytes() if hasattr(buffer, "tobytes") else bytes(buffer)
        if was_empty:
            self._flush(circuit)
        return True

    def _flush(self, circuit: _Circuit) -> None:
        try:
            sent = circuit.sock.send(circuit.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(circuit, f"send failed: {exc}")
            return
        del circuit.outbox[:sent]
        waiting = bool(circuit.outbox)
        if waiting != circuit.writing:  # the poller is told only of a change
            circuit.writing = waiting
            self._watch(circuit.sock.fileno(), _POLLIN | _POLLOUT if waiting else _POLLIN)

    def _receive(self, circuit: _Circuit) -> None:
        sock = circuit.sock
        try:
            # Into one buffer kept for all receives: ``recv(n)`` allocates n bytes each time,
            # and at 256 KiB the allocator maps and unmaps them, two system calls a receive.
            size = sock.recv_into(self._received)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(circuit, f"receive failed: {exc}")
            return
        if not size:
            self._drop(circuit, "the IOC closed the circuit")
            return
        if _TCP_QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass  # the socket is closing: the next receive says so
        circuit.last_heard = time.monotonic()
        circuit.echo_sent = None
        circuit.inbox += self._received_view[:size]
        try:
            self._parse(circuit)
        except Exception as exc:  # the IOC broke the protocol: start afresh
            log.exception("circuit_protocol_error", host=circuit.host)
            self._drop(circuit, f"protocol error: {exc}")

    def _parse(self, circuit: _Circuit) -> None:
        """Every whole message in the circuit's inbox (Rule 3 for monitor updates)."""
        buf = circuit.inbox
        end = len(buf)
        at = 0
        subscriptions = circuit.by_subscription
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
            if (command == EVENT_ADD and parameter2 not in circuit.core.event_add_commands) or (
                    command in ANSWERS and parameter2 not in circuit.core._ioids):
                at += whole  # a late word for a channel cleared (``_forget_subscription``)
                continue
            self._process(circuit, bytes(buf[at:at + whole]))
            at += whole
            if circuit.sock.fileno() == -1:
                return  # dropped while processing
        del buf[:at]

    def _process(self, circuit: _Circuit, message: bytes) -> None:
        core = circuit.core
        commands, _ = core.recv(message)
        for command in commands:
            try:
                core.process_command(command)
            except caproto.CaprotoError as exc:  # out of turn (a late answer): nothing to do
                log.warning("ca_message_ignored", host=circuit.host, message=type(command).__name__, error=str(exc))
                continue
            self._handle(circuit, command)

    def _handle(self, circuit: _Circuit, command: Any) -> None:
        if isinstance(command, (caproto.ReadNotifyResponse, caproto.WriteNotifyResponse)):
            operation = circuit.operations.pop(command.ioid, None)
            if operation is not None:
                operation[1](command)
        elif isinstance(command, caproto.EventAddResponse):
            channel = circuit.by_subscription.get(command.subscriptionid)
            if channel is not None and command.payload_size and command.status_code == ECA_NORMAL:
                self._emit(ReadingEvent(channel.name, reading_of(command, channel.ca.native_data_type)))
        elif isinstance(command, caproto.AccessRightsResponse):
            channel = circuit.by_cid.get(command.cid)
            if channel is not None:
                rights = command.access_rights
                self._emit(AccessEvent(channel.name, read_access=bool(rights & caproto.AccessRights.READ),
                                       write_access=bool(rights & caproto.AccessRights.WRITE)))  # fmt: skip
        elif isinstance(command, caproto.CreateChanResponse):
            self._created(circuit, command.cid)
        elif isinstance(command, caproto.ErrorResponse):
            self._refused(circuit, command)
        elif isinstance(command, caproto.VersionResponse):
            self._ready(circuit)
        elif isinstance(command, caproto.CreateChFailResponse):
            channel = circuit.by_cid.pop(command.cid, None)
            circuit.core.channels.pop(command.cid, None)
            if channel is not None and self._channels.get(channel.name) is channel:
                log.warning("channel_not_created", pv=channel.name, host=circuit.host)
                self._restart(channel, delay=_CREATE_FAILED_RETRY)
        elif isinstance(command, caproto.ServerDisconnResponse):
            channel = circuit.by_cid.pop(command.cid, None)
            if channel is not None:
                self._lost(circuit, channel)
                if self._channels.get(channel.name) is channel:
                    self._restart(channel, delay=0.0)
        elif isinstance(command, caproto.ClearChannelResponse):
            circuit.by_cid.pop(command.cid, None)

    def _created(self, circuit: _Circuit, cid: int) -> None:
        channel = circuit.by_cid.get(cid)
        if channel is None:
            return
        if self._channels.get(channel.name) is not channel:  # removed while being created
            del circuit.by_cid[cid]
            self._send(circuit, channel.ca.clear())
            return
        channel.connected = True
        subscribe = channel.ca.subscribe(data_type="time")
        channel.subscription = subscribe.subscriptionid
        circuit.by_subscription[subscribe.subscriptionid] = channel
        self._emit(ConnectionEvent(channel.name, True))
        native = channel.ca.native_data_type
        count = channel.ca.native_data_count
        name, host = channel.name, circuit.host

        def on_control(response: Any) -> None:
            if response is None:
                log.warning("metadata_read_not_sent", pv=name)
                return
            if isinstance(response, caproto.ErrorResponse):
                log.warning("metadata_read_refused", pv=name, error=text(bytes(response.error_message)))
                return
            self._emit(MetadataEvent(name, metadata_of(response, native, count, host)))

        control = channel.ca.read(data_type="control", ioid=circuit.core.new_ioid())
        circuit.operations[control.ioid] = (channel, on_control)
        if not self._send(circuit, subscribe, control):
            self._not_sent(circuit, control.ioid)

    def _refused(self, circuit: _Circuit, response: Any) -> None:
        request = response.original_request
        command = getattr(request, "command", None)
        if command in (caproto.ReadNotifyRequest.ID, caproto.WriteNotifyRequest.ID):
            ioid = request.parameter2
            circuit.core._ioids.pop(ioid, None)
            operation = circuit.operations.pop(ioid, None)
            if operation is not None:
                operation[1](response)
                return
        channel = circuit.by_cid.get(response.cid)
        log.warning("ioc_refused_request", host=circuit.host, pv=channel.name if channel else None,
                    request=command, error=text(bytes(response.error_message)))  # fmt: skip

    def _read(self, channel: _Channel, data_type: str, on_answer: Callable[[Any], None]) -> None:
        circuit = channel.circuit
        assert circuit is not None
        request = channel.ca.read(data_type=data_type, ioid=circuit.core.new_ioid())
        circuit.operations[request.ioid] = (channel, on_answer)
        if not self._send(circuit, request):
            self._not_sent(circuit, request.ioid)

    @staticmethod
    def _not_sent(circuit: _Circuit, *ioids: int) -> None:
        """Answer requests that never left (refused by caproto's state machine) with None, so
        that nothing waits for them (Rule 4)."""
        for ioid in ioids:
            circuit.core._ioids.pop(ioid, None)
            operation = circuit.operations.pop(ioid, None)
            if operation is not None:
                operation[1](None)

    def _put_read_back(self, name: str, put_id: int, native: ChannelType, response: Any) -> None:
        readback = None
        if response is None:
            log.warning("readback_not_sent", pv=name)
        elif isinstance(response, caproto.ErrorResponse):
            # The put itself completed; only its read-back is lost (the monitor follows).
            log.warning("readback_refused", pv=name, error=text(bytes(response.error_message)))
        else:
            readback = reading_of(response, native)
        self._emit(PutDoneEvent(name, put_id, None, readback))

    # --- losing and finding again ---------------------------------------------------------------

    def _check_liveness(self, now: float) -> None:
        for circuit in list(self._circuits.values()):
            if not circuit.ready:
                if now - circuit.started > CONNECT_TIMEOUT:
                    self._drop(circuit, "no connection within %g s" % CONNECT_TIMEOUT)
            elif circuit.echo_sent is not None:
                if now - circuit.echo_sent > self._echo_timeout:
                    self._drop(circuit, "the IOC stopped answering")
            elif now - circuit.last_heard > self._conn_timeout:
                circuit.echo_sent = now
                self._send(circuit, caproto.EchoRequest())

    def _drop(self, circuit: _Circuit, reason: str) -> None:
        """Close ``circuit``; its names are searched again (Rule 8)."""
        if self._circuits.get(circuit.address) is not circuit:
            return
        del self._circuits[circuit.address]
        fd = circuit.sock.fileno()
        self._by_fd.pop(fd, None)
        self._watch(fd, 0)
        circuit.sock.close()
        channels = list(dict.fromkeys([*circuit.by_cid.values(), *circuit.waiting]))
        log.warning("circuit_lost", host=circuit.host, reason=reason, pvs=len(channels))
        for channel in channels:
            if channel.connected:
                self._emit(ConnectionEvent(channel.name, False))
            if self._channels.get(channel.name) is channel:
                if circuit.ready:  # it worked: search again from the shortest interval
                    self._restart(channel, delay=0.0)
                else:  # a server that answers searches but not connections: back off
                    self._restart(channel, delay=channel.interval, reset=False)
        circuit.by_cid.clear()
        circuit.by_subscription.clear()
        circuit.operations.clear()
        circuit.waiting.clear()
        circuit.inbox.clear()

    def _lost(self, circuit: _Circuit, channel: _Channel) -> None:
        """The IOC dropped one channel (its record went away)."""
        self._forget_operations(circuit, channel)
        self._forget_subscription(circuit, channel)
        if channel.connected:
            self._emit(ConnectionEvent(channel.name, False))

    def _restart(self, channel: _Channel, delay: float, reset: bool = True) -> None:
        channel.connected = False
        channel.circuit = None
        channel.ca = None
        channel.subscription = None
        if reset:
            channel.interval = MIN_RETRY
        self._search(channel, delay)

    @staticmethod
    def _forget_operations(circuit: _Circuit, channel: _Channel) -> None:
        # O(the circuit's requests in flight): only when a channel goes. caproto's own record
        # of each goes too: its ids are 16 bits, and an id never freed is never reused.
        for ioid in [ioid for ioid, (owner, _) in circuit.operations.items() if owner is channel]:
            del circuit.operations[ioid]
            circuit.core._ioids.pop(ioid, None)

    @staticmethod
    def _forget_subscription(circuit: _Circuit, channel: _Channel) -> None:
        """Forget the channel's monitor here and in caproto, whose circuit keeps every
        subscription until it hears it cancelled: a channel the IOC dropped, or one we
        cleared, is never cancelled, and on a long-lived circuit (a gateway's) the 16-bit
        subscription ids would run out."""
        if channel.subscription is None:
            return
        circuit.by_subscription.pop(channel.subscription, None)
        circuit.core.event_add_commands.pop(channel.subscription, None)
        circuit.core.event_cancel_commands.pop(channel.subscription, None)
        channel.subscription = None




def poller_watch(poller: zmq.Poller) -> Callable[[int, int], None]:
    """The ``watch`` a backend is given: registers its sockets in ``poller`` (flags 0: forgets
    them)."""

    def watch(fd: int, flags: int) -> None:
        if flags:
            poller.register(fd, flags)
        else:
            try:
                poller.unregister(fd)
            except KeyError:
                pass

    return watch


class Driver:
    """A backend run on its own, without an actor (benchmarks, tests): the actor loop's part
    in small. Events other than the one waited for are dropped."""

    def __init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()
        self._poller = zmq.Poller()
        self.backend = ChannelAccessBackend(self._events.append, poller_watch(self._poller))

    def wait_for(self, wanted: Callable[[Event], bool], timeout: float) -> Event:
        """Run until an event ``wanted`` says yes to; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._events:
                event = self._events.popleft()
                if wanted(event):
                    return event
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"no such event within {timeout} s")
            due = self.backend.timeout(now)
            wait = deadline - now if due is None else min(due, deadline - now)
            for fd, flags in self._poller.poll(int(wait * 1000) + 1):
                self.backend.service(fd, flags)
            self.backend.tick(time.monotonic())

    def close(self) -> None:
        self.backend.close()
