"""The daemon's sockets and its loop: clients in, actors out, readings forwarded on a thread of
their own (``daemon/forwarder.py``).

Rule 1: the broker thread owns the two ROUTER sockets; the readings forwarder (XSUB ->
XPUB, ``daemon/forwarder.py``) runs on its own thread: per readings message a receive and a
send of its frames, untouched, never decoded.
Rule 2: nothing a client sends can stop the loop. A message that does not decode is answered
with ``bad_message`` when it carries enough to answer, and dropped (logged) otherwise.
Rule 3: the loop ticks every ``TICK_S``, however many messages arrive in between: the
supervisor's reaping and the router's ``tick`` (restarts, hung actors, silent clients) cost
O(processes + clients), so they run on the clock, never per message. An actor's death is
answered within one tick. systemd's watchdog is pinged on a clock of its own, every half
``WATCHDOG_USEC``; the loop sleeps until the sooner of the two.
Rule 4: with ``[security]``, the ZAP handler starts before any socket binds, and each
client's identity is read from the messages themselves (``daemon/security.py``). Listening off
loopback without it is refused (``pvhub.config.exposure_problem``). Every socket has a
maximum message size; a peer that sends a bigger one is disconnected by ZeroMQ.
Rule 5: SIGHUP reloads ``[access]``, ``[limits]`` and the clients directory from the config
file, between two messages, without touching a connection; readings subscriptions are
vetted again (the readings socket is bound anew: clients' SUB sockets reconnect and
resubscribe by themselves, and see a gap they resync from).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit

import structlog
import zmq

from pvhub import protocol as p
from pvhub.access import ANONYMOUS
from pvhub.logs import loggable
from pvhub import config as config_module
from pvhub.config import (DEFAULT_READINGS_HWM, Config, ConfigError, default_large_readings_address,
                          exposure_problem)
from pvhub.daemon.notify import Notifier, watchdog_interval
from pvhub.daemon.forwarder import ReadingsForwarder
from pvhub.daemon.security import Security, identity_of
from pvhub.daemon.effects import (
    Adopt,
    Announce,
    Release,
    ClientForgotten,
    KillActor,
    RetireActor,
    Quarantined,
    SpawnActor,
    Stalled,
    ToActor,
    ToClient,
    coalesce,
    error_reply,
)
from pvhub.daemon.routing import TICK_S, Router
from pvhub.daemon.supervisor import Supervisor
from pvhub.waker import Waker
from pvhub.errors import AccessDeniedError, ActorDiedError, InternalError, ProtocolError, UnsupportedVersionError

log = structlog.get_logger("pvhub.daemon")

# SIGTERM lets puts in flight finish for at most this long before actors are stopped.
STOP_GRACE_S = 5.0
# What an actor may send in one message (a snapshot of the largest waveform an IOC serves).
ACTOR_MAX_MESSAGE_BYTES = 512 * 1024 * 1024


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
        config_path: str | None = None,
        large_readings: str | None = None,
        parent_pid: int | None = None,
    ) -> None:
        self.config = config
        self.parent_pid = parent_pid  # stop once this process is no longer our parent
        self.config_path = config_path
        self._reload = False
        self._put_logs: list[tuple[str, dict]] = []  # put records of the batch being handled
        self.address = address
        self.readings_address = readings or default_readings_address(address)
        self.large_readings_address = large_readings or default_large_readings_address(self.readings_address)
        self.notifier = notifier or Notifier()
        self.readings_hwm = readings_hwm
        self._stopping = False
        self._ctx = zmq.Context()
        self._rundir = tempfile.mkdtemp(prefix="pvhub-", dir=os.environ.get("RUNTIME_DIRECTORY"))
        self._waker = Waker()
        self.log_format = log_format
        self.log_level = log_level

    # --- lifecycle -------------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stopping = True

    def request_reload(self, *_: Any) -> None:
        self._reload = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        signal.set_wakeup_fd(self._waker.signal_fd, warn_on_full_buffer=False)

    def run(self) -> int:
        """Serve until stopped. Raises ``ConfigError`` (or ``KeyFileError``) before binding
        anything when the configuration is unsafe or its keys unusable."""
        problem = exposure_problem(self.config, self.address, self.readings_address, self.large_readings_address)
        if problem is not None:
            raise ConfigError(problem)
        if self.config.insecure and self.config.security is None:
            log.warning("insecure", address=self.address, readings=self.readings_address,
                        large_readings=self.large_readings_address,
                        detail="no CURVE: anyone who reaches these addresses may read and write every allowed PV")
        security = Security(self._ctx, self.config) if self.config.security is not None else None
        if security is not None:
            security.start()  # Rule 4: before any socket binds
        return self._run(security)

    def _run(self, security: Security | None) -> int:
        limits = self.config.limits
        clients = self._ctx.socket(zmq.ROUTER)
        # A reply that cannot be queued raises (and is reported to the client in its next
        # pong) instead of vanishing: a Status must never wait for an answer that was dropped.
        clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        clients.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        if security is not None:
            security.serve(clients, "requests")
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
        actors.setsockopt(zmq.MAXMSGSIZE, ACTOR_MAX_MESSAGE_BYTES)
        actor_endpoint = f"ipc://{self._rundir}/actors"
        actors.bind(actor_endpoint)
        readings_in_endpoint = f"ipc://{self._rundir}/readings"
        self._router_pvs: dict = {}
        forwarder = ReadingsForwarder(self._ctx, readings_in_endpoint, self.readings_address, self.readings_hwm,
                                      access=lambda: self.config.access, allows=self.config.allows,
                                      security=security, max_topics=lambda: self.config.limits.max_pvs + 1,
                                      held=lambda pv: pv in self._router_pvs,
                                      large_outward=self.large_readings_address,
                                      large_hwm=self.config.large_readings_hwm)
        readings_endpoint, large_readings_endpoint = forwarder.start()
        # The daemon's own announcements (a PV's actor died, the daemon stops) join the
        # readings stream, so they reach clients in order with the PVs' updates.
        announcer = self._ctx.socket(zmq.PUB)
        announcer.setsockopt(zmq.LINGER, 500)
        announcer.connect(readings_in_endpoint)

        router = Router(self.config, readings_endpoint, large_readings_endpoint)
        self._router_pvs = router.pvs  # the forwarder's ``held`` (read from its thread)
        self._security = security
        self._forwarder = forwarder
        supervisor = Supervisor(actor_endpoint, readings_in_endpoint, self.log_format, self.log_level)
        self.log = log.bind(address=clients.getsockopt_string(zmq.LAST_ENDPOINT), readings=readings_endpoint,
                            large_readings=large_readings_endpoint)
        ctx = _LoopContext(clients, actors, router, supervisor, announcer)
        self._carry_out(ctx, router.initial_actors(time.monotonic()))
        self._wait_for_initial_actors(ctx)
        self.log.info("daemon_ready", pid=os.getpid())
        self.notifier.ready(self._status_line(router))

        poller = zmq.Poller()
        poller.register(clients, zmq.POLLIN)
        poller.register(actors, zmq.POLLIN)
        poller.register(self._waker.fileno(), zmq.POLLIN)
        watchdog = watchdog_interval()
        next_watchdog = 0.0 if watchdog is not None else math.inf
        stop_deadline: float | None = None
        next_tick = 0.0
        try:
            while True:
                wake = min(next_tick, next_watchdog)
                ready = dict(poller.poll(max(0, math.ceil((wake - time.monotonic()) * 1000))))
                if clients in ready:
                    self._drain_clients(ctx)
                if actors in ready:
                    self._drain_actors(ctx)
                if self._waker.fileno() in ready:
                    self._waker.drain()
                if self._reload:
                    self._reload = False
                    self._reload_config(router)
                now = time.monotonic()
                if now >= next_tick:  # Rule 3
                    next_tick = now + TICK_S
                    if self.parent_pid is not None and not self._stopping and os.getppid() != self.parent_pid:
                        self.log.warning("parent_gone", parent_pid=self.parent_pid)
                        self._stopping = True  # as at SIGTERM: the harness that started us is gone
                    for actor, code in supervisor.reap():
                        self._carry_out(ctx, router.actor_exited(actor, code, now))
                    self._carry_out(ctx, router.tick(now))
                if watchdog is not None and now >= next_watchdog:  # on its own clock (Rule 3)
                    next_watchdog = now + watchdog
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
            if security is not None:
                security.stop()
            self._ctx.term()
            shutil.rmtree(self._rundir, ignore_errors=True)
            self.log.info("daemon_stopped")
        return 0

    def _reload_config(self, router: Router) -> None:
        """Rule 5."""
        if self.config_path is None:
            self.log.warning("config_not_reloaded", reason="the daemon was started without --config")
            return
        keys_changed = False
        try:
            new = config_module.load(self.config_path)
            if self._security is not None and new.security is not None:
                keys_changed = self._security.reload(new.security.clients)
        except (ConfigError, ValueError) as exc:  # KeyFileError is a ValueError
            self.log.error("config_not_reloaded", path=self.config_path, error=str(exc))
            return
        merged, ignored = config_module.reloadable(self.config, new)
        # A revoked key's readings connection must go through ZAP again, as must everyone's
        # subscriptions when the rules changed.
        revet = merged.access != self.config.access or keys_changed
        self.config = router.config = merged
        if ignored:
            self.log.warning("config_changes_need_restart", settings=ignored)
        self.log.info("config_reloaded", path=self.config_path, access_rules=len(merged.access.rules))
        if revet:
            self._forwarder.revet("access rules or client keys changed")

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
        self._put_logs = []
        secure = self._security is not None
        try:
            for _ in range(1000):  # bounded, so actors and reaping get their turn
                try:
                    frames = ctx.clients.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                identity = identity_of(frames[-1]) if secure else ANONYMOUS
                batch.extend(self._client_frames(ctx, [f.bytes for f in frames], identity))
        finally:
            # One adoption per actor for a burst of new PVs (``coalesce``).
            self._carry_out(ctx, coalesce(batch))
            # Puts are logged once on their way: a log record costs no time on a put's path.
            for event, fields in self._put_logs:
                self.log.info(event, **fields)

    def _client_frames(self, ctx: "_LoopContext", frames: list[bytes], identity: str = ANONYMOUS) -> list:
        if len(frames) != 2:
            self.log.warning("malformed_envelope", frames=len(frames))
            return []
        client, payload = frames
        try:
            message = p.decode(payload)
        except ProtocolError as exc:
            self._refuse(ctx, client, payload, exc)
            return []
        if self._security is not None and self._security.revoked(identity):
            self._security.refusals.refused_connection("revoked_key", identity=identity, client=client.hex())
            request_id = getattr(message, "id", 0)
            return [ToClient(client, error_reply(request_id, AccessDeniedError(
                f"the key {identity!r} was removed from the daemon's clients directory; reconnect with a key it knows")))]
        if isinstance(message, p.HelloRequest):
            self.log.info("client_connected", client=client.hex(), name=message.client, identity=identity)
        try:
            effects = ctx.router.client_message(client, message, payload, time.monotonic(), identity)
        except Exception as exc:  # the loop boundary: answer, log, go on
            self.log.exception("client_message_failed", client=client.hex())
            return [ToClient(client, error_reply(getattr(message, "id", 0), InternalError(repr(exc))))]
        if isinstance(message, p.SetRequest):  # every write, and who asked, whatever came of it
            record = ctx.router.clients.get(client)
            refusal = next((e.message for e in effects if isinstance(e, ToClient)
                            and isinstance(e.message, p.ErrorReply) and e.message.id == message.id), None)
            self._put_logs.append(("put_requested" if refusal is None else "put_refused", dict(
                client=client.hex(), name=record.name if record else "", identity=identity, pv=message.pv,
                value=loggable(message.value),
                **({"code": refusal.code, "error": refusal.message} if refusal is not None else {}))))
        return effects

    def _refuse(self, ctx: "_LoopContext", client: bytes, payload: bytes, exc: ProtocolError) -> None:
        request_id = p.salvage_id(payload)
        self.log.warning("bad_message", client=client.hex(), error=str(exc))
        reply = error_reply(request_id, exc)
        # An older client reads why it is refused in its own version (messages.py, PROTOCOL_VERSION).
        version = p.salvage_version(payload) if isinstance(exc, UnsupportedVersionError) else p.PROTOCOL_VERSION
        self._to_client(ctx, client, p.encode(reply, version=version), reply)

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
        finished_put = (isinstance(message, (p.SetDone, p.ErrorReply))
                        and ctx.router.op_of(actor, client, message.id) == "set")
        effects = ctx.router.actor_message(actor, client, message, time.monotonic())
        # Replies are forwarded as they came: re-encoding would only cost time.
        for effect in effects:
            if isinstance(effect, ToClient) and effect.message is message:
                self._to_client(ctx, effect.client, payload, message)
            else:
                self._carry_out(ctx, [effect])
        if finished_put:  # logged once the answer is on its way
            record = ctx.router.clients.get(client)
            self.log.info("put_finished", client=client.hex(), identity=record.identity if record else None,
                          pv=message.pv, outcome="done" if isinstance(message, p.SetDone) else message.code,
                          error=getattr(message, "message", None))

    def _carry_out(self, ctx: "_LoopContext", effects: list) -> None:
        for effect in effects:
            if isinstance(effect, ToClient):
                self._to_client(ctx, effect.client, p.encode(effect.message), effect.message)
            elif isinstance(effect, ToActor):
                try:
                    ctx.actors.send_multipart([effect.actor.encode(), effect.client, effect.payload], zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # gone (its death is reaped next), or full
                    ctx.router.not_delivered(effect.actor, effect.client, effect.request_id)
                    self.log.warning("request_not_delivered", actor=effect.actor, error=str(exc))
                    reply = error_reply(effect.request_id, ActorDiedError(
                        f"the PV's actor could not take the request ({exc}); it was not sent"))
                    self._to_client(ctx, effect.client, p.encode(reply), reply)
            elif isinstance(effect, Adopt):
                try:
                    ctx.actors.send_multipart([effect.actor.encode(), b"", p.encode(p.AdoptPvs(pvs=list(effect.pvs)))],
                                              zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # its incarnation is gone: the next one adopts them all
                    self.log.warning("adoption_not_delivered", actor=effect.actor, pvs=len(effect.pvs), error=str(exc))
            elif isinstance(effect, Release):
                self.log.info("pvs_released", pvs=list(effect.pvs[:20]), count=len(effect.pvs),
                              reason="no IOC answered", seconds=ctx.router.config.limits.release_unconnected_s)
                try:
                    ctx.actors.send_multipart([effect.identity.encode(), b"", p.encode(p.ReleasePvs(pvs=list(effect.pvs)))],
                                              zmq.NOBLOCK)
                except zmq.ZMQError as exc:  # its incarnation is gone: the next one never had them
                    self.log.warning("release_not_delivered", actor=effect.identity, error=str(exc))
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
            elif isinstance(effect, RetireActor):
                self.log.info("actor_retiring", actor=effect.actor, reason=effect.reason)
                ctx.supervisor.retire(effect.actor)
            elif isinstance(effect, Announce):
                ctx.announcer.send_multipart([effect.topic, p.encode(effect.message)])
            elif isinstance(effect, ClientForgotten):
                self.log.info("client_disconnected", client=effect.client.hex(), name=effect.name,
                              idle=round(effect.idle, 1))
            elif isinstance(effect, Stalled):
                self.log.warning("daemon_stalled", seconds=round(effect.seconds, 1))

    def _to_client(self, ctx: "_LoopContext", client: bytes, payload: bytes, message: p.Message) -> None:
        """Send one reply. A client that is gone loses it (nobody waits for it); one whose
        queue is full is told in its next pong which final replies it lost."""
        try:
            ctx.clients.send_multipart([client, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return
            if isinstance(message, p.FINAL_REPLIES) and not isinstance(message, p.Pong):
                ctx.router.reply_lost(client, message.id)  # type: ignore[attr-defined]
            self.log.warning("reply_not_delivered", client=client.hex(), error=str(exc))


class _LoopContext:
    def __init__(self, clients: zmq.Socket, actors: zmq.Socket, router: Router, supervisor: Supervisor,
                 announcer: zmq.Socket) -> None:
        self.clients = clients
        self.actors = actors
        self.router = router
        self.supervisor = supervisor
        self.announcer = announcer
