"""PV actors: each PV is owned by one actor, which alone speaks Channel Access for it."""

from pvhub.actors.state import PvState, coerce_value

__all__ = ["PvState", "coerce_value"]
