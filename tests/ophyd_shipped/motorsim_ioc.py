"""caproto's fake motor record, under the name ophyd's shipped tests expect of their motorsim IOC.

ophyd's tests drive ``XF:31IDA-OP{Tbl-Ax:X1}Mtr``, a motor of the synApps motorsim IOC. This
serves one motor record there (``<prefix>Mtr``) with ``FakeMotor`` of
``caproto.ioc_examples.fake_motor_record``, moving at 1 unit/s within -100..100.

    python -m tests.ophyd_shipped.motorsim_ioc --prefix "XF:31IDA-OP{Tbl-Ax:X1}" --interfaces 127.0.0.1
"""

from __future__ import annotations

from caproto.ioc_examples.fake_motor_record import FakeMotor
from caproto.server import ioc_arg_parser, run

if __name__ == "__main__":
    ioc_options, run_options = ioc_arg_parser(default_prefix="XF:31IDA-OP{Tbl-Ax:X1}", desc=__doc__)
    # caproto reads braces in a prefix as macros, and this name has real ones: the whole
    # name goes in as the value of one macro.
    name = ioc_options.pop("prefix") + "Mtr"
    ioc_options.pop("macros", None)
    motor = FakeMotor(prefix="{name}", macros={"name": name}, velocity=1.0, precision=3,
                      user_limits=(-100.0, 100.0))
    run(motor.pvdb, **run_options)
