"""Log output: JSON lines for journald, readable lines at a terminal, bound fields kept."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from pvhub import logs


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_structlog():
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_json_lines_when_not_at_a_terminal():
    stream = io.StringIO()
    logs.configure("auto", stream=stream)
    structlog.get_logger("t").info("actor_started", pv="X:a", actor_pid=42)
    record = json.loads(stream.getvalue().strip())
    assert record["event"] == "actor_started" and record["pv"] == "X:a" and record["actor_pid"] == 42
    assert record["level"] == "info" and record["timestamp"].endswith("Z")


def test_readable_lines_at_a_terminal():
    stream = FakeTerminal()
    logs.configure("auto", stream=stream)
    structlog.get_logger("t").warning("pv_disconnected", pv="X:a")
    import re

    line = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # colours, at a terminal
    assert "pv_disconnected" in line and "pv=X:a" in line and "warning" in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_format_can_be_forced_and_level_filters():
    stream = FakeTerminal()
    logs.configure("json", level="warning", stream=stream)
    log = structlog.get_logger("t")
    log.info("hidden")
    log.warning("shown", n=1)
    lines = stream.getvalue().strip().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["shown"]


def test_library_logger_goes_through_stdlib_logging(caplog):
    log = logs.library_logger("pvhub.client")
    with caplog.at_level(logging.INFO, logger="pvhub.client"):
        log.warning("hub_lost", address="tcp://x:1", reason="gone")
    assert caplog.records[0].levelname == "WARNING"
    assert "event='hub_lost'" in caplog.records[0].getMessage()
    assert "reason='gone'" in caplog.records[0].getMessage()


def test_loggable_shortens_arrays():
    import numpy as np

    assert logs.loggable(np.arange(3)) == [0, 1, 2]
    assert logs.loggable(list(range(20))) == [0, 1, 2, 3, 4, 5, 6, 7, "..."]
    assert logs.loggable(1.5) == 1.5
