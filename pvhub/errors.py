"""The errors pvhub raises, and the codes they travel as.

Rule 1: every error a peer can report has a code here; the code is what travels, and each side
maps it back to the same class, so ``except TimeoutError`` in ophyd-style code keeps working.
Rule 2: the stdlib mixins (``TimeoutError``, ``ConnectionError``, ``ValueError``,
``PermissionError``) are chosen so that a caller who knows nothing of pvhub still catches the
right thing.
"""

from __future__ import annotations


class PvhubError(Exception):
    """Root of every error pvhub raises."""

    code = "error"


class ProtocolError(PvhubError, ValueError):
    """A message that could not be decoded, or that breaks the protocol's rules."""

    code = "bad_message"


class UnsupportedVersionError(ProtocolError):
    """A peer speaks a protocol version this side does not."""

    code = "unsupported_version"


class UnknownOperationError(ProtocolError):
    """A request names an operation nobody here handles."""

    code = "unknown_operation"


class PVNotAllowedError(PvhubError, PermissionError):
    """The daemon's configuration does not let clients reach this PV."""

    code = "pv_not_allowed"


class AccessDeniedError(PvhubError, PermissionError):
    """The daemon's access rules do not give this client's identity the right it asked for
    (read or write) on this PV."""

    code = "access_denied"


class DisconnectedError(PvhubError, ConnectionError):
    """The PV is not connected to its IOC right now."""

    code = "disconnected"


class ReadOnlyError(PvhubError, PermissionError):
    """The PV (or the Signal) does not accept writes."""

    code = "read_only"


class BadValueError(PvhubError, ValueError):
    """A value that the PV cannot take: wrong type, wrong length, unknown enum label."""

    code = "bad_value"


class LimitError(PvhubError, ValueError):
    """A value outside the control limits of a Signal that checks them (ophyd's ``limits=True``),
    or a request past one of the daemon's limits (PVs, requests in flight, request rate)."""

    code = "limit"


class PutFailedError(PvhubError, RuntimeError):
    """The IOC refused or failed a put."""

    code = "put_failed"


class ActorDiedError(PvhubError, ConnectionError):
    """The process that owned the PV died while a request was in flight; outcome unknown."""

    code = "actor_died"


class HubUnavailableError(PvhubError, ConnectionError):
    """The daemon did not answer, or went away."""

    code = "hub_unavailable"


class PvhubTimeoutError(PvhubError, TimeoutError):
    """Something did not finish in the time it was given."""

    code = "timeout"


class StatusTimeoutError(PvhubTimeoutError):
    """``Status.wait`` gave up; the operation itself goes on and may still finish."""

    code = "status_timeout"


class ConnectionTimeoutError(PvhubTimeoutError, ConnectionError):
    """A PV did not connect in the time given (both a timeout and a connection problem)."""

    code = "connection_timeout"


class InternalError(PvhubError, RuntimeError):
    """A fault inside the daemon; the request failed, the daemon goes on."""

    code = "internal"


ERRORS_BY_CODE: dict[str, type[PvhubError]] = {
    cls.code: cls
    for cls in (
        PvhubError,
        ProtocolError,
        UnsupportedVersionError,
        UnknownOperationError,
        PVNotAllowedError,
        AccessDeniedError,
        DisconnectedError,
        ReadOnlyError,
        BadValueError,
        LimitError,
        PutFailedError,
        ActorDiedError,
        HubUnavailableError,
        PvhubTimeoutError,
        StatusTimeoutError,
        ConnectionTimeoutError,
        InternalError,
    )
}


def error_from_code(code: str, message: str) -> PvhubError:
    """The exception a peer meant by ``code``; unknown codes become a plain ``PvhubError``."""
    return ERRORS_BY_CODE.get(code, PvhubError)(message)
