"""Small tools shared by pvhub's tests.

Import them as ``from helpers import wait_until``: pytest puts ``tests/`` on ``sys.path``
because it has no ``__init__.py``.
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Tests wait on conditions, never on fixed sleeps: a sleep long enough for a loaded CI
    machine is a waste everywhere else, and one short enough to be cheap is flaky. On
    timeout this raises ``AssertionError`` with ``message`` (a callable is called then, so
    that it can describe the state at the moment of failure).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout} s)")
        time.sleep(interval)


def daemon_status(timeout: float = 5.0) -> dict:
    """What ``pvhub status`` shows, from the daemon that ``$PVHUB_ADDRESS`` names."""
    from pvhub import protocol as p
    from pvhub.client import get_hub

    return get_hub().call(lambda rid: p.StatusRequest(id=rid), timeout=timeout).status  # type: ignore[attr-defined]


def log_events(daemon, event: str | None = None) -> list[dict]:
    """The daemon's JSON log events so far (only those named ``event``, if given)."""
    import json

    events = []
    for line in daemon.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if event is None or record.get("event") == event:
            events.append(record)
    return events


def wait_for_put_in_flight(daemon, pv: str, timeout: float = 5.0) -> None:
    """Until ``pv``'s actor has sent a put to the IOC (it logs ``put_started`` then)."""
    wait_until(
        lambda: any(e.get("pv") == pv for e in log_events(daemon, "put_started")),
        timeout,
        message=f"no put of {pv} in flight",
    )


def callbacks_done(timeout: float = 5.0) -> None:
    """Until the callback thread has run everything queued for it so far."""
    import threading

    from pvhub.client import get_hub

    done = threading.Event()
    get_hub().dispatch(done.set)
    assert done.wait(timeout), f"the callback thread did not catch up within {timeout} s"


def ask_by_hand(dealer, request_id: int, build, timeout: float = 5.0):
    """Send ``build(request_id)`` on ``dealer`` (a DEALER connected to a daemon, speaking the
    wire protocol by hand) and return its final reply, or None if none came within
    ``timeout``; other messages (earlier requests' answers, a ``SetAccepted``) are passed by."""
    from pvhub import protocol as p

    dealer.send(p.encode(build(request_id)))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not dealer.poll(int(left * 1000)):
            return None
        message = p.decode(dealer.recv())
        if getattr(message, "id", None) == request_id and isinstance(message, p.FINAL_REPLIES):
            return message
    return None


def readings_in(payloads) -> list:
    """The messages of a readings message's payload frames, an ``Updates`` as the ``Update``
    messages it stands for (protocol Rule 8)."""
    from pvhub import protocol as p
    from pvhub.readings import decode_readings

    messages = []
    for payload in payloads:
        for message in decode_readings(payload):
            messages.extend(message.each() if isinstance(message, p.Updates) else (message,))
    return messages


def is_gone(pid: int) -> bool:
    """Whether no process ``pid`` exists any more."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def plain_search_socket(socket_module=socket):
    """caproto's ``bcast_socket`` without ``SO_REUSEADDR``/``SO_REUSEPORT``.

    caproto's clients make their search socket with both and bind it to ``("", 0)``, and
    Linux may then give it a port another such socket holds: the search port of a caproto
    IOC, this test's or a parallel test's. That IOC's socket, bound to 127.0.0.1, is the
    better match and takes every search answer meant for the client, whose PVs never connect
    (about one run in 10^4). A socket without those options is never given a port in use.
    Install it with ``caproto.bcast_socket = plain_search_socket`` (or ``CAPROTO_CLIENT_PREAMBLE``
    in a script) before a client is made.
    """
    sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
    sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_BROADCAST, 1)
    return sock


# The same, for a script run in a fresh Python (``python -c``), which cannot import this module.
CAPROTO_CLIENT_PREAMBLE = f'''
import socket, caproto as _caproto

{inspect.getsource(plain_search_socket)}
_caproto.bcast_socket = plain_search_socket
'''

# caproto 1.3's threading client doubles its search retry interval before comparing with it,
# so its first resend of an unanswered search comes about 7.6 s after the first: within a
# 5 s timeout it searches once, and one lost datagram fails the test. Capped at 0.5 s, it
# searches again from about 1 s on.
CAPROTO_CLIENT_ENV = {"CAPROTO_CLIENT_MAX_RETRY_SEARCHES_INTERVAL_SEC": "0.5"}


def children_of(pid: int) -> list[int]:
    """The living (not zombie) processes whose parent is ``pid``."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                children.append(int(entry))
    return children


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
