"""EPICS alarm severities and statuses as ophyd names them (``ophyd.utils.epics_pvs``):
``IntEnum``s, so that ``sig.alarm_severity == 2`` still holds and ``.name`` says ``"MAJOR"``.

Rule 1: the numbers are EPICS base's (``menuAlarmSevr``, ``menuAlarmStat``); a number an IOC
sends that names none of them is given as the plain int, never refused.
"""

from __future__ import annotations

from enum import IntEnum


class AlarmSeverity(IntEnum):
    NO_ALARM = 0
    MINOR = 1
    MAJOR = 2
    INVALID = 3


class AlarmStatus(IntEnum):
    NO_ALARM = 0
    READ = 1
    WRITE = 2
    HIHI = 3
    HIGH = 4
    LOLO = 5
    LOW = 6
    STATE = 7
    COS = 8
    COMM = 9
    TIMEOUT = 10
    HWLIMIT = 11
    CALC = 12
    SCAN = 13
    LINK = 14
    SOFT = 15
    BAD_SUB = 16
    UDF = 17
    DISABLE = 18
    SIMM = 19
    READ_ACCESS = 20
    WRITE_ACCESS = 21


# By number: a callback's kwargs carry them, and a tuple index is cheaper than the enum's call.
_SEVERITIES = tuple(AlarmSeverity)
_STATUSES = tuple(AlarmStatus)


def severity_of(number: int) -> AlarmSeverity | int:
    return _SEVERITIES[number] if type(number) is int and 0 <= number < len(_SEVERITIES) else number  # Rule 1


def status_of(number: int) -> AlarmStatus | int:
    return _STATUSES[number] if type(number) is int and 0 <= number < len(_STATUSES) else number  # Rule 1
