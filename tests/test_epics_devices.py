"""pyepics' ``Device`` and ``Motor`` (``pvhub.client.epics``, client/devices.py) through a real
daemon: the zoo IOC for a device, caproto's fake motor record for a motor."""

from __future__ import annotations

import pytest
from helpers import wait_until

from pvhub.client import close_hubs, epics
from pvhub.testing import SimulatedIOC

pytestmark = [pytest.mark.system, pytest.mark.timeout(90)]

TIMEOUT = 10.0


@pytest.fixture
def motor_ioc(prefix: str):
    """caproto's fake motor records under ``prefix + "m:"``: ``mtr3`` moves at 3 units/s
    within 0..30 (the zoo serves names of its own under ``prefix``)."""
    with SimulatedIOC("caproto.ioc_examples.fake_motor_record", prefix=prefix + "m:", ready_pv="mtr3") as ioc:
        yield ioc


@pytest.fixture
def daemon(zoo_ioc, motor_ioc, hub_factory, monkeypatch):
    daemon = hub_factory(zoo_ioc, motor_ioc)
    monkeypatch.setenv("PVHUB_ADDRESS", daemon.address)
    yield daemon
    epics.clear_pv_cache()
    close_hubs()


def test_a_device_reads_and_writes_its_pvs_as_attributes(daemon, zoo_ioc, prefix, tmp_path):
    dev = epics.Device(prefix, attrs=("motor", "count", "text", "chars"), aliases={"position": "motor"})
    assert dev.PV("motor").wait_for_connection(TIMEOUT)
    dev.motor = 2.5
    wait_until(lambda: dev.motor == 2.5, TIMEOUT, message=lambda: f"motor {dev.motor}")
    assert dev.position == 2.5 and zoo_ioc.read("motor").data[0] == 2.5
    assert dev.put("count", 4, wait=True) == 1 and dev.get("count") == 4
    assert dev.mode == 0  # made on first use: the device is mutable
    assert repr(dev) == "<Device 't" + prefix[1:] + "', 5 attributes>"

    state = dev.save_state()
    assert state["chars"] == "abc" and state["text"] == "hello"
    path = tmp_path / "state.txt"
    dev.write_state(str(path))
    dev.motor, dev.count, dev.text = 7.0, 9, "changed"
    wait_until(lambda: (dev.motor, dev.count, dev.text) == (7.0, 9, "changed"), TIMEOUT)
    restored = dev.read_state(str(path), restore=True)
    assert restored == {"motor": 2.5, "count": 4, "text": "hello", "chars": "abc", "mode": 0}
    wait_until(lambda: (dev.motor, dev.count, dev.text) == (2.5, 4, "hello"), TIMEOUT,
               message=lambda: f"{(dev.motor, dev.count, dev.text)}")

    fixed = epics.Device(prefix, attrs=("motor",), mutable=False)
    with pytest.raises(AttributeError):
        fixed.count  # noqa: B018
    with pytest.raises(AttributeError):
        fixed.count = 3


def test_a_motor_moves_stops_and_keeps_to_its_limits(daemon, motor_ioc, prefix):
    m = epics.Motor(prefix + "m:mtr3")
    assert m.slew_speed == 3.0 and m.high_limit == 30.0 and m.low_limit == 0.0
    assert m.within_limits(5.0) and not m.within_limits(31.0)
    assert m.move(100.0) == -12  # outside the soft limits: not attempted
    assert m.move("far") == -13
    # Begun: 1 if seen moving already, else 0, or 4 ("soft limit") on this fake record, whose
    # LVIO is always 1; pyepics reads the same fields and answers the same.
    assert m.move(1.5) in (0, 1, 4)
    wait_until(lambda: m.done_moving == 1 and m.get_position(readback=True) == pytest.approx(1.5), TIMEOUT,
               message=lambda: f"at {m.readback}, done moving {m.done_moving}")
    assert m.get_position() == 1.5 and m.drive == 1.5
    assert motor_ioc.read("mtr3.RBV").data[0] == pytest.approx(1.5)
    assert m.move(0.5, relative=True) in (0, 1, 4)
    wait_until(lambda: m.readback == pytest.approx(2.0), TIMEOUT, message=lambda: f"at {m.readback}")

    m.move(30.0)
    wait_until(lambda: m.readback > 4.0, TIMEOUT, message=lambda: f"at {m.readback}")
    m.stop()
    wait_until(lambda: motor_ioc.read("mtr3.DMOV").data[0] == 1, TIMEOUT, message="never done moving")
    assert 4.0 < m.readback < 30.0
    assert m.get_info()["VELO"] == "3.00"
    with pytest.raises(epics.MotorException):
        m.no_such_field  # noqa: B018


def test_a_record_that_is_not_a_motor_is_refused(daemon, prefix):
    with pytest.raises(epics.MotorException, match="not an Epics Motor"):
        epics.Motor(prefix + "motor")


def test_a_subclass_may_set_its_own_attributes_before_the_device_is_made(daemon, prefix):
    class Stage(epics.Device):
        def __init__(self, prefix: str) -> None:
            self.label = "stage"  # before Device.__init__, as pyepics allows
            super().__init__(prefix, attrs=("motor",), nonpvs=("label",))

    stage = Stage(prefix)
    assert stage.label == "stage"
    assert stage.PV("motor").wait_for_connection(TIMEOUT) and stage.motor == 0.0
