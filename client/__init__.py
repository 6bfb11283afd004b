"""The client library: ophyd-compatible Signals and Statuses served by a pvhub daemon.

    from pvhub.client import EpicsSignal, EpicsSignalRO, wait
"""

from pvhub.client.alarms import AlarmSeverity, AlarmStatus
from pvhub.client.hub import Hub
from pvhub.client.registry import close_hubs, get_hub
from pvhub.client.ophyd_types import Kind
from pvhub.client.signal import EpicsSignal, EpicsSignalBase, EpicsSignalRO
from pvhub.client.status import AndStatus, Status, wait
from pvhub.errors import (
    ConnectionTimeoutError,
    DisconnectedError,
    LimitError,
    PvhubError,
    ReadOnlyError,
    StatusTimeoutError,
)

__all__ = [
    "AlarmSeverity",
    "AlarmStatus",
    "AndStatus",
    "ConnectionTimeoutError",
    "DisconnectedError",
    "EpicsSignal",
    "EpicsSignalBase",
    "EpicsSignalRO",
    "Hub",
    "Kind",
    "LimitError",
    "PvhubError",
    "ReadOnlyError",
    "Status",
    "StatusTimeoutError",
    "close_hubs",
    "get_hub",
    "wait",
]
