"""What the benchmark learns about processes from /proc: CPU time, children, liveness.

Rule 1: read only. Nothing here signals a process; stopping is left to whoever started it.
Rule 2: a process that vanished between two reads counts as zero CPU from then on, never as
an error: actors and subscribers come and go while the benchmark samples them.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def cpu_seconds(pids: list[int] | tuple[int, ...]) -> float:
    """User plus system CPU seconds used so far by ``pids`` (each process, all its threads)."""
    total = 0
    for pid in pids:
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def children(parent: int) -> list[int]:
    """Pids whose parent is ``parent``."""
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:"):
                if int(line.split()[1]) == parent:
                    found.append(int(entry.name))
                break
    return found


def command_line(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_child(parent: int, *words: str) -> int | None:
    """The child of ``parent`` whose command line holds every one of ``words``."""
    for pid in children(parent):
        line = command_line(pid)
        if all(word in line for word in words):
            return pid
    return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in (_PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def load_average() -> str:
    return " ".join((_PROC / "loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in (_PROC / "cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def descendants(root: int) -> list[int]:
    """Every living process below ``root`` in the process tree (children, theirs, ...)."""
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def rss_bytes(pids: list[int] | tuple[int, ...]) -> int:
    """Resident memory of ``pids`` added up (shared pages count once per process)."""
    total = 0
    for pid in pids:
        try:
            status = (_PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total
