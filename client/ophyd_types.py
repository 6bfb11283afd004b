"""ophyd's own types that a Signal speaks: ``Kind``, and ophyd's ``LimitError``.

Rule 1: nothing here imports ophyd: it costs seconds and starts threads, and the client works
without it. Where ophyd's class itself is needed (``LimitError``), it is taken from
``sys.modules`` when ophyd is in use; a process that never imported ophyd catches nothing
of ophyd's.
Rule 2: ``Kind`` has ophyd's names and values, so an ophyd Device's tests of a Signal's kind
(``kind & Kind.config``...) mean what they mean with ophyd's own Signals.
"""

from __future__ import annotations

import enum
import sys

from pvhub.errors import LimitError


class Kind(enum.IntFlag):
    """ophyd's Kind: what part of a device's readings a signal belongs to."""

    omitted = 0b000
    normal = 0b001
    config = 0b010
    hinted = 0b101


_limit_errors: dict[type, type] = {}


def limit_error(message: str) -> LimitError:
    """A ``pvhub.errors.LimitError`` that is also ophyd's ``LimitError`` when ophyd is in use,
    so that code catching either catches it (Rule 1)."""
    ophyd_utils = sys.modules.get("ophyd.utils")
    ophyd_class = getattr(ophyd_utils, "LimitError", None)
    if ophyd_class is None:
        return LimitError(message)
    both = _limit_errors.get(ophyd_class)
    if both is None:
        both = _limit_errors[ophyd_class] = type("LimitError", (LimitError, ophyd_class), {})
    return both(message)
