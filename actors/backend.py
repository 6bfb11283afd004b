"""The Channel Access edge of an actor: caproto's threading client, turned into events.

Rule 1: this is the only module that speaks Channel Access. It decides nothing: every
callback becomes an event on the actor's queue, and the actor's state machine decides.
Rule 2: nothing here blocks the actor loop. caproto's ``PV.read``/``PV.write`` wait for a
connection first (its ``ensure_connected``); we call the undecorated methods, so a put on a
channel that just dropped fails at once instead of being sent later, when nobody expects it.
Rule 3: a put's outcome comes from the IOC's put-completion (WRITE_NOTIFY). caproto's
threading client drops the IOC's ``ErrorResponse`` to a put on the floor; we route it to the
put's callback, so a refused put fails instead of hanging.
Rule 4: we acknowledge every TCP segment from an IOC at once (``TCP_QUICKACK`` after each
receive). caproto's own IOC server leaves Nagle's algorithm on (EPICS base's rsrv turns it
off), so it holds a small reply until its previous one is acknowledged, and Linux delays an
acknowledgement by 40 ms or more when the receiver looks interactive. The actor's put meets
exactly that: the IOC answers WRITE_NOTIFY, and holds the monitor update the write caused;
our read-back request acknowledges the answer and releases the update; the read-back's reply
then waits behind the unacknowledged update for our delayed ACK. ``bench/nagle_probe.py``
shows the sequence and its variations. Against an IOC with ``TCP_NODELAY`` this costs one
empty ACK per receive and changes nothing else.
Rule 5: our callbacks run on caproto's selector thread, as the bytes are parsed (caproto
hands each to a per-circuit thread pool otherwise). They only turn a response into an event
and, at most, send one small request, so they never block; and the pool's queue, which
holds each response and with it the receive buffer it points into, no longer grows without
bound when the actor falls behind a burst of thousands of updating PVs (it reached
gigabytes): the socket's own buffer and TCP's flow control hold what we have not read, and
the IOC coalesces monitor updates for a slow client, as Channel Access intends. It also
saves a thread hop per response.
Rule 6: caproto parses what one receive brought by slicing the rest of it off, as a new
bytes object, after each command, and every response points into the rest it came from: a
receive of megabytes (all a busy socket holds, after a burst of thousands of PVs) costs time
quadratic in its size and pins copies of it. We hand caproto at most ``_PARSE_SLICE`` bytes at
a time, which bounds both.
Rule 7: a channel's monitor is asked for the moment the channel connects. caproto queues a
connected channel's subscriptions for its activation thread only after the connection
callbacks have run, so a wake-up from a callback comes too early and the thread sleeps its
period out (0.1 s: half of all first values took 100 ms); we wake it after the queueing.
Rule 8: a put's read-back travels right behind it. An IOC answers one circuit's requests in
the order it handles them, so a read answered after the put's completion was read after it
and is the read-back: the put costs one round trip. A read answered first (an asynchronous
record: a motor, a busy record) read the value from before the completion; another read
follows the completion then.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import caproto
import structlog
from caproto import ChannelType
from caproto.threading import client as ca_client

from pvhub import protocol as p

log = structlog.get_logger("pvhub.actor")

# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionEvent:
    pv: str
    connected: bool


@dataclass(frozen=True)
class AccessEvent:
    pv: str
    read_access: bool
    write_access: bool


@dataclass(frozen=True)
class MetadataEvent:
    pv: str
    metadata: p.PVMetadata


@dataclass(frozen=True)
class ReadingEvent:
    pv: str
    reading: p.Reading


@dataclass(frozen=True)
class PutDoneEvent:
    pv: str
    put_id: int
    error: str | None
    readback: p.Reading | None


@dataclass(frozen=True)
class ReadDoneEvent:
    pv: str
    read_id: int
    reading: p.Reading | None  # None: the read failed


Event = ConnectionEvent | AccessEvent | MetadataEvent | ReadingEvent | PutDoneEvent | ReadDoneEvent

_NATIVE_KIND = {
    ChannelType.STRING: "string",
    ChannelType.INT: "int",
    ChannelType.LONG: "int",
    ChannelType.FLOAT: "float",
    ChannelType.DOUBLE: "float",
    ChannelType.ENUM: "enum",
    ChannelType.CHAR: "char",
}

_LIMIT_FIELDS = (
    "lower_ctrl_limit",
    "upper_ctrl_limit",
    "lower_disp_limit",
    "upper_disp_limit",
    "lower_alarm_limit",
    "upper_alarm_limit",
    "lower_warning_limit",
    "upper_warning_limit",
)


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.split(b"\0", 1)[0].decode("latin-1")
    return str(raw)


def value_of(response: Any, native: ChannelType) -> Any:
    """The Python value of a read or monitor response: a scalar for one element, an array
    (or list of str) for more, like ophyd."""
    data = response.data
    if native == ChannelType.STRING:
        items = [_text(item) for item in data]
        return items[0] if len(items) == 1 else items
    if len(data) == 1:
        # ndarray.item(0) gives the Python scalar in one call (indexing first makes a numpy
        # scalar, then converts it): this runs for every monitor update and read-back.
        return data.item(0) if hasattr(data, "item") else data[0]
    return data.copy()


def reading_of(response: Any, native: ChannelType) -> p.Reading:
    md = response.metadata
    return p.Reading(
        value=value_of(response, native),
        timestamp=float(getattr(md, "timestamp", 0.0)),
        severity=int(getattr(md, "severity", 0)),
        status=int(getattr(md, "status", 0)),
    )


def metadata_of(response: Any, native: ChannelType, count: int, host: str) -> p.PVMetadata:
    md = response.metadata
    kind = _NATIVE_KIND.get(native, "float")
    out: p.PVMetadata = {"native_type": kind, "count": count, "host": host}
    # Fields the PV's control structure lacks (strings and enums have no units or limits)
    # are None, as ophyd reports them.
    out["units"] = _text(md.units) if hasattr(md, "units") else None  # type: ignore[typeddict-item]
    out["precision"] = int(md.precision) if hasattr(md, "precision") else None
    for name in _LIMIT_FIELDS:
        value = getattr(md, name, None)
        out[name] = value.item() if hasattr(value, "item") else value  # type: ignore[literal-required]
    out["enum_strs"] = (
        [_text(s) for s in md.enum_strings] if kind == "enum" and hasattr(md, "enum_strings") else None
    )
    return out


def _route_error_responses(manager_cls: type) -> None:
    """Give caproto's threading client the put-failure path it lacks (see Rule 3)."""
    if getattr(manager_cls, "_pvhub_routes_errors", False):
        return
    original = manager_cls._process_command

    def _process_command(self: Any, command: Any) -> Any:
        if isinstance(command, caproto.ErrorResponse):
            # The original request travels back as a bare header: parameter2 is its ioid.
            ioid = getattr(command.original_request, "parameter2", None)
            info = self.ioids.pop(ioid, None) if ioid is not None else None
            callback = info.get("callback") if info else None
            if callback is not None:
                self.user_callback_executor.submit(callback, command)
                return None
        return original(self, command)

    manager_cls._process_command = _process_command
    manager_cls._pvhub_routes_errors = True


