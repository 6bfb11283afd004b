"""Logging for every pvhub process: structlog events, JSON lines for journald, readable at a
terminal.

Rule: context is bound (``pv=``, ``client=``, ``actor_pid=``), never formatted into the event
name; the event name is a short snake_case noun or past-tense verb (``actor_started``).
"""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Any, Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure(log_format: LogFormat = "auto", level: str = "info", stream=None) -> None:
    """Route structlog (and stdlib logging, e.g. caproto's) to ``stream`` (stderr)."""
    stream = sys.stderr if stream is None else stream
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per record (print() writes the newline separately), so that lines from
        # the daemon and its actors, which share the stream, never interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries (caproto) log through the standard library: keep their warnings, in one stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def loggable(value: Any, limit: int = 8) -> Any:
    """A value short enough for a log line: arrays as lists, long lists cut. Cut first: a
    large array is never converted whole (a log line must not cost a copy of it)."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        head = value.reshape(-1)[:limit].tolist()
        return head + ["..."] if value.size > limit else head
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        head = [loggable(v, limit) for v in value[:limit]]
        return head + ["..."] if len(value) > limit else head
    if isinstance(value, dict):  # what a client put may be anything: a map of a million keys
        items = [(loggable(k, limit), loggable(v, limit)) for k, v in itertools.islice(value.items(), limit)]
        return {str(k): v for k, v in items} | ({"...": len(value) - limit} if len(value) > limit else {})
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit * 8:
        return value[: 4 * limit * 8] + (b"..." if isinstance(value, bytes) else "...")
    return value


def library_logger(name: str) -> Any:
    """A structlog logger for code that runs inside users' processes (the client library).

    It writes through the standard library's ``logging.getLogger(name)``, so the user's logging
    configuration decides what is shown and where (warnings reach stderr by default), and
    nothing is printed to stdout behind the user's back; the event and its bound fields
    become the record's message, ``event key=value ...``.
    """
    return structlog.wrap_logger(
        logging.getLogger(name),
        # Tracebacks are left to the logging handler (exc_info), so they appear once.
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
