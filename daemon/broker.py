"""The daemon's sockets and its loop: clients in, actors out, readings forwarded in C.

Rule 1: the broker thread owns the two ROUTER sockets; the readings forwarder
(``zmq.proxy_steerable`` XSUB -> XPUB) runs on its own thread and never touches Python per
message.
Rule 2: nothing a client sends can stop the loop. A message that does not decode is answered
with ``bad_message`` when it carries enough to answer, and dropped (logged) otherwise.
Rule 3: the loop runs the supervisor's reaping every tick, so an actor's death is answered
within one tick (``TICK_S``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import msgpack
import structlog
import zmq

from pvhub import protocol as p
from pvhub.logs import loggable
from pvhub.config import DEFAULT_READINGS_HWM, Config
from pvhub.daemon.notify import Notifier, watchdog_interval
from pvhub.daemon.routing import (
    Adopt,
    Announce,
    ClientForgotten,
    KillActor,
    Quarantined,
    Router,
    SpawnActor,
    TICK_S,
    Stalled,
    ToActor,
    ToClient,
    coalesce,
    error_reply,
)
from pvhub.daemon.supervisor import Supervisor
from pvhub.errors import ActorDiedError, InternalError, ProtocolError

log = structlog.get_logger("pvhub.daemon")

# SIGTERM lets puts in flight finish for at most this long before actors are stopped.
STOP_GRACE_S = 5.0


def default_readings_address(address: str) -> str:
    """Readings next to requests: TCP port + 1, or ``<path>.readings`` for IPC."""
    parts = urlsplit(address)
    if parts.scheme == "tcp" and parts.port is not None:
        return f"tcp://{parts.hostname}:{parts.port + 1}"
    if parts.scheme == "ipc":
        return address + ".readings"
    raise ValueError(f"give --readings for {address!r}")


class Broker:
    """Binds the daemon's sockets and runs until asked to stop."""

    def __init__(
        self,
        config: Config,
        address: str,
        readings: str | None = None,
        log_format: str = "json",
        log_level: str = "info",
        notifier: Notifier | None = None,
        readings_hwm: int = DEFAULT_READINGS_HWM,
    ) -> None:
        self.config = config
        self.address = address
        self.readings_address = readings or default_readings_address(address)
        self.notifier = notifier or Notifier()
        self.readings_hwm = readings_hwm
        self._stopping = False
        self._ctx = zmq.Context()
        self._rundir = tempfile.mkdtemp(prefix="pvhub-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.log_format = log_format
        self.log_level = log_level

    # --- lifecycle -------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def run(self) -> int:
        clients = self._ctx.socket(zmq.ROUTER)
        clients.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Replies a client has not read yet (a burst of ten thousand snapshots) must not be
        # dropped: ZeroMQ drops silently past the high-water mark. A vanished client's are.
        clients.setsockopt(zmq.SNDHWM, p.CLIENT_QUEUE_HWM)
        clients.setsockopt(zmq.RCVHWM, p.CLIENT_QUEUE_HWM)
        # The last answers (puts that could not finish) must leave before the daemon does.
        clients.setsockopt(zmq.LINGER, 1000)
        clients.bind(self.address)
        actors = self._ctx.socket(zmq.ROUTER)
        actors.setsockopt(zmq.LINGER, 0)
        # A message an actor cannot take raises here instead of vanishing (ZeroMQ's default).
        actors.setsockopt(zmq.ROUTER_MANDATORY, 1)
        actors.setsockopt(zmq.SNDHWM, p.ACTOR_QUEUE_HWM)
        actors.setsockopt(zmq.RCVHWM, p.ACTOR_QUEUE_HWM)
        actor_endpoint = f"ipc://{self._rundir}/actors"
        actors.bind(actor_endpoint)
        readings_in_endpoint = f"ipc://{self._rundir}/readings"
        forwarder = ReadingsForwarder(self._ctx, readings_in_endpoint, self.readings_address, self.readings_hwm)
        readings_endpoint = forwarder.start()
        # The daemon's own announcements (a PV's actor died, the daemon stops) join the
        # readings stream, so they reach clients in order with the PVs' updates.
        announcer = self._ctx.socket(zmq.PUB)
        announcer.setsockopt(zmq.LINGER, 500)
        announcer.connect(readings_in_endpoint)

        router = Router(self.config, readings_endpoint)
        supervisor = Supervisor(actor_endpoint, readings_in_endpoint, self.log_format, self.log_level)
        self.log = log.bind(address=clients.getsockopt_string(zmq.LAST_ENDPOINT), readings=readings_endpoint)
        ctx = _LoopContext(clients, actors, router, supervisor, announcer)
        self._carry_out(ctx, router.initial_actors(time.monotonic()))
        self._wait_for_initial_actors(ctx)
        self.log.info("daemon_ready", pid=os.getpid())
        self.notifier.ready(self._status_line(router))

        poller = zmq.Poller()
        poller.register(clients, zmq.POLLIN)
        poller.register(actors, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        watchdog = watchdog_interval()
        last_watchdog = 0.0
        stop_deadline: float | None = None
        try:
            while True:
                ready = dict(poller.poll(int(TICK_S * 1000)))
                if clients in ready:
                    self._drain_clients(ctx)
                if actors in ready:
                    self._drain_actors(ctx)
                if self._wake_r.fileno() in ready:
                    _drain(self._wake_r)
                now = time.monotonic()
                for actor, code in supervisor.reap():
                    self._carry_out(ctx, router.actor_exited(actor, code, now))
                self._carry_out(ctx, router.tick(now))
                if watchdog is not None and now - last_watchdog >= watchdog:
                    last_watchdog = now
                    self.notifier.watchdog()
                    self.notifier.status(self._status_line(router))
                if self._stopping and stop_deadline is None:
                    # Graceful stop: refuse new puts, tell clients, let puts in flight finish.
                    self.notifier.stopping()
                    self.log.info("daemon_stopping", puts_in_flight=router.puts_in_flight())
                    self._carry_out(ctx, router.begin_stop())
                    stop_deadline = now + STOP_GRACE_S
                if stop_deadline is not None and (router.puts_in_flight() == 0 or now >= stop_deadline):
                    if router.puts_in_flight():
                        self.log.warning("puts_abandoned", puts_in_flight=router.puts_in_flight())
                    break
        finally:
            router.stopping = True  # nothing is restarted from here on
            if stop_deadline is None:  # not a graceful stop: an error ends the loop
                self.notifier.stopping()
            supervisor.stop_all()
            # Answer whatever the actors could not (their stop fails their own puts first).
            self._drain_actors(ctx)
            self._carry_out(ctx, router.finish("the daemon stopped"))
            forwarder.stop()
            announcer.close()
            clients.close()
            actors.close()
            self._ctx.term()
            shutil.rmtree(self._rundir, ignore_errors=True)
            self.log.info("daemon_stopped")
        return 0

    def _wait_for_initial_actors(self, ctx: "_LoopContext", timeout: float = 30.0) -> None:
        """READY means the configured actors are up: wait for each one's hello."""
        deadline = time.monotonic() + timeout
        while not self._stopping and time.monotonic() < deadline:
            if all(r.ready for r in ctx.router.actors.values()):
                return
            if ctx.actors.poll(int(TICK_S * 1000)):
                self._drain_actors(ctx)
            for actor, code in ctx.supervisor.reap():
                self._carry_out(ctx, ctx.router.actor_exited(actor, code, time.monotonic()))
        pending = [a for a, r in ctx.router.actors.items() if not r.ready]
        if pending:
            self.log.warning("actors_not_ready", actors=pending)

    def _status_line(self, router: Router) -> str:
        return f"{len(router.pvs)} PVs, {len(router.actors)} actors, {len(router.clients)} clients"

    # --- messages --------------------------------------------------------------------------

    def _drain_clients(self, ctx: "_LoopContext") -> None:
        batch: list = []
        try:
            for _ in range(1000):  # bounded, so actors and reaping get their turn
                try:
                    frames = ctx.clients.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                batch.extend(self._client_frames(ctx, frames))
        finally:
            # One adoption per actor for a burst of new PVs (``coalesce``).
            self._carry_out(ctx, coalesce(batch))

    def _client_frames(self, ctx: "_LoopContext", frames: list[bytes]) -> list:
        if len(frames) != 2:
            self.log.warning("malformed_envelope", frames=len(frames))
            return []
        client, payload = frames
        try:
            message = p.decode(payload)
        except ProtocolError as exc:
            self._refuse(ctx, client, payload, exc)
            return []
        if isinstance(message, p.HelloRequest):
            self.log.info("client_connected", client=client.hex(), name=message.client)
        elif isinstance(message, p.SetRequest):
            name = ctx.router.clients.get(client)
            self.log.info("put_requested", client=client.hex(), name=name.name if name else "",
                          pv=message.pv, value=loggable(message.value))
        try:
            return ctx.router.client_message(client, message, payload, time.monotonic())
        except Exception as exc:  # the loop boundary: answer, log, go on
            self.log.exception("client_message_failed", client=client.hex())
            return [ToClient(client, error_reply(getattr(message, "id", 0), InternalError(repr(exc))))]

    def _refuse(self, ctx: "_LoopContext", client: bytes, payload: bytes, exc: ProtocolError) -> None:
        request_id = _salvage_id(payload)
        self.log.warning("bad_message", client=client.hex(), error=str(exc))
        ctx.clients.send_multipart([client, p.encode(error_reply(request_id, exc))])

    def _drain_actors(self, ctx: "_LoopContext") -> None:
        for _ in range(1000):
            try:
                frames = ctx.actors.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._actor_frames(ctx, frames)
            except Exception:  # the loop boundary: nothing an actor sends ends the daemon
                self.log.exception("actor_message_failed", frames=len(frames))

    def _actor_frames(self, ctx: "_LoopContext", frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.log.warning("malformed_actor_envelope", frames=len(frames))
            return
        actor_raw, client, payload = frames
        actor = actor_raw.decode(errors="replace")
        try:
            message = p.decode(payload)
        except ProtocolError as exc:
            self.log.error("bad_actor_message", actor=actor, error=str(exc))
            return
        if isinstance(message, p.ActorReady):
            self.log.info("actor_ready", actor=actor, actor_pid=message.pid)
        elif isinstance(message, (p.SetDone, p.ErrorReply)) and ctx.router.op_of(actor, client, message.id) == "set":
            self.log.info("put_finished", client=client.hex(), pv=message.pv,
                          outcome="done" if isinstance(message, p.SetDone) else message.code,
                          error=getattr(message, "message", None))
        effects = ctx.router.actor_message(actor, client, message, time.monotonic())
        # Replies are forwarded as they came: re-encoding would only cost time.
        for effect in effects:
            if isinstance(effect, ToClient) and effect.message is message:
                ctx.clients.send_multipart([effect.client, payload])
            else:
                self._carry_out(ctx, [effect])

    def _carry_out(self, ctx: "_LoopContext", effects: list) -> None:
        for effect in effects:
            if isinstance(effect, ToClient):
                ctx.clients.send_multipart([effect.client, p.encode(effect.message)])
            elif isinstance(effect, ToActor):
                try:
                    ctx.actors.send_multipart([effect.actor.encode(), effect.client, effect.payload], zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # gone (its death is reaped next), or full
                    ctx.router.not_delivered(effect.actor, effect.client, effect.request_id)
                    self.log.warning("request_not_delivered", actor=effect.actor, error=str(exc))
                    ctx.clients.send_multipart([effect.client, p.encode(error_reply(
                        effect.request_id, ActorDiedError(f"the PV's actor could not take the request ({exc}); it was not sent")))])
            elif isinstance(effect, Adopt):
                try:
                    ctx.actors.send_multipart([effect.actor.encode(), b"", p.encode(p.AdoptPvs(pvs=list(effect.pvs)))],
                                              zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # its incarnation is gone: the next one adopts them all
                    self.log.warning("adoption_not_delivered", actor=effect.actor, pvs=len(effect.pvs), error=str(exc))
            elif isinstance(effect, SpawnActor):
                if effect.identity != effect.actor:
                    self.log.warning("actor_restarted", actor=effect.actor, incarnation=effect.identity,
                                     pvs=effect.pvs)
                ctx.supervisor.spawn(effect.actor, effect.identity)
            elif isinstance(effect, Quarantined):
                self.log.warning("pvs_quarantined", pvs=list(effect.pvs[:20]), count=len(effect.pvs),
                                 source=effect.source, actor=effect.actor)
            elif isinstance(effect, KillActor):
                self.log.warning("actor_hung", actor=effect.actor, reason=effect.reason)
                ctx.supervisor.kill(effect.actor)
            elif isinstance(effect, Announce):
                ctx.announcer.send_multipart([effect.topic, p.encode(effect.message)])
            elif isinstance(effect, ClientForgotten):
                self.log.info("client_disconnected", client=effect.client.hex(), name=effect.name,
                              idle=round(effect.idle, 1))
            elif isinstance(effect, Stalled):
                self.log.warning("daemon_stalled", seconds=round(effect.seconds, 1))


class _LoopContext:
    def __init__(self, clients: zmq.Socket, actors: zmq.Socket, router: Router, supervisor: Supervisor,
                 announcer: zmq.Socket) -> None:
        self.clients = clients
        self.actors = actors
        self.router = router
        self.supervisor = supervisor
        self.announcer = announcer


class ReadingsForwarder:
    """XSUB (actors publish here) -> XPUB (clients subscribe here), forwarded in C."""

    def __init__(self, ctx: zmq.Context, inward: str, outward: str, hwm: int = DEFAULT_READINGS_HWM) -> None:
        self._ctx = ctx
        self._hwm = hwm
        self._inward = inward
        self._outward = outward
        self._control_endpoint = f"inproc://pvhub-readings-control-{id(self)}"
        self._thread: threading.Thread | None = None
        self._control: zmq.Socket | None = None

    def start(self) -> str:
        xsub = self._ctx.socket(zmq.XSUB)
        xsub.setsockopt(zmq.LINGER, 0)
        xsub.setsockopt(zmq.RCVHWM, DEFAULT_READINGS_HWM)
        # Subscriptions travel up through here, to every actor; past the mark they would be
        # dropped, and a client would wait for a topic that never comes.
        xsub.setsockopt(zmq.SNDHWM, p.SUBSCRIPTION_QUEUE_HWM)
        xsub.bind(self._inward)
        xpub = self._ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.SNDHWM, self._hwm)
        xpub.setsockopt(zmq.RCVHWM, p.SUBSCRIPTION_QUEUE_HWM)
        xpub.bind(self._outward)
        endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        control_in = self._ctx.socket(zmq.PAIR)
        control_in.bind(self._control_endpoint)
        self._control = self._ctx.socket(zmq.PAIR)
        self._control.connect(self._control_endpoint)

        def forward() -> None:
            try:
                zmq.proxy_steerable(xsub, xpub, None, control_in)
            except zmq.ContextTerminated:
                pass
            finally:
                xsub.close()
                xpub.close()
                control_in.close()

        self._thread = threading.Thread(target=forward, name="readings-forwarder", daemon=True)
        self._thread.start()
        return endpoint

    def stop(self) -> None:
        """Ask the proxy to end. libzmq 4.3's steerable proxy sometimes misses TERMINATE
        while nothing else moves; the context's termination, which follows, ends it then."""
        if self._control is not None:
            self._control.send(b"TERMINATE")
            self._control.close()
            self._control = None
        if self._thread is not None:
            self._thread.join(timeout=0.5)

def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _salvage_id(payload: bytes) -> int:
    """The request id of a message that failed to decode, when it can still be read (so the
    client's pending request fails at once instead of timing out)."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return 0
    if isinstance(body, dict):
        request_id = body.get("id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            return request_id
    return 0
