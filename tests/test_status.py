"""Status objects (``pvhub.client.status``): finish once, wait without cancelling, callbacks
once, ``&`` and ``wait(*statuses)`` as ophyd users know them. Threads finish statuses here only
through short timers; every wait has a timeout well under a second.
"""

from __future__ import annotations

import threading
import time

import bluesky.protocols
import pytest

from pvhub.client.status import AndStatus, Status, wait
from pvhub.errors import PvhubError, PvhubTimeoutError, StatusTimeoutError

SHORT = 0.05  # how long a status stays pending in the tests that need one to
PATIENCE = 2.0  # the longest any wait here may block before the test counts as failed


def finish_later(status: Status, delay: float = SHORT, exc: BaseException | None = None):
    """Finish ``status`` from a timer thread after ``delay`` (with ``exc``, if given)."""
    if exc is None:
        timer = threading.Timer(delay, status.set_finished)
    else:
        timer = threading.Timer(delay, status.set_exception, args=(exc,))
    timer.daemon = True
    timer.start()
    return timer


class Recorder:
    """A callback that remembers every call and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[Status] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, status: Status) -> None:
        self.calls.append(status)
        self.threads.append(threading.current_thread())


# --- finishing ---------------------------------------------------------------------------------


def test_a_new_status_is_pending():
    status = Status()
    assert not status.done
    assert not status.success


def test_set_finished_is_success():
    status = Status()
    status.set_finished()
    assert status.done and status.success
    status.wait()
    status.wait(0)
    assert status.exception() is None
    assert status.exception(0) is None


def test_set_exception_is_failure_and_wait_raises_it():
    status = Status()
    error = RuntimeError("motor stalled")
    status.set_exception(error)
    assert status.done and not status.success
    with pytest.raises(RuntimeError) as info:
        status.wait(PATIENCE)
    assert info.value is error
    assert status.exception() is error


def test_the_first_finish_wins_success_first():
    status = Status()
    status.set_finished()
    status.set_exception(RuntimeError("late"))
    assert status.success
    status.wait(0)


def test_the_first_finish_wins_failure_first():
    status = Status()
    first = RuntimeError("first")
    status.set_exception(first)
    status.set_finished()
    status.set_exception(RuntimeError("second"))
    assert not status.success
    assert status.exception() is first


# --- waiting -----------------------------------------------------------------------------------


def test_wait_that_times_out_raises_status_timeout_and_does_not_finish_the_status():
    status = Status()
    started = time.monotonic()
    with pytest.raises(StatusTimeoutError) as info:
        status.wait(SHORT)
    assert SHORT <= time.monotonic() - started < PATIENCE
    assert isinstance(info.value, TimeoutError)  # ophyd-style code catches this
    assert isinstance(info.value, PvhubTimeoutError) and isinstance(info.value, PvhubError)
    assert not status.done  # the operation goes on
    status.set_finished()
    status.wait(PATIENCE)
    assert status.success


def test_wait_returns_when_another_thread_finishes_the_status():
    status = Status()
    finish_later(status)
    status.wait(PATIENCE)
    assert status.success


def test_exception_with_a_timeout_raises_status_timeout_while_pending():
    status = Status()
    with pytest.raises(StatusTimeoutError):
        status.exception(SHORT)
    assert not status.done
    error = ValueError("bad")
    finish_later(status, exc=error)
    assert status.exception(PATIENCE) is error


# --- callbacks ---------------------------------------------------------------------------------


def test_callbacks_run_once_after_finishing():
    status = Status()
    first, second = Recorder(), Recorder()
    status.add_callback(first)
    status.add_callback(second)
    assert first.calls == [] and second.calls == []
    status.set_finished()
    status.set_finished()
    status.set_exception(RuntimeError("late"))
    assert first.calls == [status] and second.calls == [status]


def test_callbacks_see_the_status_already_done():
    status = Status()
    seen = []
    status.add_callback(lambda s: seen.append((s.done, s.success)))
    status.set_exception(RuntimeError("no"))
    assert seen == [(True, False)]


def test_a_callback_added_after_finishing_runs_at_once_on_the_callers_thread():
    status = Status()
    status.set_finished()
    late = Recorder()
    status.add_callback(late)
    assert late.calls == [status]
    assert late.threads == [threading.current_thread()]


def test_callbacks_run_on_the_thread_that_finished_the_status():
    status = Status()
    recorder = Recorder()
    status.add_callback(recorder)
    timer = finish_later(status)
    status.wait(PATIENCE)
    timer.join(PATIENCE)
    assert recorder.threads == [timer]


def test_a_callback_that_raises_does_not_stop_the_others():
    status = Status()
    before, after = Recorder(), Recorder()

    def broken(_: Status) -> None:
        raise RuntimeError("callback bug")

    status.add_callback(before)
    status.add_callback(broken)
    status.add_callback(after)
    status.set_finished()
    assert before.calls == [status] and after.calls == [status]
    assert status.success
    status.add_callback(broken)  # nor does one added late raise into the caller


# --- timeout and settle_time at construction ------------------------------------------------------


def test_a_construction_timeout_fails_the_status():
    status = Status(timeout=SHORT)
    recorder = Recorder()
    status.add_callback(recorder)
    with pytest.raises(StatusTimeoutError):
        status.wait(PATIENCE)
    assert status.done and not status.success
    assert isinstance(status.exception(), StatusTimeoutError)
    assert recorder.calls == [status]
    status.set_finished()  # too late: ignored
    assert not status.success


def test_a_status_finished_before_its_timeout_stays_successful():
    status = Status(timeout=SHORT)
    status.set_finished()
    time.sleep(SHORT * 3)
    assert status.success


def test_settle_time_delays_success():
    status = Status(settle_time=SHORT)
    status.set_finished()
    assert not status.done  # settling
    status.wait(PATIENCE)
    assert status.success
    assert status.elapsed >= SHORT


def test_an_exception_during_settling_does_not_override_set_finished():
    status = Status(settle_time=SHORT)
    status.set_finished()
    status.set_exception(RuntimeError("late"))
    status.wait(PATIENCE)
    assert status.success


def test_a_status_finished_in_time_succeeds_even_if_settling_outlasts_the_timeout():
    status = Status(timeout=SHORT, settle_time=3 * SHORT)
    status.set_finished()
    status.wait(PATIENCE)
    assert status.success


# --- & and wait() ------------------------------------------------------------------------------


def test_and_succeeds_when_both_parts_succeed():
    left, right = Status(), Status()
    both = left & right
    assert isinstance(both, AndStatus)
    left.set_finished()
    assert not both.done
    right.set_finished()
    assert both.done and both.success


def test_and_of_finished_parts_is_finished():
    left, right = Status(), Status()
    left.set_finished()
    right.set_finished()
    assert (left & right).success


@pytest.mark.parametrize("failing", ["left", "right"])
def test_and_fails_as_soon_as_either_part_fails(failing):
    parts = {"left": Status(), "right": Status()}
    both = parts["left"] & parts["right"]
    error = RuntimeError(f"{failing} failed")
    parts[failing].set_exception(error)
    assert both.done and not both.success  # without waiting for the other part
    assert both.exception() is error
    with pytest.raises(RuntimeError, match=f"{failing} failed"):
        both.wait(PATIENCE)


def test_and_chains_over_three_statuses():
    a, b, c = Status(), Status(), Status()
    all_three = a & b & c
    a.set_finished()
    b.set_finished()
    assert not all_three.done
    c.set_finished()
    assert all_three.success


def test_wait_returns_when_all_succeed():
    statuses = [Status() for _ in range(3)]
    for status in statuses:
        finish_later(status)
    wait(*statuses, timeout=PATIENCE)
    assert all(s.success for s in statuses)


def test_wait_accepts_a_list_of_statuses():
    first, second = Status(), Status()
    first.set_finished()
    second.set_finished()
    wait([first, second], timeout=0)


def test_wait_raises_the_exception_of_a_failed_status():
    failed, fine = Status(), Status()
    error = RuntimeError("refused")
    failed.set_exception(error)
    fine.set_finished()
    with pytest.raises(RuntimeError) as info:
        wait(fine, failed, timeout=PATIENCE)
    assert info.value is error


def test_wait_times_out_within_about_the_timeout_for_all_statuses_together():
    pending = [Status() for _ in range(5)]
    timeout = 0.1
    started = time.monotonic()
    with pytest.raises(StatusTimeoutError):
        wait(*pending, timeout=timeout)
    elapsed = time.monotonic() - started
    # One deadline for all: five statuses do not each get the whole timeout (0.5 s).
    assert timeout <= elapsed < 0.35
    assert not any(s.done for s in pending)


def test_wait_raises_a_failure_without_waiting_for_earlier_pending_statuses():
    pending, failed = Status(), Status()
    error = RuntimeError("refused")
    failed.set_exception(error)
    with pytest.raises(RuntimeError) as info:
        wait(pending, failed, timeout=SHORT)
    assert info.value is error


# --- Bluesky -----------------------------------------------------------------------------------


def test_a_status_is_a_bluesky_status():
    # bluesky.protocols.Status is runtime_checkable: this checks the methods and properties.
    assert isinstance(Status(), bluesky.protocols.Status)
    assert isinstance(Status() & Status(), bluesky.protocols.Status)
    bluesky.protocols.check_supports(Status(), bluesky.protocols.Status)