_route_error_responses(ca_client.VirtualCircuitManager)

# Linux only; elsewhere delayed acknowledgements are left to the system (Rule 4).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _acknowledge_at_once(manager_cls: type) -> None:
    """Make caproto's circuits acknowledge every receipt without delay (see Rule 4).

    ``received`` runs on caproto's selector thread right after its ``recv``, before the bytes
    are parsed, so the ACK leaves as early as user space can send it. Linux re-arms delayed
    acknowledgement whenever we send soon after receiving, hence the option on every receipt,
    not once per socket.
    """
    if _TCP_QUICKACK is None or getattr(manager_cls, "_pvhub_acks_at_once", False):
        return
    original = manager_cls.received
    option = _TCP_QUICKACK

    def received(self: Any, bytes_recv: bytes, address: Any) -> Any:
        sock = self.socket
        if bytes_recv and sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, 1)
            except OSError as exc:
                # The socket closed under us: the next receive reports the disconnection, and
                # an ACK for a dead circuit is nothing lost.
                log.debug("quickack_not_set", error=str(exc))
        return original(self, bytes_recv, address)

    manager_cls.received = received
    manager_cls._pvhub_acks_at_once = True


_acknowledge_at_once(ca_client.VirtualCircuitManager)


_PARSE_SLICE = 64 * 1024


def _parse_in_slices(manager_cls: type) -> None:
    """Feed caproto's parser at most ``_PARSE_SLICE`` bytes at a time (Rule 6)."""
    if getattr(manager_cls, "_pvhub_parses_in_slices", False):
        return
    original = manager_cls.received

    def received(self: Any, bytes_recv: bytes, address: Any) -> Any:
        if len(bytes_recv) <= _PARSE_SLICE:
            return original(self, bytes_recv, address)
        result = None
        view = memoryview(bytes_recv)
        for start in range(0, len(bytes_recv), _PARSE_SLICE):
            # A command cut in two waits in the circuit's buffer for its second half.
            result = original(self, bytes(view[start:start + _PARSE_SLICE]), address)
        return result

    manager_cls.received = received
    manager_cls._pvhub_parses_in_slices = True


