"""This client's CurveZMQ: the keys it uses, and why the daemon does not let it in, in words.

Rule 1: with keys (arguments, or ``PVHUB_CLIENT_KEY`` and ``PVHUB_SERVER_KEY``, both or
neither) both sockets are encrypted and the daemon knows this client by its public key. The
secret key file is read through ``pvhub.keys``, which refuses one others may read.
Rule 2: a refused handshake is silent in ZeroMQ (the socket just tries again), so the I/O
thread watches the request socket's handshakes (``HANDSHAKE_EVENTS``) and says why hello goes
unanswered (``handshake_failure``).
"""

from __future__ import annotations

import os

import zmq

from pvhub.keys import KeyFileError, load_public, load_secret

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
CLIENT_KEY_ENV = "PVHUB_CLIENT_KEY"
SERVER_KEY_ENV = "PVHUB_SERVER_KEY"


def key_paths(client_key: str | os.PathLike[str] | None = None,
              server_key: str | os.PathLike[str] | None = None) -> tuple[str | None, str | None]:
    """This client's secret key file and the daemon's public key file (Rule 1): each from
    its argument or else its environment variable; both, or neither (``KeyFileError``)."""
    client = os.fspath(client_key) if client_key else os.environ.get(CLIENT_KEY_ENV) or None
    server = os.fspath(server_key) if server_key else os.environ.get(SERVER_KEY_ENV) or None
    if (client is None) != (server is None):
        have, lack = ((f"this client's secret key ({CLIENT_KEY_ENV} or client_key) is {client}",
                       f"the daemon's public key ({SERVER_KEY_ENV} or server_key)") if client else
                      (f"the daemon's public key ({SERVER_KEY_ENV} or server_key) is {server}",
                       f"this client's secret key ({CLIENT_KEY_ENV} or client_key)"))
        raise KeyFileError(f"{have}, but {lack} is not given: CURVE needs both (or neither, without security)")
    return client, server


def curve_keys(client: str | None, server: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server public) to set on both sockets, or None without security."""
    if client is None or server is None:
        return None
    public, secret = load_secret(client)
    return public, secret, load_public(server)


def handshake_failure(kind: int, value: int, with_keys: bool) -> str:
    """Why a failed handshake (monitor event ``kind``, with its ``value``) kept this client out,
    in words an operator can act on (Rule 2); ``with_keys``: whether this client has keys."""
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the daemon refused this client (ZAP status {value})"
                + (": its public key is not in the daemon's clients directory" if with_keys else ""))
    if not with_keys:
        return (f"the security handshake failed: this client has no CURVE keys ({CLIENT_KEY_ENV}, "
                f"{SERVER_KEY_ENV}); does the daemon require them?")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (f"the security handshake failed (ZMTP error {value:#x}): this client uses CURVE keys; "
                "does the daemon?")
    # the daemon could not read our hello: it was sealed for another key
    return ("the security handshake failed: is the server key (PVHUB_SERVER_KEY) the daemon's own "
            "public key?")
