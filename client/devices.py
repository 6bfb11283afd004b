"""pyepics' ``Device`` and ``Motor``, through a pvhub daemon: PVs under one prefix read and
written as attributes (``dev.VAL``, ``motor.drive = 2.0``).

    from pvhub.client import epics      # was: import epics
    m = epics.Motor("XXX:m1")
    m.move(1.0, wait=True)
    print(m.get_position(readback=True), m.slew_speed)

Rule 1: the names, arguments and answers are pyepics': an attribute is a PV named prefix +
delimiter + attribute, made on first use (unless the device is not ``mutable``); reading it
is a ``get``, assigning it a ``put``. ``Motor.move`` answers pyepics' status codes.
Rule 2: the PVs are ``pvhub.client.epics.get_pv``'s, so a device shares them (and their one
subscription each) with every other user of the same names in the process.
Rule 3: a saved state is converted back by the PV's native type (a number read from a file
is a number again), which pyepics' own ``read_state`` means to do; text stays text.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from pvhub.client.pv import PV

# Names of a device's own attributes: never PVs.
_OWN = ("_prefix", "_pvs", "_delim", "_init", "_aliases", "_mutable", "_nonpvs", "_address",
        "_callbacks")


class Device:
    """PVs under ``prefix`` (joined by ``delim``) as attributes (Rule 1).

    ``attrs`` are made at once (without waiting for them to connect), ``aliases`` maps other
    names to attributes, ``nonpvs`` are plain attributes of a subclass, and a device that is
    not ``mutable`` has only the PVs it was given. ``with_poll`` is pyepics' and changes
    nothing: values arrive by themselves."""

    # Until __init__ has run (a subclass may set attributes first), attributes are plain.
    _init = False
    _nonpvs: list[str] = list(_OWN)

    def __init__(self, prefix: str = "", attrs: tuple[str, ...] | list[str] | None = None,
                 nonpvs: tuple[str, ...] | list[str] | None = None, delim: str = "",
                 timeout: float | None = None, mutable: bool = True,
                 aliases: dict[str, str] | None = None, with_poll: bool = True,
                 *, address: str | None = None) -> None:
        own = object.__setattr__
        own(self, "_init", False)
        own(self, "_nonpvs", [*_OWN, *(nonpvs or ())])
        own(self, "_delim", delim)
        own(self, "_prefix", prefix + delim)
        own(self, "_pvs", {})
        own(self, "_mutable", mutable)
        own(self, "_aliases", dict(aliases or {}))
        own(self, "_address", address)
        for attr in [*(attrs or ()), *self._aliases.values()]:
            self.PV(attr, connect=False, timeout=timeout)
        own(self, "_init", True)

    def PV(self, attr: str, connect: bool = True, **kw: Any) -> PV:  # noqa: N802 (pyepics' name)
        """The PV of attribute ``attr``, made on first use."""
        attr = self._aliases.get(attr, attr)
        pv = self._pvs.get(attr)
        if pv is None:
            pv = self._pvs[attr] = _get_pv(f"{self._prefix}{attr}", address=self._address, **kw)
        if connect and not pv.connected:
            pv.wait_for_connection()
        return pv

    def add_pv(self, pvname: str, attr: str | None = None, **kw: Any) -> PV:
        """Add the PV ``pvname`` (any name) as attribute ``attr`` (its name by default)."""
        pv = self._pvs[pvname if attr is None else attr] = _get_pv(pvname, address=self._address, **kw)
        return pv

    def put(self, attr: str, value: Any, wait: bool = False, use_complete: bool = False,
            timeout: float = 10) -> int | None:
        pv = self.PV(attr)
        return pv.put(value, wait=wait, use_complete=use_complete, timeout=timeout)

    def get(self, attr: str, as_string: bool = False, count: int | None = None,
            timeout: float | None = None) -> Any:
        return self.PV(attr).get(as_string=as_string, count=count, timeout=timeout)

    def save_state(self) -> dict[str, Any]:
        """Every attribute's value (a char waveform's as text)."""
        return {attr: pv.get(as_string=_is_text(pv)) for attr, pv in self._pvs.items()}

    def get_all(self) -> dict[str, Any]:
        return self.save_state()

    def restore_state(self, state: dict[str, Any]) -> None:
        """Put back the values of ``state`` to the attributes that may be written."""
        for attr, value in state.items():
            pv = self._pvs.get(attr)
            if pv is not None and pv.write_access:
                pv.put(value)

    def write_state(self, fname: str, state: dict[str, Any] | None = None) -> None:
        """Write ``state`` (the current one by default) to ``fname``: the writable scalar and
        text attributes, one ``name value`` line each."""
        state = self.save_state() if state is None else state
        lines = [f"#Device Saved State for {type(self).__name__},prefix='{self._prefix}',time={time.ctime()}"]
        for attr in sorted(state):
            pv = self._pvs.get(attr)
            if pv is not None and pv.write_access and (pv.count == 1 or _is_text(pv)):
                lines.append(f"{attr} {state[attr]}")
        with open(fname, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")

    def read_state(self, fname: str, restore: bool = False) -> dict[str, Any]:
        """The state written to ``fname`` (Rule 3); put back too with ``restore``."""
        state: dict[str, Any] = {}
        with open(fname, encoding="utf-8") as source:
            for line in source:
                line = line.rstrip("\n")
                if not line or line.startswith("#") or " " not in line:
                    continue
                attr, text = line.split(" ", 1)
                if attr in self._pvs:
                    state[attr] = _parsed(text, self._pvs[attr])
        if restore:
            self.restore_state(state)
        return state

    def add_callback(self, attr: str, callback: Callable[..., Any], **kws: Any) -> int:
        return self.PV(attr).add_callback(callback, **kws)

    def remove_callbacks(self, attr: str, index: int | None = None) -> None:
        self.PV(attr).remove_callback(index=index)

    def __getattr__(self, attr: str) -> Any:
        # Only for names not found the usual way: the device's own are set in __init__.
        if attr.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no attribute {attr}")
        attr = self._aliases.get(attr, attr)
        if attr in self._pvs:
            return self.get(attr)
        if self._init and self._mutable:
            pv = self.PV(attr, connect=True)
            if pv.connected:
                return pv.get()
        raise AttributeError(f"{type(self).__name__} has no attribute {attr}")

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr in self._nonpvs or attr in self.__dict__ or not self._init:
            object.__setattr__(self, attr, value)
            return
        attr = self._aliases.get(attr, attr)
        if attr in self._pvs or (self._mutable and not attr.startswith("__")):
            self.put(attr, value)
            return
        raise AttributeError(f"{type(self).__name__} has no attribute {attr}")

    def __dir__(self) -> list[str]:
        return sorted({*self._aliases, *self._pvs, *self._nonpvs, *self.__dict__, *dir(type(self))})

    def __repr__(self) -> str:
        return f"<Device '{self._prefix.removesuffix('.')}', {len(self._pvs)} attributes>"

    @staticmethod
    def pv_property(attr: str, as_string: bool = False, wait: bool = False, timeout: float = 10.0) -> property:
        """A class attribute that reads and writes ``attr`` (for subclasses)."""
        return property(lambda self: self.get(attr, as_string=as_string),
                        lambda self, value: self.put(attr, value, wait=wait, timeout=timeout))


def _get_pv(pvname: str, **kw: Any) -> PV:
    """``pvhub.client.epics.get_pv`` (Rule 2), imported when first used: that module imports
    this one."""
    from pvhub.client.epics import get_pv

    return get_pv(pvname, **kw)


def _is_text(pv: PV) -> bool:
    return pv.type.endswith("char") and pv.nelm > 1


def _parsed(text: str, pv: PV) -> Any:
    kind = pv.type.rsplit("_", 1)[-1]
    try:
        if kind in ("double", "float"):
            return float(text)
        if kind in ("long", "short", "enum") or (kind == "char" and pv.nelm == 1):
            return int(text)
    except ValueError:
        pass
    return text


class MotorException(Exception):
    """Not a motor, or no such field."""


class MotorLimitException(Exception):
    """A move stopped at a soft or hard limit."""


# The motor record's fields by pyepics' names for them (m.drive is m.VAL).
_MOTOR_FIELDS = {
    "acceleration": "ACCL", "back_accel": "BACC", "backlash": "BDST", "back_speed": "BVEL",
    "card": "CARD", "dial_high_limit": "DHLM", "direction": "DIR", "dial_low_limit": "DLLM",
    "settle_time": "DLY", "done_moving": "DMOV", "dial_readback": "DRBV", "description": "DESC",
    "dial_drive": "DVAL", "units": "EGU", "encoder_step": "ERES", "freeze_offset": "FOFF",
    "move_fraction": "FRAC", "hi_severity": "HHSV", "hi_alarm": "HIGH", "hihi_alarm": "HIHI",
    "high_limit": "HLM", "high_limit_set": "HLS", "hw_limit": "HLSV", "home_forward": "HOMF",
    "home_reverse": "HOMR", "high_op_range": "HOPR", "high_severity": "HSV",
    "integral_gain": "ICOF", "jog_accel": "JAR", "jog_forward": "JOGF", "jog_reverse": "JOGR",
    "jog_speed": "JVEL", "last_dial_val": "LDVL", "low_limit": "LLM", "low_limit_set": "LLS",
    "lo_severity": "LLSV", "lolo_alarm": "LOLO", "low_op_range": "LOPR", "low_alarm": "LOW",
    "last_rel_val": "LRLV", "last_dial_drive": "LRVL", "last_SPMG": "LSPG",
    "low_severity": "LSV", "last_drive": "LVAL", "soft_limit": "LVIO", "in_progress": "MIP",
    "missed": "MISS", "moving": "MOVN", "resolution": "MRES", "motor_status": "MSTA",
    "offset": "OFF", "output_mode": "OMSL", "output": "OUT", "prop_gain": "PCOF",
    "precision": "PREC", "readback": "RBV", "retry_max": "RTRY", "retry_count": "RCNT",
    "retry_deadband": "RDBD", "dial_difference": "RDIF", "raw_encoder_pos": "REP",
    "raw_high_limit": "RHLS", "raw_low_limit": "RLLS", "relative_value": "RLV",
    "raw_motor_pos": "RMP", "raw_readback": "RRBV", "readback_res": "RRES", "raw_drive": "RVAL",
    "dial_speed": "RVEL", "s_speed": "S", "s_back_speed": "SBAK", "s_base_speed": "SBAS",
    "s_max_speed": "SMAX", "set": "SET", "stop_go": "SPMG", "s_revolutions": "SREV",
    "stop_command": "STOP", "t_direction": "TDIR", "tweak_forward": "TWF",
    "tweak_reverse": "TWR", "tweak_val": "TWV", "use_encoder": "UEIP", "u_revolutions": "UREV",
    "use_rdbl": "URIP", "drive": "VAL", "base_speed": "VBAS", "slew_speed": "VELO",
    "version": "VERS", "max_speed": "VMAX", "use_home": "ATHM", "deriv_gain": "DCOF",
    "use_torque": "CNEN", "device_type": "DTYP", "record_type": "RTYP", "status": "STAT",
}
_MOTOR_FIRST = ("VAL", "DESC", "RTYP", "RBV", "PREC", "TWV", "FOFF", "VELO", "STAT", "SET", "LLM",
                "HLM", "SPMG", "LVIO", "HLS", "LLS")

# Motor.move's answers, as pyepics gives them.
NONFLOAT, OUTSIDE_LIMITS, UNCONNECTED = -13, -12, -11
TIMEOUT, TIMEOUT_BUT_DONE, UNKNOWN_ERROR = -8, -7, -5
DONE_SOFT_LIMIT, DONE_HARD_LIMIT, DONE_OK = -4, -3, 0
MOVE_BEGUN, MOVE_BEGUN_CONFIRMED, NOWAIT_HARD_LIMIT, NOWAIT_SOFT_LIMIT = 0, 1, 3, 4


class Motor(Device):
    """An EPICS motor record (``name`` with or without ``.VAL``), as pyepics' ``Motor``."""

    def __init__(self, name: str | None = None, timeout: float = 3.0, *, address: str | None = None) -> None:
        if name is None:
            raise MotorException("must supply motor name")
        name = name.removesuffix(".VAL").removesuffix(".")
        super().__init__(name, attrs=_MOTOR_FIRST, delim=".", timeout=timeout, address=address)
        object.__setattr__(self, "_callbacks", {})
        # The field names after the PVs are made: given to Device, each would be made at once.
        object.__setattr__(self, "_aliases", dict(_MOTOR_FIELDS))
        record_type = self.PV("RTYP", connect=False)
        if not record_type.wait_for_connection(timeout) or record_type.get() != "motor":
            raise MotorException(f"{name} is not an Epics Motor")
        self.add_pv(f"{name}_able.VAL", attr="disabled", connect=False)

    def __repr__(self) -> str:
        return f"<epics.Motor: {self._prefix.removesuffix('.')}: '{self.get('DESC')}'>"

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            if attr.startswith("_"):
                raise  # Python's own questions (copy, pickle) get Python's answer
            raise MotorException(f"EpicsMotor has no attribute {attr}") from None

    def check_limits(self) -> None:
        """Raise ``MotorLimitException`` if a soft or hard limit was hit."""
        for field, message in (("LVIO", "Soft limit violation"), ("HLS", "High hard limit violation"),
                               ("LLS", "Low  hard limit violation")):
            if self.get(field) != 0:
                raise MotorLimitException(message)

    def within_limits(self, val: float, dial: bool = False) -> bool:
        low, high = ("DLLM", "DHLM") if dial else ("LLM", "HLM")
        return self.get(low) <= val <= self.get(high)

    def move(self, val: Any = None, relative: bool = False, wait: bool = False, timeout: float = 300.0,
             dial: bool = False, step: bool = False, raw: bool = False, ignore_limits: bool = False,
             confirm_move: bool = False) -> int:
        """Move to ``val`` (user, ``dial`` or ``raw`` coordinates; ``relative`` to where it
        is); pyepics' codes: 0 done (or begun), 1 begun and seen moving, negative failures."""
        try:
            target = float(val)
        except (TypeError, ValueError):
            return NONFLOAT
        step = step or raw
        drive = "DVAL" if dial else "RVAL" if step else "VAL"
        if relative:
            target += self.get(drive)
        if not ignore_limits and not step and not self.within_limits(target, dial=dial):
            return OUTSIDE_LIMITS
        result = self.put(drive, target, wait=wait, timeout=timeout)
        if result is None:
            return UNCONNECTED
        if wait and result == -1:
            return TIMEOUT if self.get("DMOV") == 0 else TIMEOUT_BUT_DONE
        if result != 1:
            return UNKNOWN_ERROR
        if wait:
            if self.get("LVIO") == 1:
                return DONE_SOFT_LIMIT
            return DONE_HARD_LIMIT if 1 in (self.get("HLS"), self.get("LLS")) else DONE_OK
        if confirm_move:
            deadline = time.monotonic() + 0.25
            while self.get("MOVN") == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
        if self.get("MOVN") == 1:
            return MOVE_BEGUN_CONFIRMED
        if self.get("LVIO") == 1:
            return NOWAIT_SOFT_LIMIT
        return NOWAIT_HARD_LIMIT if 1 in (self.get("HLS"), self.get("LLS")) else MOVE_BEGUN

    def get_position(self, dial: bool = False, readback: bool = False, step: bool = False,
                     raw: bool = False) -> Any:
        """The drive (or ``readback``) position in user, ``dial`` or ``raw`` coordinates."""
        drive, back = ("DVAL", "DRBV") if dial else ("RVAL", "RRBV") if step or raw else ("VAL", "RBV")
        return self.get(back if readback else drive)

    def tweak(self, direction: str = "foreward", wait: bool = False, timeout: float = 300.0) -> int:
        """Move by the tweak step (``TWV``), forward, or back for a direction starting with
        "rev" or "back": 0 done, -1 failed or at a limit."""
        field = "TWR" if direction.startswith(("rev", "back")) else "TWF"
        result = self.put(field, 1, wait=wait, timeout=timeout)
        answer = 0 if result == 1 else -1
        try:
            self.check_limits()
        except MotorLimitException:
            answer = -1
        return answer

    def set_position(self, position: float, dial: bool = False, step: bool = False, raw: bool = False) -> None:
        """Say the motor is at ``position`` (user, ``dial`` or ``raw``), moving nothing: the
        record is put in Set mode for the write, then back in Use mode."""
        self.put("SET", 1, wait=True)
        self.put("DVAL" if dial else "RVAL" if step or raw else "VAL", position, wait=True)
        self.put("SET", 0)

    def get_pv(self, attr: str) -> PV:
        return self.PV(attr)

    def set_callback(self, attr: str = "VAL", callback: Callable[..., Any] | None = None,
                     kws: dict[str, Any] | None = None) -> None:
        index = self.PV(attr).add_callback(callback=callback, motor_field=attr, **(kws or {}))
        self._callbacks[attr] = index

    def clear_callback(self, attr: str = "drive") -> None:
        index = self._callbacks.pop(attr, None)
        if index is not None:
            self.PV(attr).remove_callback(index=index)

    def refresh(self) -> None:
        """Values arrive by themselves: nothing to refresh."""

    def stop(self) -> None:
        self.put("STOP", 1)

    StopNow = stop  # noqa: N815 (pyepics' name)

    def make_step_list(self, minstep: float = 0.0, maxstep: float | None = None, decades: int = 10) -> list[float]:
        """Steps of 1, 2 and 5 per decade from the precision up, within ``maxstep`` (0.6 of the
        range by default)."""
        if maxstep is None:
            maxstep = 0.6 * abs(self.get("HLM") - self.get("LLM"))
        precision = self.get("PREC")
        return [step for decade in range(decades) for step in (j * 10 ** (decade - precision) for j in (1, 2, 5))
                if 0.98 * minstep < step <= maxstep]

    def get_info(self) -> dict[str, str]:
        return {attr: self.get(attr, as_string=True)
                for attr in ("DESC", "VAL", "RBV", "PREC", "VELO", "STAT", "SET", "TWV", "LLM", "HLM", "SPMG")}