_parse_in_slices(ca_client.VirtualCircuitManager)


class _InlineExecutor:
    """Runs a callback at once, on the thread that submits it (Rule 5): the selector's."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # as the pool would: one callback's failure stops nothing else
            log.exception("callback_failed", callback=repr(fn))

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        pass


def _callbacks_inline(manager_cls: type) -> None:
    """Give every circuit an inline executor in place of its thread pool (Rule 5)."""
    if getattr(manager_cls, "_pvhub_callbacks_inline", False):
        return
    original = manager_cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        pool = self.user_callback_executor
        self.user_callback_executor = _InlineExecutor()
        pool.shutdown(wait=False)  # it has started no thread yet: it starts them on submit

    manager_cls.__init__ = __init__
    manager_cls._pvhub_callbacks_inline = True


_callbacks_inline(ca_client.VirtualCircuitManager)


def _activate_on_connect(pv_cls: type) -> None:
    """Wake caproto's subscription activation once a connected channel's subscriptions are
    queued for it (Rule 7)."""
    if getattr(pv_cls, "_pvhub_activates_on_connect", False):
        return
    original = pv_cls.connection_state_changed

    def connection_state_changed(self: Any, state: str, channel: Any) -> Any:
        result = original(self, state, channel)
        if state == "connected":
            manager = self.circuit_manager
            if manager is not None:
                manager.context.activate_subscriptions_now.set()
        return result

    pv_cls.connection_state_changed = connection_state_changed
    pv_cls._pvhub_activates_on_connect = True


_activate_on_connect(ca_client.PV)


@dataclass
class _PutRace:
    """A put and its pipelined read-back (Rule 8): which answered, and whether the put's
    event is out. Touched by the actor thread (sending) and caproto's selector thread."""

    read_pending: bool = False
    completed: bool = False
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _put_error(response: Any) -> str | None:
    """Why a put's completion says it failed, or None."""
    if isinstance(response, caproto.ErrorResponse):
        return f"IOC refused the put: {_text(bytes(response.error_message))}"
    status = getattr(response, "status", None)
    if status is not None and not getattr(status, "success", status == 1):
        return f"IOC reported the put failed: {getattr(status, 'description', None) or status}"
    return None


