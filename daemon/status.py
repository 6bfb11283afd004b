"""What ``pvhub status`` shows: each PV's counts and update rate, taken from its actor's
heartbeats, and the daemon's status built from them.

Rule 1: no I/O; the status is a plain dict, sent as it is in a ``StatusReply``.
Rule 2: a heartbeat carries only the PVs whose counts changed (routing.py Rule 5), so a PV
that stopped changing sends nothing more: its rate decays as time goes by. What a dead
process counted dies with it.
Rule 3: building a status is the one walk of every PV and every client (a client pays for
it, ``daemon/clients.py`` Rule 2). A ``viewer`` whose identity may not read every PV sees
only the PVs it may read, and no other client.
"""

from __future__ import annotations

from pvhub import __version__
from pvhub import protocol as p
from pvhub.access import AccessRules
from pvhub.daemon.clients import ClientRecord, Clients
from pvhub.daemon.placement import Placement, PvRecord

# Update rates are measured over windows at least this long.
RATE_WINDOW_S = 1.0


def take_counts(pv_record: PvRecord, values: object, now: float) -> None:
    """What ``pv_record``'s actor said of it in a heartbeat (Rule 2); a malformed entry is
    ignored."""
    if not isinstance(values, dict):
        return
    updates = values.get("updates", 0)
    if not isinstance(updates, int):
        return
    pv_record.connected = bool(values.get("connected", False))
    pv_record.ever_connected = pv_record.ever_connected or pv_record.connected
    pv_record.updates = updates
    last = values.get("last_update")
    pv_record.last_update = last if isinstance(last, (int, float)) else pv_record.last_update
    if pv_record.window is None or updates < pv_record.window[1]:
        pv_record.window = (now, updates)
    elif now - pv_record.window[0] >= RATE_WINDOW_S:
        pv_record.rate = (updates - pv_record.window[1]) / (now - pv_record.window[0])
        pv_record.window = (now, updates)


def drop_counts(pv_record: PvRecord) -> None:
    """``pv_record``'s process died, and what it counted with it (Rule 2)."""
    pv_record.connected, pv_record.updates, pv_record.rate = False, 0, 0.0
    pv_record.last_update = pv_record.window = None


def rate(pv_record: PvRecord, now: float) -> float:
    # A PV that stopped changing sends no more stats: its rate decays as time goes by. A
    # busy PV's count comes every ACTOR_STATS_INTERVAL_S (at the next heartbeat after it).
    if pv_record.window is None:
        return 0.0
    since, updates = pv_record.window
    if now - since <= max(2 * RATE_WINDOW_S, p.ACTOR_STATS_INTERVAL_S + 2 * p.ACTOR_HEARTBEAT_S):
        return pv_record.rate
    return (pv_record.updates - updates) / (now - since)


def build_status(placement: Placement, clients: Clients, access: AccessRules, readings: str, uptime: float,
                 now: float, viewer: ClientRecord | None = None, large_readings: str = "") -> dict:
    """The daemon's state, as ``viewer`` may see it (Rule 3)."""
    everything = viewer is None or access.reads_everything(viewer.identity)
    subscribers = clients.subscribers()
    pvs = []
    for pv in sorted(placement.pvs):
        if not everything and not access.may_read(viewer.identity, pv):  # type: ignore[union-attr]
            continue
        pv_record = placement.pvs[pv]
        record = placement.actors[pv_record.actor]
        pvs.append(
            {
                "pv": pv,
                "actor": record.actor,
                "pid": record.pid,
                "connected": pv_record.connected and record.ready,
                "updates": pv_record.updates,
                "rate": round(rate(pv_record, now), 2),
                "last_update": pv_record.last_update,
                "subscribers": subscribers.get(pv, 0),
                "restarts": record.restarts,
                "quarantined": pv_record.quarantined,
            }
        )
    return {
        "version": __version__,
        "uptime": uptime,
        "readings": readings,
        "large_readings": large_readings,
        "pvs": pvs,
        "actors": [
            {
                "actor": r.actor,
                "kind": r.kind,
                "pvs": sorted(r.pvs),
                "pid": r.pid,
                "ready": r.ready,
                "inflight": len(r.inflight),
                "restarts": r.restarts,
                "age": now - r.started,
            }
            for r in placement.actors.values()
            if everything
        ],
        "clients": [
            {
                "client": c.client.hex(),
                "name": c.name,
                "identity": c.identity,
                "requests": c.requests,
                "inflight": c.inflight,
                "idle": now - c.last_seen,
                "pvs": len(c.pvs or ()),
            }
            for c in clients.values()
            if everything or c is viewer
        ],
    }
