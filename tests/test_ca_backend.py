"""The actor's Channel Access backend and its codec: monitor updates read straight from the
bytes give what caproto's parser gives, for every DBR_TIME type, scalars and arrays; and the
backend on its own (``Driver``) against a real IOC.

Rule: the bytes are made by caproto's own encoder, the way an IOC sends them, so the fast
path is compared with the slow one on the same message.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from caproto import ChannelType, EventAddResponse
from caproto._commands import read_from_bytestream
from caproto._dbr import DBR_TYPES, TimeStamp
import caproto

from pvhub.actors import backend as ca
from pvhub.actors import codec, search
from pvhub.actors.driver import Driver
from pvhub.testing import SimulatedIOC, free_udp_port

pytestmark = pytest.mark.timeout(60)

CASES = [
    (ChannelType.TIME_DOUBLE, [3.25]),
    (ChannelType.TIME_DOUBLE, [1.5, -2.0, 1e300]),
    (ChannelType.TIME_FLOAT, [0.1]),
    (ChannelType.TIME_FLOAT, [0.1, 7.75, -3.5]),
    (ChannelType.TIME_LONG, [-123456]),
    (ChannelType.TIME_LONG, list(range(-5, 6))),
    (ChannelType.TIME_INT, [-300]),
    (ChannelType.TIME_INT, [1, 2, 3, 4, 5]),
    (ChannelType.TIME_ENUM, [3]),
    (ChannelType.TIME_CHAR, [200]),
    (ChannelType.TIME_CHAR, list(b"hello, world\0\0")),
    (ChannelType.TIME_STRING, [b"a string"]),
    (ChannelType.TIME_STRING, [b"one", b"two", b""]),
]


def _message(data_type: ChannelType, values: list, *, nanoseconds: int = 123_456_789) -> bytes:
    metadata = DBR_TYPES[data_type]()
    metadata.status = 3
    metadata.severity = 1
    metadata.stamp = TimeStamp(secondsSinceEpoch=1_000_000_000, nanoSeconds=nanoseconds)
    command = EventAddResponse(values, data_type, len(values), 1, 42, metadata=metadata)
    return bytes(command.header) + b"".join(bytes(b) for b in command.buffers)


def _slow(message: bytes, data_type: ChannelType):
    _, command, _ = read_from_bytestream(bytearray(message), caproto.SERVER)
    return codec.reading_of(command, caproto.native_type(data_type))


def _fast(message: bytes) -> codec.p.Reading | None:
    command, size, data_type, count, _, _ = struct.unpack_from(">HHHHII", message)
    header = 16
    if size == 0xFFFF and count == 0:
        size, count = struct.unpack_from(">II", message, 16)
        header = 24
    return codec.time_reading(bytearray(message), header, size, data_type, count)


@pytest.mark.parametrize("data_type, values", CASES, ids=[f"{t.name}x{len(v)}" for t, v in CASES])
def test_a_monitor_update_read_from_the_bytes_is_what_caproto_parses(data_type, values):
    message = _message(data_type, values)
    fast, slow = _fast(message), _slow(message, data_type)
    assert fast is not None
    assert (fast.timestamp, fast.severity, fast.status) == (slow.timestamp, slow.severity, slow.status)
    assert type(fast.value) is type(slow.value)
    if isinstance(slow.value, np.ndarray):
        assert fast.value.dtype == slow.value.dtype
        assert fast.value.tolist() == slow.value.tolist()
        assert fast.value.flags.writeable and fast.value.flags.owndata
    else:
        assert fast.value == slow.value


def test_a_large_array_with_an_extended_header():
    values = np.arange(100_000, dtype=float)
    message = _message(ChannelType.TIME_DOUBLE, values)
    assert struct.unpack_from(">H", message, 2)[0] == 0xFFFF  # the extended header
    fast = _fast(message)
    assert fast is not None and fast.value.tolist() == values.tolist()


def test_timestamps_are_cut_to_the_microsecond_as_caproto_cuts_them():
    message = _message(ChannelType.TIME_DOUBLE, [1.0], nanoseconds=999_999_999)
    assert _fast(message).timestamp == _slow(message, ChannelType.TIME_DOUBLE).timestamp


def test_other_types_and_short_payloads_are_left_to_caproto():
    assert _fast(_message(ChannelType.DOUBLE, [1.0])) is None  # not a DBR_TIME form
    message = bytearray(_message(ChannelType.TIME_DOUBLE, [1.0, 2.0]))
    # A header that claims more elements than the payload holds.
    struct.pack_into(">H", message, 6, 50)
    assert _fast(bytes(message)) is None


# --- a read and a put on the wire by hand (circuit.py Rule 1), over a socket pair ----------------


def _connected_circuit(protocol: int = 13, native: ChannelType = ChannelType.DOUBLE, count: int = 1):
    """A ``Circuit`` whose caproto core holds one connected channel ``X:pv``, on one end of a
    socket pair (the other end plays the IOC): (circuit, caproto's channel, the IOC's end,
    the answers the backend was handed)."""
    from pvhub.actors.circuit import Circuit

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    handled: list = []
    circuit = Circuit(("127.0.0.1", 5064), ours, emit=handled.append, handle=lambda c, m: handled.append(m),
                      drop=lambda c, why: handled.append(why), watch=lambda fd, flags: None,
                      received=bytearray(1 << 16))
    core = circuit.core
    core.send(caproto.VersionRequest(priority=0, version=13), caproto.HostNameRequest("h"),
              caproto.ClientNameRequest("u"))
    for command in core.recv(bytes(caproto.VersionResponse(version=protocol)))[0]:
        core.process_command(command)
    channel = caproto.ClientChannel("X:pv", core)
    core.send(channel.create())
    answers = [caproto.AccessRightsResponse(cid=channel.cid, access_rights=3),
               caproto.CreateChanResponse(data_type=native, data_count=count, cid=channel.cid, sid=9)]
    for command in core.recv(b"".join(bytes(a) for a in answers))[0]:
        core.process_command(command)
    assert channel.states[caproto.CLIENT] is caproto.CONNECTED
    return circuit, channel, theirs, handled


@pytest.mark.parametrize("protocol, count", [(13, 1), (13, 5000), (11, 1), (11, 5000), (11, 100_000)])
def test_a_read_put_on_the_wire_by_hand_is_the_bytes_caproto_sends(protocol, count):
    circuit, channel, ioc, _ = _connected_circuit(protocol, count=count)
    assert circuit.send_read(channel, 77)
    expected = channel.read(data_type="time", ioid=77)
    assert ioc.recv(1 << 16) == bytes(expected.header) + b"".join(bytes(b) for b in expected.buffers)
    assert circuit.core._ioids[77] is channel  # caproto knows the ioid, as after its own send


WRITES = [
    (ChannelType.DOUBLE, 2.5), (ChannelType.DOUBLE, -1e300), (ChannelType.DOUBLE, 7),
    (ChannelType.FLOAT, 0.1), (ChannelType.FLOAT, -3),
    (ChannelType.LONG, -123456), (ChannelType.LONG, 2**31 - 1),
    (ChannelType.INT, -300), (ChannelType.ENUM, 3), (ChannelType.CHAR, 200),
]


@pytest.mark.parametrize("native, value", WRITES, ids=[f"{t.name}-{v}" for t, v in WRITES])
def test_a_put_of_one_number_made_by_hand_is_the_bytes_caproto_sends(native, value):
    circuit, channel, ioc, _ = _connected_circuit(native=native)
    data = codec.scalar_write(native, value, channel.sid, 31)
    assert data is not None
    assert circuit.send_bytes(channel, data, 31)
    # caproto takes a CHAR's one number only in a list (given the int, its write raises).
    expected = channel.write([value] if native == ChannelType.CHAR else value, data_count=1, notify=True, ioid=31)
    assert ioc.recv(1 << 16) == bytes(expected.header) + b"".join(bytes(b) for b in expected.buffers)
    assert circuit.core._ioids[31] is channel


@pytest.mark.parametrize("native, value", [
    (ChannelType.STRING, b"text"), (ChannelType.DOUBLE, np.arange(3.0)), (ChannelType.LONG, [1, 2]),
    (ChannelType.LONG, True), (ChannelType.INT, 40_000), (ChannelType.CHAR, -1), (ChannelType.LONG, 2.5),
    (ChannelType.FLOAT, 1e300), (ChannelType.DOUBLE, 10**400),
])
def test_other_puts_are_left_to_caproto(native, value):
    assert codec.scalar_write(native, value, 1, 2) is None


def _answer(command) -> bytes:
    return bytes(command.header) + b"".join(bytes(b) for b in command.buffers)


@pytest.mark.parametrize("data_type, values", CASES, ids=[f"{t.name}x{len(v)}" for t, v in CASES])
def test_a_reads_answer_read_from_the_bytes_is_what_caproto_parses(data_type, values):
    circuit, channel, ioc, handled = _connected_circuit(native=caproto.native_type(data_type), count=len(values))
    answers: list = []
    circuit.operations[5] = (None, answers.append, True)
    circuit.core._ioids[5] = channel
    metadata = DBR_TYPES[data_type]()
    metadata.status, metadata.severity = 3, 1
    metadata.stamp = TimeStamp(secondsSinceEpoch=1_000_000_000, nanoSeconds=123_456_789)
    message = _answer(caproto.ReadNotifyResponse(values, data_type, len(values), 1, 5, metadata=metadata))
    ioc.sendall(message)
    circuit.receive()
    (answer,) = answers
    assert type(answer) is codec.Answer and not handled  # caproto's parser was not asked
    slow = _slow(message, data_type)
    fast = codec.reading_of(answer, caproto.native_type(data_type))
    assert (fast.timestamp, fast.severity, fast.status) == (slow.timestamp, slow.severity, slow.status)
    assert np.asarray(fast.value).tolist() == np.asarray(slow.value).tolist()
    assert codec.read_problem(answer) is None
    assert not circuit.operations and 5 not in circuit.core._ioids


def test_a_puts_answer_is_read_from_the_bytes_and_a_failure_or_another_read_is_left_to_caproto():
    circuit, channel, ioc, handled = _connected_circuit()
    answers: list = []
    for ioid, from_bytes in ((1, True), (2, True), (3, False)):
        circuit.operations[ioid] = (None, answers.append, from_bytes)
        circuit.core._ioids[ioid] = channel
    ok = caproto.WriteNotifyResponse(data_type=ChannelType.DOUBLE, data_count=1, status=1, ioid=1)
    failed = caproto.WriteNotifyResponse(data_type=ChannelType.DOUBLE, data_count=1, status=caproto.CAStatus.ECA_PUTFAIL, ioid=2)
    metadata = DBR_TYPES[ChannelType.TIME_DOUBLE]()
    control = caproto.ReadNotifyResponse([1.0], ChannelType.TIME_DOUBLE, 1, 1, 3, metadata=metadata)  # not from_bytes
    ioc.sendall(_answer(ok) + _answer(failed) + _answer(control))
    circuit.receive()
    assert answers == [codec.PUT_ANSWER]  # the success, read from the bytes
    assert codec.put_error(codec.PUT_ANSWER) is None
    # The failure and the read sent by caproto went through its parser to the backend.
    assert [type(m).__name__ for m in handled] == ["WriteNotifyResponse", "ReadNotifyResponse"]
    assert codec.put_error(handled[0]) is not None
    assert set(circuit.core._ioids) == set()


# --- beacons (actors/search.py Rule 2), no sockets ------------------------------------------------

IOC = ("127.0.0.1", 5064)


def _beacons(watch: search.BeaconWatch, times: list[float], first: int = 0) -> list[bool]:
    return [watch.heard(IOC, first + n, at) for n, at in enumerate(times)]


def test_an_ioc_already_running_is_not_new_when_first_heard():
    # Started at 0; the IOC beacons every 15 s, first heard at 3 s: the second beacon's 15 s
    # are more than we had listened before the first, so we could not have heard it before.
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [3.0, 18.0, 33.0, 48.0], first=500) == [False] * 4


def test_an_ioc_that_starts_while_we_listen_is_new_at_its_second_beacon():
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [20.0, 20.02, 20.06]) == [False, True, False]


def test_an_ioc_that_restarts_is_new_and_its_beacon_numbers_start_again():
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [3.0, 18.0, 33.0, 48.0], first=500) == [False] * 4
    # Restarted at 50: its beacons start again from number 0, and far sooner than every 15 s.
    assert watch.heard(IOC, 0, 50.0) is True


def test_an_ioc_whose_beacons_stop_and_come_back_is_new():
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [3.0, 18.0, 33.0], first=7) == [False] * 3
    assert watch.heard(IOC, 10, 33.0 + 15 * 4) is True  # numbers 8 and 9 lost with the network


def test_duplicates_and_near_copies_are_not_counted():
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [3.0, 18.0], first=7) == [False, False]
    assert watch.heard(IOC, 8, 18.01) is False  # the same number again
    assert watch.heard(IOC, 10, 18.02) is False  # two past: a duplicate route
    assert watch.heard(IOC, 11, 33.0) is False  # and the usual interval goes on


def test_a_starting_iocs_ramp_of_beacons_makes_it_new_once():
    # caproto's and rsrv's first beacons come 20 ms apart, then twice as far each time, up to
    # 15 s; the average lags the doubling, and each step would pass the 3.25x test.
    watch = search.BeaconWatch(started=0.0)
    at, gap, times = 100.0, 0.02, []
    for _ in range(16):  # ten steps of the ramp, then six beacons 15 s apart
        times.append(at)
        at, gap = at + gap, min(gap * 2, 15.0)
    assert _beacons(watch, times).count(True) == 1
    # Long after, a restart is news again (its number 0 reads as a late copy; its 1 is news).
    later = times[-1] + search.NEW_HOLDOFF_S + 15.0
    assert [watch.heard(IOC, 0, later), watch.heard(IOC, 1, later + 0.02)] == [False, True]


def test_a_restart_after_few_beacons_is_new_too():
    watch = search.BeaconWatch(started=0.0)
    assert _beacons(watch, [3.0, 18.0, 33.0], first=100) == [False] * 3
    # Numbers start again at 0, within 256 of the last: 0 looks like a late copy, 1 is news.
    assert _beacons(watch, [40.0, 40.02]) == [False, True]


def test_a_server_that_numbers_no_beacons_is_still_told_new_by_their_rhythm():
    # Before CA 4.10 every beacon says 0: numbers tell nothing, and must not hide a restart.
    watch = search.BeaconWatch(started=0.0)
    assert [watch.heard(IOC, 0, at, numbered=False) for at in (3.0, 18.0, 33.0)] == [False] * 3
    assert watch.heard(IOC, 0, 35.0, numbered=False) is True


def test_the_servers_remembered_have_a_bound(monkeypatch):
    monkeypatch.setattr(search, "MAX_BEACON_SERVERS", 3)
    watch = search.BeaconWatch(started=0.0)
    for port in range(10):
        watch.heard(("127.0.0.1", port), 0, 1.0)
    assert len(watch) == 3


@pytest.fixture
def driver(zoo_ioc, monkeypatch) -> Iterator[Driver]:
    """A backend on its own (``Driver``) that reaches the zoo IOC and nothing else."""
    for key, value in zoo_ioc.ca_env().items():
        monkeypatch.setenv(key, value)
    made = Driver()
    yield made
    made.close()


def test_the_backend_on_its_own_reads_puts_and_follows_a_pv(driver, prefix):
    pv = f"{prefix}motor"
    driver.backend.add(pv)
    connected = driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent), 15)
    assert connected.connected
    metadata = driver.wait_for(lambda e: isinstance(e, ca.MetadataEvent), 10)
    assert metadata.metadata["native_type"] == "float"
    driver.backend.put(pv, 1, 2.5)
    done = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent), 10)
    assert done.error is None and done.readback.value == 2.5
    driver.backend.read(pv, 7)
    read = driver.wait_for(lambda e: isinstance(e, ca.ReadDoneEvent), 10)
    assert read.read_id == 7 and read.reading.value == 2.5
    driver.backend.put(pv, 2, 4.0)
    update = driver.wait_for(lambda e: isinstance(e, ca.ReadingEvent) and e.reading.value == 4.0, 10)
    assert update.pv == pv


def test_a_name_nobody_serves_is_searched_with_growing_intervals(driver, prefix):
    driver.backend.add(f"{prefix}no_such_pv")
    with pytest.raises(TimeoutError):
        driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent), 0.5)
    (channel,) = driver.backend._channels.values()
    # Searched at once, then after 30 ms, 60, 120, 240 (caproto's defaults): doubled since.
    assert channel.interval > search.MIN_RETRY * 4
    assert len(driver.backend._search._due) <= 2  # one live entry per name (plus at most a stale one)


def test_a_request_the_state_machine_refuses_is_answered_not_left_waiting(driver, prefix, monkeypatch):
    pv = f"{prefix}motor"
    driver.backend.add(pv)
    driver.wait_for(lambda e: isinstance(e, ca.MetadataEvent), 15)
    (circuit,) = driver.backend._circuits.values()

    def refuse(*commands):
        raise caproto.LocalProtocolError("refused for the test")

    monkeypatch.setattr(circuit.core, "send", refuse)
    driver.backend.put(pv, 1, [2.0])  # a list: caproto builds it and sends it
    done = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent), 5)
    assert done.error is not None and "could not be sent" in done.error
    # A put of one number and a read are put on the wire without caproto's send (circuit.py
    # Rule 1), and refused where its state machine would: a channel it holds not connected.
    (channel,) = circuit.by_cid.values()
    monkeypatch.setitem(channel.ca.states.states, caproto.CLIENT, caproto.MUST_CLOSE)
    driver.backend.put(pv, 2, 3.0)
    done = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent), 5)
    assert done.put_id == 2 and done.error is not None and "could not be sent" in done.error
    driver.backend.read(pv, 2)
    read = driver.wait_for(lambda e: isinstance(e, ca.ReadDoneEvent), 5)
    assert read.reading is None
    assert not circuit.operations  # nothing left waiting for an answer
    assert not circuit.core._ioids


def test_a_channel_removed_and_added_again_leaves_nothing_behind_on_its_circuit(driver, prefix):
    # caproto's circuit keeps each subscription (16-bit ids) until it hears it cancelled; a
    # channel cleared or dropped by the IOC never is, so the backend forgets it there too.
    pv = f"{prefix}motor"
    for _ in range(5):
        driver.backend.add(pv)
        driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent) and e.connected, 15)
        driver.backend.read(pv, 1)  # in flight when the channel goes
        driver.backend.remove(pv)
    driver.backend.add(pv)
    driver.wait_for(lambda e: isinstance(e, ca.MetadataEvent), 15)
    (circuit,) = driver.backend._circuits.values()  # the same circuit all along
    assert len(circuit.core.event_add_commands) == 1
    assert len(circuit.by_subscription) == 1
    assert len(circuit.core._ioids) <= 1  # at most the new channel's metadata read


# caproto's repeater on loopback only, dying with the test (run from the repository root).
REPEATER = """
from tests.iocs.rsrv import die_with_parent
die_with_parent()
from caproto.sync.repeater import run
print("repeater starting", flush=True)
run(host="127.0.0.1")
"""
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_an_ioc_that_comes_back_is_found_by_its_beacons_not_the_next_search(prefix, monkeypatch):
    port = free_udp_port()
    beacons = {"EPICS_CA_REPEATER_PORT": str(port), "EPICS_CAS_BEACON_PORT": str(port)}
    repeater = subprocess.Popen([sys.executable, "-c", REPEATER], env={**os.environ, **beacons},
                                stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    ioc = SimulatedIOC("tests.iocs.zoo", prefix=prefix, ready_pv="dt", env=beacons, cwd=REPO_ROOT)
    driver = None
    try:
        assert repeater.stdout.readline().startswith("repeater starting")
        ioc.start()
        for key, value in {**ioc.ca_env(), **beacons}.items():
            monkeypatch.setenv(key, value)
        pv = f"{prefix}motor"
        driver = Driver()
        driver.backend.add(pv)
        driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent) and e.connected, 15)
        assert driver.backend._search.registered, "the repeater did not confirm the registration"
        ioc.stop()
        driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent) and not e.connected, 15)
        channel = driver.backend._channels[pv]

        def next_search() -> float:
            return min(due for due, search_id in driver.backend._search._due if search_id == channel.search_id)

        # Until searches are MAX_RETRY apart, and one has just gone: the next is seconds away.
        deadline = time.monotonic() + 30
        slowest = search.MAX_RETRY
        while not (channel.interval >= slowest and next_search() - time.monotonic() > slowest - 0.5):
            assert time.monotonic() < deadline, "searches never slowed down"
            with pytest.raises(TimeoutError):
                driver.wait_for(lambda e: False, 0.05)
        waiting = next_search() - time.monotonic()
        started = time.monotonic()
        ioc.start()  # same ports; its first beacons go out as it starts
        driver.wait_for(lambda e: isinstance(e, ca.ConnectionEvent) and e.connected, 15)
        took = time.monotonic() - started
        assert took < waiting - 1.0, f"found after {took:.2f} s; the next search was {waiting:.2f} s away"
    finally:
        if driver is not None:
            driver.close()
        ioc.stop()
        repeater.kill()
        repeater.wait(5)


# --- answers that hold no reading ----------------------------------------------------------------


def test_read_problem_tells_a_value_from_a_refusal():
    good = caproto.ReadNotifyResponse(data=[1.5], data_type=ChannelType.TIME_DOUBLE, data_count=1,
                                      status=1, ioid=3)  # fmt: skip
    assert codec.read_problem(good) is None
    # rsrv, without read access: ECA_NORDACCESS (368 with its severity bits) and zeros.
    denied = caproto.ReadNotifyResponse(data=[0.0], data_type=ChannelType.TIME_DOUBLE, data_count=1,
                                        status=368, ioid=3)  # fmt: skip
    assert "ECA_NORDACCESS" in codec.read_problem(denied)
    event = EventAddResponse(data=[0.0], data_type=ChannelType.TIME_DOUBLE, data_count=1,
                             status=368, subscriptionid=1)  # fmt: skip
    assert "Read access denied" in codec.read_problem(event)
    assert "not sent" in codec.read_problem(None)


def test_a_full_socket_leaves_each_name_one_search(monkeypatch):
    # Searches the socket refused (full) go again in 10 ms; the entries they had for later
    # are stale then. Kept live as well, each full socket would add a search per name for
    # good, and the traffic, growing, would fill the socket more often.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nobody:
        nobody.bind(("127.0.0.1", 0))
        monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
        monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1:%d" % nobody.getsockname()[1])
        monkeypatch.setenv("EPICS_CA_REPEATER_PORT", str(nobody.getsockname()[1]))
        names = search.NameSearch(lambda channel, address: None, lambda fd, flags: None)
    sent: list[bytes] = []
    full = False

    def send(datagram: bytes) -> bool:
        if not full:
            sent.append(datagram)
        return not full

    monkeypatch.setattr(names, "_send_datagram", send)
    channels = [ca.Channel(f"no:such:pv{i}") for i in range(2000)]
    for channel in channels:
        names.start(channel, 0.0)
    now = time.monotonic()
    for episode in range(20):  # the socket full for 0.2 s, then free for 1 s, twenty times
        full = True
        for step in range(20):
            now += 0.01
            names.tick(now)
        full = False
        for step in range(100):
            now += 0.01
            names.tick(now)
    assert len(names._due) <= len(channels)  # one entry per name: none stale, none twice
    sent.clear()
    for step in range(1000):  # 10 s with the socket free: intervals grow, nothing doubles
        now += 0.01
        names.tick(now)
    per_name = collections.Counter(
        command.cid for datagram in sent
        for command in caproto._commands.read_datagram(datagram, ("127.0.0.1", 0), caproto.CLIENT)
        if isinstance(command, caproto.SearchRequest)
    )  # fmt: skip
    assert set(per_name) == {channel.search_id for channel in channels}
    assert max(per_name.values()) <= 4, per_name.most_common(3)  # 10 s at up to 5 s apart
    names.close()


@pytest.mark.parametrize("protocol", [11, 13])
def test_a_short_array_put_says_its_own_length_to_old_and_new_servers(protocol):
    # Told the PV's 16 elements with 3 sent, an IOC before CA 4.13 (EPICS base before
    # 3.14.12) stores 3 values and 13 of whatever follows in its buffer.
    circuit = caproto.VirtualCircuit(caproto.CLIENT, ("127.0.0.1", 5064), 0)
    circuit.protocol_version = protocol
    channel = caproto.ClientChannel("X:wave", circuit)
    channel.native_data_type, channel.native_data_count, channel.sid = ChannelType.DOUBLE, 16, 1
    value = np.arange(3.0)
    write = channel.write(value, data_count=codec.put_count(value), notify=True, ioid=1)
    assert write.header.data_count == 3 and write.header.payload_size == 24
    scalar = channel.write(2.5, data_count=codec.put_count(2.5), notify=True, ioid=2)
    assert scalar.header.data_count == 1


def test_a_circuit_full_of_unanswered_requests_fails_the_next_at_once(driver, prefix, monkeypatch):
    # A record whose puts never complete must not take every id of the circuit (caproto's
    # are 16 bits, and it searches for a free one without end): backend.py Rule 5.
    monkeypatch.setattr(ca, "MAX_IN_FLIGHT", 2)
    pv, slow = f"{prefix}motor", f"{prefix}slow"
    for name in (pv, slow):
        driver.backend.add(name)
    for name in (pv, slow):
        driver.wait_for(lambda e, name=name: isinstance(e, ca.MetadataEvent) and e.pv == name, 15)
    driver.backend.put(slow, 1, 1.0)  # completes after the zoo's slow_delay (2 s): 2 in flight
    driver.backend.put(pv, 2, 3.0)
    refused = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent) and e.put_id == 2, 5)
    assert refused.error is not None and "wait for its answers" in refused.error
    driver.backend.read(pv, 3)
    read = driver.wait_for(lambda e: isinstance(e, ca.ReadDoneEvent) and e.read_id == 3, 5)
    assert read.reading is None
    done = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent) and e.put_id == 1, 10)
    assert done.error is None
    driver.backend.read(pv, 4)  # room again
    read = driver.wait_for(lambda e: isinstance(e, ca.ReadDoneEvent) and e.read_id == 4, 5)
    assert read.reading is not None


# --- the read behind a put (backend.py Rule 4) --------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("server", ["caproto", "rsrv"])
def test_the_read_behind_a_put_is_sent_while_it_can_be_the_read_back(server, prefix, monkeypatch):
    # caproto's server answers a circuit's requests in order: the read behind a put is its
    # read-back, every time. EPICS base's answers the read before the put's completion, so
    # there it is wasted, and the channel stops sending it; its puts still end read back.
    module, ready = {"caproto": ("tests.iocs.zoo", "dt"), "rsrv": ("tests.iocs.rsrv", "motor")}[server]
    monkeypatch.setattr(ca, "PIPELINE_RETRY", 3)
    with SimulatedIOC(module, prefix=prefix, ready_pv=ready, cwd=REPO_ROOT) as ioc:
        for key, value in ioc.ca_env().items():
            monkeypatch.setenv(key, value)
        driver = Driver()
        try:
            pv = f"{prefix}motor"
            driver.backend.add(pv)
            driver.wait_for(lambda e: isinstance(e, ca.MetadataEvent), 15)
            channel = driver.backend._channels[pv]
            unpiped = 0  # puts sent without the read
            for put_id in range(1, 201):  # rsrv's answers race in two of its threads: not a fixed count
                value = float(put_id % 9) + 0.25  # inside the rsrv motor's drive limits
                driver.backend.put(pv, put_id, value)
                unpiped += channel.unpiped > 0
                done = driver.wait_for(lambda e: isinstance(e, ca.PutDoneEvent) and e.put_id == put_id, 10)
                assert done.error is None and done.readback is not None and done.readback.value == value
                if server == "caproto" and put_id == 40 or server == "rsrv" and unpiped >= 2 * ca.PIPELINE_RETRY:
                    break
            if server == "caproto":
                assert channel.reads_early == 0 and unpiped == 0
            else:
                assert channel.reads_early >= ca.PIPELINE_EARLY and unpiped == 2 * ca.PIPELINE_RETRY
        finally:
            driver.close()