class ChannelAccessBackend:
    """Owns a caproto context and the channels of one actor's PVs."""

    def __init__(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit
        self._context = ca_client.Context()
        self._pvs: dict[str, Any] = {}
        self._subscriptions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        (pv,) = self._context.get_pvs(
            name,
            connection_state_callback=self._on_connection,
            access_rights_callback=self._on_access,
            timeout=None,
        )
        self._pvs[name] = pv
        subscription = pv.subscribe(data_type="time")
        subscription.add_callback(self._on_monitor)
        self._subscriptions[name] = subscription

    def remove(self, name: str) -> None:
        """Forget ``name``: its searches stop, its monitor is cleared, and a later ``add``
        starts afresh."""
        pv = self._pvs.pop(name, None)
        subscription = self._subscriptions.pop(name, None)
        if subscription is not None:
            try:
                subscription.clear()
            except Exception as exc:
                log.warning("monitor_not_cleared", pv=name, error=str(exc))
        self._context.broadcaster.cancel(name)
        if pv is not None:
            self._context.pvs.pop((name, pv.priority), None)

    # --- callbacks from caproto's threads ----------------------------------------------------

    def _on_connection(self, pv: Any, state: str) -> None:
        connected = state == "connected"
        self._emit(ConnectionEvent(pv.name, connected))
        if connected:
            # Its monitor is asked for as soon as caproto has queued it (Rule 7).
            self._read_metadata(pv)

    def _on_access(self, pv: Any, rights: Any) -> None:
        self._emit(
            AccessEvent(
                pv.name,
                read_access=bool(rights & caproto.AccessRights.READ),
                write_access=bool(rights & caproto.AccessRights.WRITE),
            )
        )

    def _on_monitor(self, sub: Any, response: Any) -> None:
        # caproto keeps each subscription's last response (for callbacks added later, which
        # we never do), twice; it pins the receive buffer the response points into, one per
        # PV: 350 kB per updating PV measured. The reading below is a copy: let it go.
        sub._last_call_values = None
        sub.most_recent_response = None
        pv = sub.pv
        channel = pv.channel
        if channel is None:
            return
        self._emit(ReadingEvent(pv.name, reading_of(response, channel.native_data_type)))

    def _read_metadata(self, pv: Any) -> None:
        channel = pv.channel
        native = channel.native_data_type
        count = channel.native_data_count
        host = "%s:%d" % pv.circuit_manager.circuit.address

        def on_control(response: Any) -> None:
            if isinstance(response, caproto.ErrorResponse):
                log.warning("metadata_read_refused", pv=pv.name, error=_text(bytes(response.error_message)))
                return
            self._emit(MetadataEvent(pv.name, metadata_of(response, native, count, host)))

        try:
            ca_client.PV.read.__wrapped__(
                pv, wait=False, callback=on_control, data_type="control", timeout=None
            )
        except Exception as exc:  # a circuit that died right after connecting: reconnection retries
            log.warning("metadata_read_not_sent", pv=pv.name, error=str(exc))

    # --- requests from the actor loop --------------------------------------------------------

    def put(self, name: str, put_id: int, value: Any) -> None:
        """Put with completion; a ``PutDoneEvent`` follows (never blocks, never retries).

        The read-back is sent right behind the put, on the same circuit (Rule 8).
        """
        pv = self._pvs[name]
        channel = pv.channel
        race = _PutRace(read_pending=True)

        def on_write(response: Any) -> None:
            error = _put_error(response)
            with race.lock:
                race.completed = True
                race.finished = error is not None
                read_again = error is None and not race.read_pending
            if error is not None:
                self._emit(PutDoneEvent(name, put_id, error, None))
            elif read_again:  # the pipelined read was answered too early, or never sent
                self._read_back(pv, put_id)

        def on_read(response: Any) -> None:
            with race.lock:
                race.read_pending = False
                if race.finished or not race.completed:
                    return  # the put failed, or this read was answered before its completion
                race.finished = True
            readback = None
            if isinstance(response, caproto.ErrorResponse):
                log.warning("readback_refused", pv=name, error=_text(bytes(response.error_message)))
            elif channel is not None:
                readback = reading_of(response, channel.native_data_type)
            self._emit(PutDoneEvent(name, put_id, None, readback))

        try:
            ca_client.PV.write.__wrapped__(pv, value, wait=False, callback=on_write, timeout=None, notify=True)
        except Exception as exc:  # the circuit died between the check and the send
            self._emit(PutDoneEvent(name, put_id, f"put could not be sent: {exc}", None))
            return
        try:
            ca_client.PV.read.__wrapped__(pv, wait=False, callback=on_read, data_type="time", timeout=None)
        except Exception as exc:  # the put went: its completion reads back instead
            log.warning("readback_not_sent", pv=name, error=str(exc))
            with race.lock:
                race.read_pending = False
                read_now = race.completed and not race.finished
            if read_now:
                self._read_back(pv, put_id)

    def read(self, name: str, read_id: int) -> None:
        """A Channel Access read (DBR_TIME); a ``ReadDoneEvent`` follows (never blocks)."""
        pv = self._pvs[name]
        channel = pv.channel

        def on_read(response: Any) -> None:
            reading = None
            if not isinstance(response, caproto.ErrorResponse) and channel is not None:
                reading = reading_of(response, channel.native_data_type)
            self._emit(ReadDoneEvent(name, read_id, reading))

        try:
            ca_client.PV.read.__wrapped__(pv, wait=False, callback=on_read, data_type="time", timeout=None)
        except Exception as exc:  # the circuit died between the check and the send
            log.warning("read_not_sent", pv=name, error=str(exc))
            self._emit(ReadDoneEvent(name, read_id, None))

    def _read_back(self, pv: Any, put_id: int) -> None:
        # Read the value after the put completed, so that a client's read after its set sees
        # what the IOC now holds even if the monitor update is still on its way.
        channel = pv.channel

        def on_read(response: Any) -> None:
            readback = None
            if isinstance(response, caproto.ErrorResponse):
                # The put itself completed; only its read-back is lost (the monitor follows).
                log.warning("readback_refused", pv=pv.name, error=_text(bytes(response.error_message)))
            elif channel is not None:
                readback = reading_of(response, channel.native_data_type)
            self._emit(PutDoneEvent(pv.name, put_id, None, readback))

        try:
            ca_client.PV.read.__wrapped__(pv, wait=False, callback=on_read, data_type="time", timeout=None)
        except Exception as exc:
            log.warning("readback_not_sent", pv=pv.name, error=str(exc))
            self._emit(PutDoneEvent(pv.name, put_id, None, None))

    def close(self) -> None:
        """Cancel the monitors. The context itself is left to the process's exit: caproto's
        ``Context.disconnect`` can take seconds after a reconnection (it joins its threads),
        and the IOC sees the circuit close the moment the process ends anyway."""
        for subscription in self._subscriptions.values():
            try:
                subscription.clear()
            except Exception as exc:  # a dead circuit: the IOC drops the monitor with it
                log.warning("monitor_not_cleared", pv=subscription.pv.name, error=str(exc))
