"""The Channel Access edge of an actor: a client on caproto's sans-I/O core, in the actor's loop.

The channels, and the requests on them, are kept here; names are found by ``actors/search.py``
(UDP) and spoken to over the circuits of ``actors/circuit.py`` (TCP).

Rule 1: this module and those two are the only ones that speak Channel Access. They decide
nothing: every response becomes an event on the actor's queue, and the actor's state
machine decides.
Rule 2: one thread, no waiting. The actor loop polls our sockets beside its ZeroMQ ones and
hands us what is ready (``service``) and the time (``tick``). A request (a put, a read) is
on the wire when ``put``/``read`` returns, or in its circuit's send buffer while the kernel's
is full. There is no thread hand-off on any path: a put costs the IOC's round trip and the
loop's own work.
Rule 3: a put's outcome comes from the IOC's WRITE_NOTIFY answer or its ErrorResponse, and
it is sent once. When a channel or its circuit drops, what was in flight is forgotten here:
the state machine answers it (its outcome unknown) as it hears of the disconnection.
Rule 4: a put's read-back travels right behind it. An IOC answers one circuit's requests in
order, so a read answered after the put's completion was read after it and is the read-back:
the put costs one round trip. A read answered first (EPICS base's server, an asynchronous
record) read the value from before the completion; another read follows the completion when
the state machine asks for it (``read_back``; state.py Rule 6). EPICS base's server answers
every such read first (it runs a put's record processing, and answers its completion, on
another thread), so there the read behind the put is wasted work for the IOC and the actor:
a channel whose last ``PIPELINE_EARLY`` pipelined reads all came before their completion
stops sending one, and tries again once every ``PIPELINE_RETRY`` puts, in case its server
(or its record) changed.
Rule 5: a circuit holds at most ``MAX_IN_FLIGHT`` requests waiting for an answer (reads and
puts, a put counting two): one more is failed at once, not sent. A record whose puts never
complete would otherwise hold an id each for good, and caproto's ids are 16 bits: with all
of them taken, its search for a free one never ends.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any, Callable

import caproto
import structlog
import zmq
from caproto import ChannelType

from pvhub.actors.circuit import POLLERR as _POLLERR
from pvhub.actors.circuit import POLLIN as _POLLIN
from pvhub.actors.circuit import POLLOUT as _POLLOUT
from pvhub.actors.circuit import RECEIVE_BYTES, Circuit, conn_timeout
from pvhub.actors.codec import (
    AccessEvent,
    ConnectionEvent,
    Event,
    MetadataEvent,
    PutAnsweredEvent,
    PutDoneEvent,
    ReadDoneEvent,
    ReadingEvent,
    metadata_of,
    put_count,
    put_error,
    read_problem,
    reading_of,
    scalar_write,
    text,
)
from pvhub.actors.search import MIN_RETRY, NameSearch
from pvhub.text import encoded

log = structlog.get_logger("pvhub.actor")

LIVENESS_PERIOD = 0.5
MAX_IN_FLIGHT = 20_000  # Rule 5: well below caproto's 65,536 ids per circuit
_FULL = "as many requests as an actor sends one IOC wait for its answers already (backend.py Rule 5)"
_CREATE_FAILED_RETRY = 1.0
PIPELINE_EARLY = 8  # Rule 4: pipelined reads answered before their put's completion, in a row
PIPELINE_RETRY = 64  # Rule 4: puts without a pipelined read before one is tried again


@dataclass
class _PutRace:
    """A put and its pipelined read-back (Rule 4): which answered, and whether it is over."""

    read_pending: bool = True
    completed: bool = False
    finished: bool = False


@dataclass(eq=False)
class Channel:
    """One name the actor asked for: its search, and once found its circuit and caproto's
    channel on it."""

    name: str
    search_id: int | None = None
    search_due: float = 0.0  # when its search goes next: the one heap entry that counts
    interval: float = MIN_RETRY
    circuit: Circuit | None = None
    ca: Any = None  # caproto's ClientChannel, once its circuit is up
    connected: bool = False
    subscription: int | None = None
    described: bool = False  # its control structure (the metadata) has been read on this circuit
    describing: bool = False  # a read of its control structure is in flight
    reads_early: int = 0  # Rule 4: pipelined reads in a row answered before their put's completion
    unpiped: int = 0  # Rule 4: puts sent without a pipelined read since the last one with


class ChannelAccessBackend:
    """The Channel Access client of one actor: its search socket, circuits and channels.

    ``watch(fd, flags)`` is the actor loop's poller registration (``flags`` 0: forget the fd);
    ``emit`` takes each event.
    """

    def __init__(self, emit: Callable[[Event], None], watch: Callable[[int, int], None]) -> None:
        self._emit = emit
        self._watch = watch
        self._channels: dict[str, Channel] = {}
        self._circuits: dict[tuple[str, int], Circuit] = {}
        self._by_fd: dict[int, Circuit] = {}
        self._search = NameSearch(self._found, watch)
        self._search_fd = self._search.fileno()  # compared with every ready fd
        self._received = bytearray(RECEIVE_BYTES)  # every circuit receives into it
        self._conn_timeout = conn_timeout()
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
        channel = Channel(name)
        self._channels[name] = channel
        self._search.start(channel, delay=0.0)

    def remove(self, name: str) -> None:
        """Forget ``name``: its searches stop, its channel is cleared; a later ``add`` starts
        afresh."""
        channel = self._channels.pop(name, None)
        if channel is None:
            return
        self._search.stop(channel)
        circuit = channel.circuit
        if circuit is None:
            return
        if channel in circuit.waiting:
            circuit.waiting.remove(channel)
        circuit.forget(channel)
        if channel.ca is not None and channel.connected:
            channel.connected = False
            circuit.send(channel.ca.clear())
        # A channel still being created is cleared when the IOC answers (``_created``).

    def put(self, name: str, put_id: int, value: Any) -> None:
        """Put with completion. The read-back is sent right behind the put, on the same
        circuit (Rule 4). A failure is a ``PutDoneEvent`` with its error; a completion is a
        ``PutAnsweredEvent``, then a ``PutDoneEvent`` when the read behind it answers, or
        when ``read_back`` is asked for (that read answered before the completion)."""
        channel = self._channels.get(name)
        if channel is None or not channel.connected or channel.circuit is None:
            self._emit(PutDoneEvent(name, put_id, "put could not be sent: the channel is not connected", None))
            return
        circuit = channel.circuit
        if len(circuit.operations) + 2 > MAX_IN_FLIGHT:
            self._emit(PutDoneEvent(name, put_id, f"put could not be sent: {_FULL}", None))
            return
        native = channel.ca.native_data_type
        pipeline = channel.reads_early < PIPELINE_EARLY or channel.unpiped >= PIPELINE_RETRY
        channel.unpiped = 0 if pipeline else channel.unpiped + 1
        race = _PutRace(read_pending=pipeline)

        def on_write(response: Any) -> None:
            error = put_error(response)
            race.completed = True
            if error is not None:
                race.finished = True
                self._emit(PutDoneEvent(name, put_id, error, None))
                return
            # Whether to read back (when the pipelined read came too early) is the state
            # machine's call: a monitor update may have shown the value already (state.py Rule 6).
            self._emit(PutAnsweredEvent(name, put_id, race.read_pending))

        def on_read(response: Any) -> None:
            race.read_pending = False
            if response is not None and not race.finished:  # answered, after a put not failed
                channel.reads_early = 0 if race.completed else channel.reads_early + 1
            if race.finished or not race.completed:
                return  # the put failed, or this read was answered before its completion
            race.finished = True
            self._put_read_back(name, put_id, native, response)

        ca_channel = channel.ca
        write_ioid = circuit.core.new_ioid()
        # One number, the usual put, goes on the wire without caproto's objects (circuit.py
        # Rule 1); caproto builds the rest.
        data = scalar_write(native, value, ca_channel.sid, write_ioid)
        if data is None:
            try:
                write = ca_channel.write(encoded(value), data_count=put_count(value), notify=True, ioid=write_ioid)
            except Exception as exc:  # a value caproto cannot put on the wire
                self._emit(PutDoneEvent(name, put_id, f"put could not be sent: {exc}", None))
                return
        circuit.operations[write_ioid] = (channel, on_write, True)
        read_ioids: tuple[int, ...] = ()
        if pipeline:
            read_ioids = (circuit.core.new_ioid(),)
            circuit.operations[read_ioids[0]] = (channel, on_read, True)
        # With a read behind it, both go in one segment: the write queued, the read sends them (Rule 4).
        if data is not None:
            sent = circuit.send_bytes(ca_channel, data, write_ioid, push=not pipeline)
        else:
            sent = circuit.send(write, push=not pipeline)
        if not sent:
            circuit.not_sent(write_ioid, *read_ioids)
        elif read_ioids and not circuit.send_read(ca_channel, read_ioids[0]):
            circuit.push()  # the put goes alone; its completion asks for a read-back
            circuit.not_sent(*read_ioids)

    def read_back(self, name: str, put_id: int) -> None:
        """Read a completed put's value back; a ``PutDoneEvent`` follows (without a read-back
        if the channel is gone: the put completed, its value is not known)."""
        channel = self._channels.get(name)
        if channel is None or not channel.connected or channel.circuit is None:
            self._emit(PutDoneEvent(name, put_id, None, None))
            return
        native = channel.ca.native_data_type
        self._read(channel, "time", lambda r: self._put_read_back(name, put_id, native, r))

    def describe(self, name: str) -> None:
        """Read the control structure again (a property changed: state.py Rule 7); a
        ``MetadataEvent`` follows. One such read in flight per channel at most."""
        channel = self._channels.get(name)
        if channel is not None and channel.connected and channel.circuit is not None and not channel.describing:
            self._describe(channel.circuit, channel)

    def read(self, name: str, read_id: int) -> None:
        """A Channel Access read (DBR_TIME); a ``ReadDoneEvent`` follows."""
        channel = self._channels.get(name)
        if channel is None or not channel.connected:
            log.warning("read_not_sent", pv=name, error="not connected")
            self._emit(ReadDoneEvent(name, read_id, None))
            return
        native = channel.ca.native_data_type

        def on_read(response: Any) -> None:
            problem = read_problem(response)
            if problem is not None:
                log.warning("read_failed", pv=name, error=problem)
            reading = reading_of(response, native) if problem is None else None
            self._emit(ReadDoneEvent(name, read_id, reading))

        self._read(channel, "time", on_read)

    def close(self) -> None:
        """Close every socket. The IOCs see their circuits close and drop our monitors."""
        for circuit in list(self._circuits.values()):
            circuit.close()
        self._circuits.clear()
        self._by_fd.clear()
        self._search.close()

    # --- what the loop hands us ----------------------------------------------------------------

    def owns(self, fd: int) -> bool:
        return fd == self._search_fd or fd in self._by_fd

    def service(self, fd: int, events: int) -> None:
        """``fd`` is ready (``events``: the poller's flags)."""
        if fd == self._search_fd:
            self._search.receive()
            return
        circuit = self._by_fd.get(fd)
        if circuit is None:
            return
        if not circuit.connected:
            if events & (_POLLOUT | _POLLERR):
                circuit.finish_connecting(self._host_name, self._user)
            return
        if events & _POLLOUT and circuit.outbox:
            circuit.flush()
        if events & (_POLLIN | _POLLERR) and self._circuits.get(circuit.address) is circuit:
            circuit.receive()

    def timeout(self, now: float) -> float | None:
        """Seconds until ``tick`` has something to do, or None."""
        due = self._search.timeout(now)
        if self._circuits:
            liveness = self._next_liveness - now
            due = liveness if due is None else min(due, liveness)
        return None if due is None else max(0.0, due)

    def tick(self, now: float) -> None:
        """Send the searches that are due; check the circuits' liveness (``actors/circuit.py``
        Rule 3)."""
        self._search.tick(now)
        if self._circuits and now >= self._next_liveness:
            self._next_liveness = now + LIVENESS_PERIOD
            for circuit in list(self._circuits.values()):
                circuit.check_liveness(now, self._conn_timeout, self._echo_timeout)

    # --- connecting ----------------------------------------------------------------------------

    def _found(self, channel: Channel, address: tuple[str, int]) -> None:
        """A server answered the search for ``channel``: connect to it there."""
        circuit = self._circuits.get(address) or self._open_circuit(address)
        if circuit is None:
            self._search.start(channel, delay=channel.interval)
            return
        channel.circuit = circuit
        if circuit.ready:
            self._create(circuit, channel)
        else:
            circuit.waiting.append(channel)

    def _open_circuit(self, address: tuple[str, int]) -> Circuit | None:
        circuit = Circuit.open(address, emit=self._emit, handle=self._handle, drop=self._drop,
                               watch=self._watch, received=self._received)  # fmt: skip
        if circuit is not None:
            self._circuits[address] = circuit
            self._by_fd[circuit.sock.fileno()] = circuit
        return circuit

    def _ready(self, circuit: Circuit) -> None:
        """The IOC told its version: create the channels that wait for the circuit."""
        if circuit.ready or circuit.core.states[caproto.CLIENT] is not caproto.CONNECTED:
            return
        circuit.ready = True
        waiting, circuit.waiting = circuit.waiting, []
        for channel in waiting:
            self._create(circuit, channel)

    def _create(self, circuit: Circuit, channel: Channel) -> None:
        channel.ca = caproto.ClientChannel(channel.name, circuit.core)
        circuit.by_cid[channel.ca.cid] = channel
        circuit.send(channel.ca.create())

    # --- what the IOCs answer ------------------------------------------------------------------

    def _handle(self, circuit: Circuit, command: Any) -> None:
        if isinstance(command, (caproto.ReadNotifyResponse, caproto.WriteNotifyResponse)):
            operation = circuit.operations.pop(command.ioid, None)
            if operation is not None:
                operation[1](command)
        elif isinstance(command, caproto.EventAddResponse):
            channel = circuit.by_subscription.get(command.subscriptionid)
            # Off the fast path (circuit.py): an empty array, or an update that is no value
            # (read access gone: the IOC says so in its status, with zeros for a payload).
            if channel is not None and command.payload_size and read_problem(command) is None:
                self._emit(ReadingEvent(channel.name, reading_of(command, channel.ca.native_data_type)))
        elif isinstance(command, caproto.AccessRightsResponse):
            channel = circuit.by_cid.get(command.cid)
            if channel is not None:
                rights = command.access_rights
                readable = bool(rights & caproto.AccessRights.READ)
                self._emit(AccessEvent(channel.name, read_access=readable,
                                       write_access=bool(rights & caproto.AccessRights.WRITE)))  # fmt: skip
                if readable and channel.connected and not channel.described:
                    self._describe(circuit, channel)  # refused while it could not be read
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

    def _created(self, circuit: Circuit, cid: int) -> None:
        channel = circuit.by_cid.get(cid)
        if channel is None:
            return
        if self._channels.get(channel.name) is not channel:  # removed while being created
            del circuit.by_cid[cid]
            circuit.send(channel.ca.clear())
            return
        channel.connected = True
        channel.reads_early = channel.unpiped = 0  # a new circuit: perhaps another server (Rule 4)
        subscribe = channel.ca.subscribe(data_type="time")
        channel.subscription = subscribe.subscriptionid
        circuit.by_subscription[subscribe.subscriptionid] = channel
        self._emit(ConnectionEvent(channel.name, True))
        circuit.send(subscribe)
        self._describe(circuit, channel)

    def _describe(self, circuit: Circuit, channel: Channel) -> None:
        """Read the control structure: units, limits, precision, enum labels (the metadata).
        Refused (no read access yet), it is read again when read access comes."""
        native = channel.ca.native_data_type
        count = channel.ca.native_data_count
        name, host = channel.name, circuit.host

        def on_control(response: Any) -> None:
            channel.describing = False
            problem = read_problem(response)
            if problem is not None:
                log.warning("metadata_read_failed", pv=name, error=problem)
                return
            if channel.connected and channel.circuit is circuit:
                channel.described = True
            self._emit(MetadataEvent(name, metadata_of(response, native, count, host)))

        channel.describing = True
        self._read(channel, "control", on_control)

    def _refused(self, circuit: Circuit, response: Any) -> None:
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

    def _read(self, channel: Channel, data_type: str, on_answer: Callable[[Any], None]) -> None:
        circuit = channel.circuit
        assert circuit is not None
        if len(circuit.operations) >= MAX_IN_FLIGHT:
            log.warning("read_not_sent", pv=channel.name, error=_FULL)
            on_answer(None)  # as a request caproto refused: not sent (Rule 5)
            return
        ioid = circuit.core.new_ioid()
        circuit.operations[ioid] = (channel, on_answer, data_type == "time")
        if data_type == "time":
            sent = circuit.send_read(channel.ca, ioid)  # the bytes, without caproto's objects
        else:
            sent = circuit.send(channel.ca.read(data_type=data_type, ioid=ioid))
        if not sent:
            circuit.not_sent(ioid)

    def _put_read_back(self, name: str, put_id: int, native: ChannelType, response: Any) -> None:
        readback = None
        problem = read_problem(response)
        if problem is not None:
            # The put itself completed; only its read-back is lost (the monitor follows).
            log.warning("readback_failed", pv=name, error=problem)
        else:
            readback = reading_of(response, native)
        self._emit(PutDoneEvent(name, put_id, None, readback))

    # --- losing and finding again ---------------------------------------------------------------

    def _drop(self, circuit: Circuit, reason: str) -> None:
        """Close ``circuit``; its names are searched again (``actors/circuit.py`` Rule 3)."""
        if self._circuits.get(circuit.address) is not circuit:
            return
        del self._circuits[circuit.address]
        self._by_fd.pop(circuit.sock.fileno(), None)
        channels = list(dict.fromkeys([*circuit.by_cid.values(), *circuit.waiting]))
        circuit.close()
        log.warning("circuit_lost", host=circuit.host, reason=reason, pvs=len(channels))
        for channel in channels:
            if channel.connected:
                self._emit(ConnectionEvent(channel.name, False))
            if self._channels.get(channel.name) is channel:
                if circuit.ready:  # it worked: search again from the shortest interval
                    self._restart(channel, delay=0.0)
                else:  # a server that answers searches but not connections: back off
                    self._restart(channel, delay=channel.interval, reset=False)

    def _lost(self, circuit: Circuit, channel: Channel) -> None:
        """The IOC dropped one channel (its record went away)."""
        circuit.forget(channel)
        if channel.connected:
            self._emit(ConnectionEvent(channel.name, False))

    def _restart(self, channel: Channel, delay: float, reset: bool = True) -> None:
        channel.connected = False
        channel.described = channel.describing = False
        channel.circuit = None
        channel.ca = None
        channel.subscription = None
        if reset:
            channel.interval = MIN_RETRY
        self._search.start(channel, delay)


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
