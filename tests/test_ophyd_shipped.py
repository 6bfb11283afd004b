"""ophyd's own tests of its EPICS classes, run with pvhub as ophyd's control layer.

Each of ophyd's test files runs in a pytest subprocess (``tests/ophyd_shipped/runner.py``)
with the IOCs its fixtures start, through a real ``pvhub serve`` that reaches them. Every
test that passes with ophyd's own caproto layer (``tests/ophyd_shipped/expected.json``, made
by the runner's ``--layer caproto --write-expected``) must pass through pvhub too, but for
the few the runner names in ``KNOWN_DIFFERENCES``, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import pytest

pytest.importorskip("ophyd")

from ophyd_shipped.runner import (  # noqa: E402
    FILE_TIMEOUT,
    FILES,
    ShippedRun,
    known_difference,
    load_expected,
)

# One worker runs the whole module: its fixture runs every file, and would run twice if the
# tests were spread over two workers.
pytestmark = [pytest.mark.system, pytest.mark.xdist_group("ophyd_shipped")]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShippedRun, dict[str, Future]]]:
    """Every file's expected tests started at once, two pytest processes at a time, through a ``pvhub serve`` that reaches the
    motor IOCs and every IOC the tests start: the run, and ``{file: future of its result}``."""
    with ShippedRun("pvhub", tmp_path_factory.mktemp("ophyd-shipped")) as run:
        # Only the tests that pass with ophyd's caproto layer matter here; chunks of them
        # keep test_signal.py (half of them) from being the one lane everything waits for.
        futures = run.run_files(FILES, load_expected(), only_expected=True)
        yield run, futures
        for future in futures.values():  # the daemon outlives every file
            future.exception()
    assert run.daemon is not None and not run.daemon.running()


@pytest.mark.timeout(len(FILES) * 2 * FILE_TIMEOUT)
@pytest.mark.parametrize("name", FILES)
def test_ophyd_shipped_file_passes_through_pvhub(
    shipped: tuple[ShippedRun, dict[str, Future]], name: str
) -> None:
    run, futures = shipped
    expected = set(load_expected()[name])
    assert expected, f"no test of {name} passes with ophyd's caproto layer: is the baseline stale?"
    result = futures[name].result()
    lost = sorted(test for test in expected
                  if result.outcomes.get(test) != "passed" and known_difference(test) is None)
    assert not lost, (
        f"{len(lost)} of {len(expected)} tests that pass with ophyd's caproto layer do not pass "
        f"through pvhub: {[(t, result.outcomes.get(t, 'not run')) for t in lost]}\n{result.output[-8000:]}"
        f"\n--- the daemon's log ---\n{run.daemon.log_text()[-4000:] if run.daemon else ''}"
    )
