"""When a Signal's ``set`` is done: ``send_set`` asks the daemon to put, and finishes the set's
Status as the put completes, or as ``ReadbackWatch`` sees the readback reach the target.

Rule 1: the daemon always puts with completion. pvhub's default is ``put_complete=True``: a
set is done when the IOC reports the put complete, with the value read back after it applied
first (ophyd's default is ``False``, which polls the readback; through the daemon the
completion is both sooner and sure). Given ``tolerance`` or ``rtolerance``, a set also waits,
after the completion, until the readback (``read_pv``) is within tolerance of the target, as
ophyd's ``_wait_for_value`` does, or fails when the set's timeout expires. With
``put_complete=False`` a set is done as soon as the readback is within ``tolerance`` (given,
or ``10**-precision``, or exact, as ophyd derives it) of the target, whether or not the put
has completed; a put that fails still fails it.
Rule 2: the readback decides only once the watch is armed: by the put's completion when the
set waits for it, at once when it does not. Until then a readback already at the target
(the value before the put, perhaps) finishes nothing.
Rule 3: replies and readbacks arrive on the hub's I/O thread (a watch is a listener of the
read channel, called with its ``cond`` held), so the Status is finished through the hub's
``dispatch``: its callbacks run on the callback thread (status.py, Rule 3). A watch stops
listening once the Status is done, however it ended.
Rule 4: "reached" is ophyd's ``_compare_maybe_enum``: enum values compare by label, numbers
within the absolute and relative tolerance, anything else exactly; values that cannot be
compared have not reached it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from pvhub import protocol as p
from pvhub.client.hub import Channel, Hub
from pvhub.client.status import Status
from pvhub.errors import error_from_code


def within_tolerance(target: Any, current: Any, enum_strs: Iterable[str] | None, atol: Any, rtol: Any) -> bool:
    """Whether ``current`` has reached ``target`` (Rule 4)."""
    if current is None:
        return target is None
    if enum_strs:
        strs = list(enum_strs)
        try:
            a = target if isinstance(target, str) else strs[int(target)]
            b = current if isinstance(current, str) else strs[int(current)]
        except (IndexError, TypeError, ValueError):
            return False
        return a == b
    try:
        if atol is not None or rtol is not None:
            return bool(np.allclose(target, current, rtol=rtol if rtol is not None else 1e-5,
                                    atol=atol if atol is not None else 1e-8))
        return bool(np.all(np.asarray(target == current)))
    except (TypeError, ValueError):  # shapes or types that cannot be compared: not there
        return False


class ReadbackWatch:
    """Finishes ``status`` once ``channel`` holds a value within tolerance of ``target``."""

    def __init__(self, channel: Channel, dispatch: Callable[..., Any], status: Status, target: Any,
                 atol: Any, rtol: Any) -> None:
        self.channel = channel
        self.dispatch = dispatch  # the hub's (Rule 3)
        self.status = status
        self.target = target
        self.atol = atol
        self.rtol = rtol
        self.armed = False

    def start(self) -> None:
        self.channel.add_listener(self.on_change)
        self.status.add_callback(lambda _: self.channel.remove_listener(self.on_change))

    def arm(self) -> None:
        """From now on the readback decides; it may already be there (Rule 2)."""
        with self.channel.cond:
            self.armed = True
            self.on_change("value", self.channel, None)

    # On the I/O thread with the channel's cond held (or from ``arm``).
    def on_change(self, kind: str, channel: Channel, old: p.Reading | None) -> None:
        if not self.armed or self.status.done or channel.reading is None:
            return
        if within_tolerance(self.target, channel.reading.value, channel.metadata.get("enum_strs"),
                            self.atol, self.rtol):
            self.status.set_finished(dispatch=self.dispatch)


def send_set(hub: Hub, value: Any, write_channel: Channel, status: Status,
             watch: ReadbackWatch | None, use_complete: bool) -> None:
    """Ask the daemon to put ``value`` to ``write_channel``'s PV; ``status`` finishes when the completion
    (``use_complete``), the ``watch``, or both say so (Rule 1), or fails with the put."""
    if watch is not None:
        watch.start()
        if not use_complete:
            watch.arm()

    def on_reply(message: p.Message) -> bool:
        if isinstance(message, p.SetDone):
            write_channel.apply_reply(message)  # read-your-writes, before anyone hears "done"
            if watch is None:
                status.set_finished(dispatch=hub.dispatch)  # waiters wake now (status.py Rule 4)
            elif use_complete:
                watch.arm()
        elif isinstance(message, p.ErrorReply):
            status.set_exception(error_from_code(message.code, message.message), dispatch=hub.dispatch)
        else:
            return False
        return True

    pv = write_channel.pv
    # The Status waits for the end, so the acceptance is not asked for (protocol Rule 3).
    hub.request(lambda rid: p.SetRequest(id=rid, pv=pv, value=value, accepted=False), on_reply)
