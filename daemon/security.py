"""Who gets in: CURVE with a ZAP handler, and refusals logged. The identity found here is what
the readings forwarder (``daemon/forwarder.py``) vets each subscription by.

Rule 1: security is ZeroMQ's own (CurveZMQ, pyzmq's ``zmq.auth``), never home-made. With
``[security]`` both sockets a client reaches are CURVE servers; the ZAP handler is started
before either binds, and lets in exactly the public keys of the clients directory. A
client's identity is its key's name there (``ANONYMOUS`` without CURVE); the broker reads it
from each message's ``User-Id``, which the ZAP handler set: it is never what a client says.
Rule 2: refusals (an unknown key, a client without CURVE, a broken handshake, a revoked key's
request) are logged as ``connection_refused``, refused subscriptions as
``subscription_refused``; each at most ``REFUSALS_PER_WINDOW`` records per ``REFUSAL_WINDOW_S`` per
kind; the rest are counted and the count is said with the next record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from pvhub.access import ANONYMOUS
from pvhub.config import Config
from pvhub.keys import ClientKeys, load_client_keys, load_secret

log = structlog.get_logger("pvhub.daemon")

REFUSAL_WINDOW_S = 10.0
REFUSALS_PER_WINDOW = 10
_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_MONITOR_STOPPED
)


# What a failed handshake's code means, in words (``ZMQ_PROTOCOL_ERROR_*``).
_PROTOCOL_ERRORS = {
    getattr(zmq, name): name.removeprefix("PROTOCOL_ERROR_").lower()
    for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_")
}
_PROTOCOL_ERRORS.update({
    getattr(zmq, "PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC", -1): "cryptographic (a client with a wrong server key?)",
    getattr(zmq, "PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH", -1): "mechanism mismatch (a client without CURVE?)",
})


def handshake_error(code: int) -> str:
    return _PROTOCOL_ERRORS.get(code, f"protocol error {code:#x}")


class RefusalLog:
    """Rule 2: rate-limited refusal records (``event``), thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, event: str = "connection_refused") -> None:
        self._clock = clock
        self._event = event
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (since, logged, suppressed)
        self.refused = 0

    def refused_connection(self, kind: str, **fields: object) -> bool:
        """Count a refusal; log it unless its kind is over its rate. Says whether it logged."""
        with self._lock:
            self.refused += 1
            now = self._clock()
            since, logged, suppressed = self._windows.get(kind, (now, 0, 0))
            if now - since >= REFUSAL_WINDOW_S:
                since, logged = now, 0
            if logged >= REFUSALS_PER_WINDOW:
                self._windows[kind] = (since, logged, suppressed + 1)
                return False
            self._windows[kind] = (since, logged + 1, 0)
        log.warning(self._event, kind=kind, suppressed_before=suppressed, **fields)
        return True


class KeyAuthenticator(ThreadAuthenticator):
    """The ZAP handler: CURVE clients whose public key is in the clients directory, by name."""

    def __init__(self, context: zmq.Context, refusals: RefusalLog) -> None:
        super().__init__(context)
        self._refusals = refusals
        self._names: dict[bytes, str] = {}
        self.identities: frozenset[str] = frozenset()
        self._address = ""

    def load_clients(self, directory: str) -> ClientKeys:
        """(Re)read the clients directory; the new set applies to the next handshake."""
        clients = load_client_keys(directory)
        self._names = dict(clients.keys)  # one assignment: the ZAP thread sees old or new
        self.identities = frozenset(clients.keys.values())
        return clients

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        mechanism = msg[5] if len(msg) > 5 else b""
        if mechanism != b"CURVE":  # the sockets are CURVE servers: nothing else gets here
            self._refusals.refused_connection("mechanism", address=self._address,
                                              mechanism=mechanism.decode(errors="replace"))
            if len(msg) > 1:
                self._send_zap_reply(msg[1], b"400", b"CURVE required")
            return
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        key = z85.encode(client_key)
        if key not in self._names:
            self._refusals.refused_connection("unknown_key", address=self._address, key=key.decode())
            return False, b"Unknown key"
        return True, b"OK"

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(z85.encode(client_public_key), "")


class Security:
    """The daemon's side of CURVE: its keys, the ZAP handler, and sockets made servers."""

    def __init__(self, context: zmq.Context, config: Config) -> None:
        assert config.security is not None
        self.refusals = RefusalLog()
        # Checked before anything starts: a readable secret key stops the daemon (KeyFileError).
        self.public, self.secret = load_secret(config.security.server_key)
        self.authenticator = KeyAuthenticator(context, self.refusals)
        clients = self.authenticator.load_clients(config.security.clients)
        self._report(clients, config.security.clients)
        self._monitors: list[_RefusalMonitor] = []

    def start(self) -> None:
        """Rule 1: before any socket binds."""
        self.authenticator.start()

    def reload(self, clients_directory: str) -> bool:
        """Read the clients directory again; says whether the set of identities changed."""
        before = self.authenticator.identities
        clients = self.authenticator.load_clients(clients_directory)
        self._report(clients, clients_directory)
        return self.authenticator.identities != before

    def revoked(self, identity: str) -> bool:
        """Whether ``identity``'s key left the clients directory since its connection was let
        in (ZAP runs once per connection: its messages are refused from here on)."""
        return identity not in self.authenticator.identities

    def serve(self, sock: zmq.Socket, name: str) -> None:
        """Make ``sock`` a CURVE server (before it binds), its refusals watched."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)
        monitor = _RefusalMonitor(sock, name, self.refusals)
        # Those of sockets closed since (a readings socket bound anew) have ended.
        self._monitors = [m for m in self._monitors if m.running] + [monitor]
        monitor.start()

    def stop(self) -> None:
        """After the served sockets are closed (their monitors end with them)."""
        for monitor in self._monitors:
            monitor.stop()
        self._monitors.clear()
        if self.authenticator.thread is not None:
            self.authenticator.stop()

    @staticmethod
    def _report(clients: ClientKeys, directory: str) -> None:
        for path, reason in clients.skipped:
            log.warning("client_key_skipped", path=str(path), reason=reason)
        log.info("client_keys_loaded", directory=directory, clients=sorted(set(clients.keys.values())))


class _RefusalMonitor:
    """Handshakes that fail before the ZAP handler sees them (a client without CURVE, or with
    the wrong server key) are seen only by a socket monitor."""

    def __init__(self, sock: zmq.Socket, name: str, refusals: RefusalLog) -> None:
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._name = name
        self._refusals = refusals
        self._thread = threading.Thread(target=self._run, name=f"refusals-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._thread.join(timeout=0.5)

    def _run(self) -> None:
        try:
            while True:
                event = recv_monitor_message(self._monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return  # the socket is closed
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    continue  # the ZAP handler logged it, with the key
                # ZeroMQ's monitor says which socket, not which peer: the ZAP handler's records
                # (unknown keys) carry the peer's address.
                self._refusals.refused_connection("handshake", socket=self._name, error=handshake_error(event["value"])
                                                  if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else "no detail")
        except zmq.ZMQError:
            pass  # the context is ending
        finally:
            self._monitor.close(linger=0)


def identity_of(frame: zmq.Frame) -> str:
    """Rule 1: the name the ZAP handler gave the sender of ``frame``."""
    try:
        return frame.get("User-Id") or ANONYMOUS
    except zmq.ZMQError:  # no ZAP handler ran for this connection (no CURVE)
        return ANONYMOUS
