"""The state machine of one PV's owner (``pvhub.actors.state``): what it publishes, replies and
puts for each Channel Access event and request. No sockets, no IOC: events are method calls.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pvhub import protocol as p
from pvhub.actors.coercion import MAX_STRING_BYTES, coerce_value
from pvhub.actors.state import Publish, PvState, Reply, StartDescribe, StartPut, StartRead, StartReadBack
from pvhub.errors import ActorDiedError, BadValueError

PV = "TEST:pv"
EPOCH = 42
CLIENT = b"client-1"
OTHER_CLIENT = b"client-2"

FLOAT_METADATA: p.PVMetadata = {
    "native_type": "float",
    "count": 1,
    "units": "mm",
    "precision": 3,
    "read_access": True,
    "write_access": True,
}


def reading(value=1.0, timestamp=100.0, severity=0, status=0) -> p.Reading:
    return p.Reading(value=value, timestamp=timestamp, severity=severity, status=status)


def connected_state(metadata: p.PVMetadata | None = None, value=1.0) -> PvState:
    """A state that has published its first connected update (seq 1)."""
    state = PvState(PV, EPOCH)
    state.connection_changed(True)
    state.metadata_received(dict(metadata or FLOAT_METADATA))
    state.reading_received(reading(value))
    assert state.connected and state.seq == 1
    return state


def updates(effects) -> list[p.Update]:
    return [e.update for e in effects if isinstance(e, Publish)]


def replies(effects) -> list[Reply]:
    return [e for e in effects if isinstance(e, Reply)]


def start_put(state: PvState, value=2.5, request_id=7, client=CLIENT) -> int:
    """Start a put that is accepted; return its put id."""
    effects = state.handle(client, p.SetRequest(id=request_id, pv=PV, value=value))
    (start,) = [e for e in effects if isinstance(e, StartPut)]
    return start.put_id


# --- connection, seq and publishing (Rules 2 and 3) ----------------------------------------


def test_new_state_is_disconnected_at_seq_zero():
    state = PvState(PV, EPOCH)
    assert state.seq == 0
    assert not state.connected
    assert state.reading is None and state.metadata is None
    assert state.pending_puts == 0


EVENTS = {
    "connection": lambda s: s.connection_changed(True),
    "metadata": lambda s: s.metadata_received(dict(FLOAT_METADATA)),
    "reading": lambda s: s.reading_received(reading(3.0)),
}


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS)), ids="-".join)
def test_connected_is_published_only_after_connection_metadata_and_reading(order):
    state = PvState(PV, EPOCH)
    first, second, last = (EVENTS[name](state) for name in order)
    assert first == [] and second == []
    (update,) = updates(last)
    assert update.connected is True
    assert update.seq == 1 == state.seq
    assert update.pv == PV and update.epoch == EPOCH
    assert update.reading == reading(3.0)
    assert update.metadata == FLOAT_METADATA  # a client that sees connected can describe
    assert update.snapshot is False


def test_seq_grows_by_exactly_one_per_published_change():
    state = connected_state()
    seqs = []
    for value in (2.0, 3.0, 4.0):
        (update,) = updates(state.reading_received(reading(value, timestamp=100.0 + value)))
        seqs.append(update.seq)
    assert seqs == [2, 3, 4]
    assert state.seq == 4


def test_a_reading_change_publishes_the_reading_without_metadata():
    state = connected_state()
    (update,) = updates(state.reading_received(reading(9.0, timestamp=200.0)))
    assert update.reading == reading(9.0, timestamp=200.0)
    assert update.connected is True
    assert update.metadata is None


def test_a_metadata_change_while_connected_publishes_the_new_metadata():
    state = connected_state()
    (update,) = updates(state.metadata_received({"units": "um"}))
    assert update.seq == 2
    assert update.metadata["units"] == "um"
    assert update.metadata["native_type"] == "float"  # merged, not replaced


def test_the_same_metadata_again_publishes_nothing():
    state = connected_state()
    assert state.metadata_received(dict(FLOAT_METADATA)) == []
    assert state.seq == 1


def test_disconnect_publishes_connected_false_and_clears_metadata():
    state = connected_state()
    (update,) = updates(state.connection_changed(False))
    assert update.connected is False
    assert update.seq == 2 == state.seq
    assert update.metadata is None
    assert state.metadata is None
    assert not state.connected


def test_disconnect_before_ever_connecting_publishes_nothing():
    state = PvState(PV, EPOCH)
    assert state.connection_changed(False) == []
    assert state.seq == 0


def test_readings_while_disconnected_are_kept_but_not_published():
    state = connected_state()
    state.connection_changed(False)
    assert state.reading_received(reading(5.0, timestamp=300.0)) == []
    assert state.reading == reading(5.0, timestamp=300.0)
    assert state.seq == 2


def test_reconnection_publishes_connected_again_once_metadata_and_a_fresh_reading_return():
    state = connected_state()
    state.connection_changed(False)
    assert state.connection_changed(True) == []  # metadata not read again yet
    assert state.metadata_received(dict(FLOAT_METADATA)) == []  # nor a fresh value
    (update,) = updates(state.reading_received(p.Reading(9.0, 99.0)))
    assert update.connected is True
    assert update.seq == 3
    assert update.metadata == FLOAT_METADATA
    assert update.reading.value == 9.0


def test_access_rights_alone_do_not_make_a_reconnected_pv_connected():
    # On (re)connection the IOC sends ACCESS_RIGHTS before CREATE_CHAN, so the backend emits
    # an AccessEvent before the ConnectionEvent and long before the control read returns.
    state = connected_state()
    state.connection_changed(False)
    state.access_changed(True, True)
    effects = state.connection_changed(True)
    assert not state.connected
    assert updates(effects) == []


def test_access_rights_and_a_reading_do_not_make_a_new_pv_connected():
    state = PvState(PV, EPOCH)
    state.access_changed(True, True)
    state.connection_changed(True)
    effects = state.reading_received(reading(1.0))
    assert updates(effects) == []
    assert not state.connected


@pytest.mark.parametrize(
    "value",
    [1.5, "text", np.arange(5.0), np.array([1, 2, 3], dtype=np.int32)],
    ids=["float", "string", "float-array", "int-array"],
)
def test_a_duplicate_reading_publishes_nothing(value):
    state = connected_state(value=value)
    duplicate = value.copy() if isinstance(value, np.ndarray) else value
    # From the monitor, a repeat is a property event: the metadata is read again (Rule 7).
    assert state.reading_received(reading(duplicate)) == [StartDescribe(PV)]
    assert state.reading_received(reading(duplicate), read=True) == []
    assert state.seq == 1


@pytest.mark.parametrize(
    "changed",
    [
        reading(value=2.0),
        reading(timestamp=101.0),
        reading(severity=2),
        reading(status=7),
    ],
    ids=["value", "timestamp", "severity", "status"],
)
def test_a_reading_that_differs_in_any_field_is_published(changed):
    state = connected_state(value=1.0)
    (update,) = updates(state.reading_received(changed))
    assert update.reading == changed
    assert state.seq == 2


def test_an_array_reading_with_one_element_changed_is_published():
    state = connected_state(value=np.zeros(4))
    changed = np.zeros(4)
    changed[2] = 1.0
    (update,) = updates(state.reading_received(reading(changed)))
    assert np.array_equal(update.reading.value, changed)


# --- read and describe ---------------------------------------------------------------------


def test_read_replies_a_snapshot_with_the_current_seq():
    state = connected_state()
    state.reading_received(reading(2.0, timestamp=101.0))
    effects = state.handle(CLIENT, p.ReadRequest(id=5, pv=PV))
    assert effects == [
        Reply(
            CLIENT,
            p.Snapshot(
                id=5,
                pv=PV,
                epoch=EPOCH,
                seq=2,
                connected=True,
                reading=reading(2.0, timestamp=101.0),
                metadata=FLOAT_METADATA,
            ),
        )
    ]
    assert state.seq == 2


def test_read_with_publish_also_publishes_a_snapshot_update_with_the_same_seq():
    state = connected_state()
    effects = state.handle(CLIENT, p.ReadRequest(id=5, pv=PV, publish=True))
    (reply,) = replies(effects)
    (update,) = updates(effects)
    assert update.snapshot is True
    assert update.seq == reply.message.seq == 1
    assert update.metadata == FLOAT_METADATA
    assert update.reading == reply.message.reading
    assert state.seq == 1  # a snapshot is not a change


def test_read_of_a_disconnected_pv_replies_a_disconnected_snapshot():
    state = PvState(PV, EPOCH)
    (reply,) = state.handle(CLIENT, p.ReadRequest(id=1, pv=PV))
    assert isinstance(reply.message, p.Snapshot)
    assert reply.message.connected is False
    assert reply.message.reading is None and reply.message.seq == 0


def test_describe_replies_the_metadata():
    state = connected_state()
    effects = state.handle(CLIENT, p.DescribeRequest(id=3, pv=PV))
    assert effects == [
        Reply(CLIENT, p.DescribeReply(id=3, pv=PV, connected=True, metadata=FLOAT_METADATA))
    ]


def test_describe_of_a_disconnected_pv_says_so():
    (reply,) = PvState(PV, EPOCH).handle(CLIENT, p.DescribeRequest(id=3, pv=PV))
    assert reply.message == p.DescribeReply(id=3, pv=PV, connected=False, metadata=None)


def test_a_request_an_actor_does_not_handle_is_refused():
    (reply,) = connected_state().handle(CLIENT, p.PingRequest(id=9))
    assert isinstance(reply.message, p.ErrorReply)
    assert reply.message.code == "unknown_operation"
    assert reply.message.id == 9


# --- set (Rule 4) --------------------------------------------------------------------------


def assert_refused(effects, code: str, request_id: int = 7):
    assert not any(isinstance(e, StartPut) for e in effects)
    (reply,) = effects
    assert reply.client == CLIENT
    assert isinstance(reply.message, p.ErrorReply)
    assert reply.message.code == code
    assert reply.message.id == request_id
    assert reply.message.pv == PV


def test_set_on_a_disconnected_pv_is_refused_at_once():
    state = PvState(PV, EPOCH)
    assert_refused(state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=1.0)), "disconnected")
    assert state.pending_puts == 0


def test_set_on_a_pv_that_lost_its_connection_is_refused():
    state = connected_state()
    state.connection_changed(False)
    assert_refused(state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=1.0)), "disconnected")


@pytest.mark.parametrize("access", [{"write_access": False}, {}], ids=["denied", "unknown"])
def test_set_without_write_access_is_refused(access):
    metadata = {k: v for k, v in FLOAT_METADATA.items() if k != "write_access"} | access
    state = connected_state(metadata)
    assert_refused(state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=1.0)), "read_only")


def test_losing_write_access_refuses_later_sets():
    state = connected_state()
    state.access_changed(True, False)
    assert_refused(state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=1.0)), "read_only")


@pytest.mark.parametrize("value", ["abc", None, [1.0, 2.0], {"x": 1}])
def test_set_with_a_value_the_pv_cannot_take_is_refused(value):
    state = connected_state()
    assert_refused(state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=value)), "bad_value")
    assert state.pending_puts == 0


def test_an_accepted_set_starts_a_put_then_replies_accepted():
    state = connected_state()
    effects = state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value="2.5"))
    assert effects == [
        StartPut(PV, 1, 2.5),  # coerced to the PV's native type
        Reply(CLIENT, p.SetAccepted(id=7, pv=PV)),
    ]
    assert state.pending_puts == 1
    assert state.seq == 1  # accepting a put is not a change of the PV


def test_a_set_that_asks_for_no_acceptance_starts_its_put_and_is_answered_only_at_its_end():
    state = connected_state()
    effects = state.handle(CLIENT, p.SetRequest(id=7, pv=PV, value=2.5, accepted=False))
    assert effects == [StartPut(PV, 1, 2.5)]
    state.reading_received(reading(2.5, timestamp=150.0))
    assert state.put_completed(1) == [
        Reply(CLIENT, p.SetDone(id=7, pv=PV, epoch=EPOCH, seq=2, reading=reading(2.5, timestamp=150.0)))
    ]
    # A refusal is the end as well: it is answered whatever was asked.
    assert_refused(state.handle(CLIENT, p.SetRequest(id=8, pv=PV, value="x", accepted=False)), "bad_value", request_id=8)


def test_each_put_gets_its_own_id():
    state = connected_state()
    ids = [start_put(state, request_id=n) for n in range(3)]
    assert len(set(ids)) == 3
    assert state.pending_puts == 3


def test_a_completed_put_replies_done_with_the_current_seq_and_reading():
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    state.reading_received(reading(2.5, timestamp=150.0))  # the read-back
    effects = state.put_completed(put_id)
    assert effects == [
        Reply(
            CLIENT,
            p.SetDone(id=7, pv=PV, epoch=EPOCH, seq=2, reading=reading(2.5, timestamp=150.0)),
        )
    ]
    assert state.pending_puts == 0


def test_a_failed_put_replies_put_failed_with_the_iocs_reason():
    state = connected_state()
    put_id = start_put(state, request_id=7)
    (reply,) = state.put_completed(put_id, error="IOC refused the put: no")
    assert reply.client == CLIENT
    assert reply.message.code == "put_failed"
    assert reply.message.id == 7 and reply.message.pv == PV
    assert "IOC refused the put: no" in reply.message.message
    assert state.pending_puts == 0


def test_a_put_completes_only_once():
    state = connected_state()
    put_id = start_put(state)
    assert len(state.put_completed(put_id)) == 1
    assert state.put_completed(put_id) == []
    assert state.put_completed(put_id, error="late") == []


def test_completion_of_an_unknown_put_does_nothing():
    state = connected_state()
    start_put(state)
    assert state.put_completed(999) == []
    assert state.pending_puts == 1


def test_fail_all_puts_answers_every_pending_put():
    state = connected_state()
    first = start_put(state, request_id=1, client=CLIENT)
    start_put(state, request_id=2, client=OTHER_CLIENT)
    effects = state.fail_all_puts(ActorDiedError("stopping"))
    answered = sorted((r.client, r.message.id, r.message.code) for r in replies(effects))
    assert answered == [(CLIENT, 1, "actor_died"), (OTHER_CLIENT, 2, "actor_died")]
    assert state.pending_puts == 0
    assert state.put_completed(first) == []  # answered once, never twice
    assert state.fail_all_puts(ActorDiedError("again")) == []


# --- coerce_value ---------------------------------------------------------------------------


def md(native: str, count: int = 1, **extra) -> p.PVMetadata:
    return {"native_type": native, "count": count, **extra}


ENUM = md("enum", enum_strs=["Off", "On", "Auto"])


@pytest.mark.parametrize(
    "value, metadata, expected",
    [
        (3, md("float"), 3.0),
        ("2.5", md("float"), 2.5),
        (" -1e3 ", md("float"), -1000.0),
        (True, md("float"), 1.0),
        (np.float32(1.5), md("float"), 1.5),
        (np.int64(2), md("float"), 2.0),
        ([4.0], md("float"), 4.0),
        (np.array([5.0]), md("float"), 5.0),
        (b"6.5", md("float"), 6.5),
        (3, md("int"), 3),
        ("7", md("int"), 7),
        ("7.0", md("int"), 7),
        (2.0, md("int"), 2),
        (False, md("int"), 0),
        (np.int32(5), md("int"), 5),
        (np.float64(8.0), md("int"), 8),
        (2**31 - 1, md("int"), 2**31 - 1),
        (-(2**31), md("int"), -(2**31)),
    ],
)
def test_numbers_are_coerced_to_the_native_scalar_type(value, metadata, expected):
    result = coerce_value(value, metadata)
    assert result == expected
    assert type(result) is type(expected)  # plain Python numbers, never numpy scalars


def test_float_is_the_default_native_type():
    assert coerce_value("1.25", {}) == 1.25


@pytest.mark.parametrize(
    "value, metadata",
    [
        ("abc", md("float")),
        ("", md("float")),
        (None, md("float")),
        ([1.0, 2.0], md("float")),
        ({"a": 1}, md("float")),
        (1 + 2j, md("float")),
        (float("nan"), md("int")),
        (float("inf"), md("int")),
        (2**31, md("int")),
        (-(2**31) - 1, md("int")),
        (np.int64(2**40), md("int")),
        ("12abc", md("int")),
    ],
)
def test_numbers_the_pv_cannot_take_are_refused(value, metadata):
    with pytest.raises(BadValueError):
        coerce_value(value, metadata)


SHORT = md("int", native_bits=16)
FLOAT32 = md("float", native_bits=32)


@pytest.mark.parametrize(
    "value, metadata",
    [
        (32768, SHORT),  # CA's SHORT would wrap it to -32768
        (-32769, SHORT),
        (70000, md("int", 3, native_bits=16)),
        (np.array([1, 2, 40000]), md("int", 3, native_bits=16)),
        ([1, -40000], md("int", 3, native_bits=16)),
        (1e39, FLOAT32),  # float32 would make it infinite
        (-3.5e38, FLOAT32),
        (np.array([0.0, 1e39]), md("float", 2, native_bits=32)),
        ([1.0, "1e39"], md("float", 2, native_bits=32)),
    ],
)
def test_numbers_beyond_the_native_width_are_refused(value, metadata):
    with pytest.raises(BadValueError):
        coerce_value(value, metadata)


@pytest.mark.parametrize(
    "value, metadata, expected",
    [
        (32767, SHORT, 32767),
        (-32768, SHORT, -32768),
        (3.4e38, FLOAT32, 3.4e38),
        (float("inf"), FLOAT32, float("inf")),  # an infinity is a value a float32 holds
        (1e39, md("float", native_bits=64), 1e39),
        (2**31 - 1, md("int", native_bits=32), 2**31 - 1),
    ],
)
def test_numbers_within_the_native_width_are_taken(value, metadata, expected):
    assert coerce_value(value, metadata) == expected


def test_an_int_too_large_for_a_float_is_a_bad_value():
    with pytest.raises(BadValueError):
        coerce_value(10**400, md("float"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Off", 0),
        ("Auto", 2),
        (1, 1),
        ("1", 1),
        (b"On", 1),
        (np.int64(2), 2),
        (1.0, 1),
        (np.str_("On"), 1),
    ],
)
def test_enums_take_a_label_or_an_index(value, expected):
    result = coerce_value(value, ENUM)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    "value",
    ["Bogus", "off", 3, -1, "3", 1.5, True, np.bool_(False), None, [1]],
)
def test_enum_values_that_name_no_state_are_refused(value):
    with pytest.raises(BadValueError):
        coerce_value(value, ENUM)


def test_an_enum_of_one_label_has_two_states():
    # A bo whose ONAM is empty: EPICS reports ["Off"], and state 1 is still the record's.
    one = md("enum", enum_strs=["Off"])
    assert coerce_value(1, one) == 1 and coerce_value("Off", one) == 0
    with pytest.raises(BadValueError):
        coerce_value(2, one)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("abc", "abc"),
        ("", ""),
        ("x" * MAX_STRING_BYTES, "x" * MAX_STRING_BYTES),
        (b"bytes", "bytes"),
        (5, "5"),
        (1.5, "1.5"),
        (np.str_("np"), "np"),
    ],
)
def test_strings_are_accepted_up_to_39_bytes(value, expected):
    assert coerce_value(value, md("string")) == expected


@pytest.mark.parametrize(
    "value",
    ["x" * 40, "é" * 20, True, None, [1, 2], 1 + 1j],
    ids=["40-ascii", "40-utf8-bytes", "bool", "none", "list", "complex"],
)
def test_strings_too_long_or_not_text_are_refused(value):
    assert MAX_STRING_BYTES == 39
    with pytest.raises(BadValueError):
        coerce_value(value, md("string"))


def test_a_char_array_takes_text_as_bytes_ended_by_a_nul_where_it_fits():
    result = coerce_value("hello", md("char", count=10))
    assert result.dtype == np.uint8
    assert bytes(result) == b"hello\0"  # as pyepics and caput -S write it
    assert bytes(coerce_value(b"hi", md("char", count=2))) == b"hi"
    assert bytes(coerce_value("µm", md("char", count=10))) == "µm".encode() + b"\0"


def test_a_char_array_refuses_text_longer_than_its_count():
    with pytest.raises(BadValueError):
        coerce_value("x" * 11, md("char", count=10))


@pytest.mark.parametrize("value, count", [(300, 1), (-1, 1), ([1, 256], 4)])
def test_a_char_pv_refuses_numbers_outside_a_byte(value, count):
    with pytest.raises(BadValueError):
        coerce_value(value, md("char", count=count))


@pytest.mark.parametrize(
    "value, metadata, expected",
    [
        ([1, "2", 3.5], md("float", 3), np.array([1.0, 2.0, 3.5])),
        ([1.0, 2.0], md("float", 5), np.array([1.0, 2.0])),  # fewer elements is fine
        (7, md("float", 3), np.array([7.0])),  # a scalar is a one-element array
        (np.arange(3, dtype=np.int16), md("float", 3), np.array([0.0, 1.0, 2.0])),
        (np.ones((2, 2)), md("float", 4), np.ones(4)),  # flattened
        ([1, 2, 3], md("int", 3), np.array([1, 2, 3])),
        (["4", 5.0], md("int", 3), np.array([4, 5])),
        ((True, False), md("int", 2), np.array([1, 0])),
        ([10, 20], md("char", 4), np.array([10, 20])),
    ],
)
def test_arrays_are_coerced_element_by_element(value, metadata, expected):
    result = coerce_value(value, metadata)
    assert isinstance(result, np.ndarray)
    assert result.dtype == (np.float64 if metadata["native_type"] == "float" else np.int64)
    assert np.array_equal(result, expected)


@pytest.mark.parametrize(
    "value, metadata",
    [
        ([1, 2, 3, 4], md("float", 3)),
        (np.zeros(11), md("float", 10)),
        (["a", 1], md("float", 3)),
        ([float("nan"), 2], md("int", 3)),
        ([2**31], md("int", 3)),
        ([[1, 2], [3]], md("float", 3)),
    ],
    ids=["too-many", "too-many-numpy", "not-a-number", "not-finite", "int-range", "ragged"],
)
def test_arrays_that_do_not_fit_are_refused(value, metadata):
    with pytest.raises(BadValueError):
        coerce_value(value, metadata)


def test_a_reconnection_is_announced_with_a_fresh_reading_not_the_old_one():
    state = PvState("X:a", epoch=1)
    state.connection_changed(True)
    state.metadata_received({"native_type": "float", "count": 1})
    state.reading_received(p.Reading(1.0, 10.0))
    assert state.connected
    (lost,) = state.connection_changed(False)
    assert lost.update.connected is False and lost.update.reading is None
    # Back: connection and metadata alone publish nothing; the first fresh reading does.
    assert state.connection_changed(True) == []
    assert state.metadata_received({"native_type": "float", "count": 1}) == []
    (back,) = state.reading_received(p.Reading(2.0, 20.0))
    assert back.update.connected is True and back.update.reading.value == 2.0


def test_losing_the_ioc_fails_every_put_in_flight_as_unknown():
    state = connected_state()
    state.access_changed(True, True)
    started = state.handle(b"alice", p.SetRequest(id=3, pv=state.pv, value=1.0))
    (put,) = [e for e in started if isinstance(e, StartPut)]
    effects = state.connection_changed(False)
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    assert reply.client == b"alice" and reply.message.id == 3
    assert reply.message.code == "disconnected" and "outcome is unknown" in reply.message.message
    assert state.pending_puts == 0
    assert state.put_completed(put.put_id) == []  # a late completion is ignored
    assert state.last_timestamp is not None  # still known to `pvhub status`


def test_a_reading_older_than_the_one_held_is_not_published():
    """A monitor update that arrives after the read-back of a later put (Rule 5)."""
    state = connected_state()
    (newer,) = updates(state.reading_received(reading(5.0, timestamp=500.0), read=True))
    assert state.reading_received(reading(4.0, timestamp=499.0)) == []
    assert state.reading.value == 5.0
    (later,) = updates(state.reading_received(reading(6.0, timestamp=501.0)))
    assert later.seq == newer.seq + 1


def test_a_fresh_read_asks_the_ioc_and_answers_with_what_it_said():
    state = connected_state()
    (start,) = state.handle(b"alice", p.ReadRequest(id=7, pv=state.pv, fresh=True))
    assert isinstance(start, StartRead)
    effects = state.read_completed(start.read_id, reading(8.0, timestamp=400.0))
    (update,) = updates(effects)
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    assert reply.message.id == 7 and reply.message.reading.value == 8.0
    assert update.reading.value == 8.0  # a newer value is published like any other


def test_a_fresh_read_in_flight_fails_when_the_ioc_goes():
    state = connected_state()
    (start,) = state.handle(b"alice", p.ReadRequest(id=7, pv=state.pv, fresh=True))
    effects = state.connection_changed(False)
    (reply,) = [e for e in effects if isinstance(e, Reply)]
    assert reply.message.code == "disconnected"
    assert [e for e in state.read_completed(start.read_id, None) if isinstance(e, Reply)] == []


def test_monitor_readings_keep_the_iocs_order_whatever_their_timestamps():
    """Device timestamps need not grow; only a read's reading can make a monitor's stale."""
    state = connected_state()
    (first,) = updates(state.reading_received(reading(5.0, timestamp=500.0)))
    (second,) = updates(state.reading_received(reading(6.0, timestamp=499.0)))
    assert second.seq == first.seq + 1 and state.reading.value == 6.0


# --- a put settled by the monitor (Rule 6) --------------------------------------------------


def done_replies(effects) -> list[p.SetDone]:
    return [r.message for r in replies(effects) if isinstance(r.message, p.SetDone)]


def test_a_completed_put_is_done_at_the_monitor_update_that_carries_its_value():
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    assert state.put_answered(put_id, read_back_pending=True) == []  # completed, its value not seen yet
    assert state.pending_puts == 1
    effects = state.reading_received(reading(2.5, timestamp=150.0))
    assert updates(effects)[0].reading == reading(2.5, timestamp=150.0)  # published as ever
    assert done_replies(effects) == [
        p.SetDone(id=7, pv=PV, epoch=EPOCH, seq=2, reading=reading(2.5, timestamp=150.0))
    ]
    assert state.pending_puts == 0
    # The read-back that follows counts as a reading, and answers nothing twice.
    assert done_replies(state.reading_received(reading(2.5, timestamp=150.0), read=True)) == []
    assert state.put_completed(put_id) == []


def test_a_put_whose_value_was_seen_before_its_completion_is_done_at_the_completion():
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    assert done_replies(state.reading_received(reading(2.5, timestamp=150.0))) == []
    (done,) = done_replies(state.put_answered(put_id, read_back_pending=False))
    assert done.id == 7 and done.reading == reading(2.5, timestamp=150.0) and done.seq == 2


def test_a_value_seen_then_replaced_before_the_completion_waits_for_a_read_after_it():
    # The 2.5 seen may be another writer's, or posted before the IOC ran this put; the 3.0
    # after it says nothing about this put either: only a read after the completion does.
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    state.reading_received(reading(2.5, timestamp=150.0))
    state.reading_received(reading(3.0, timestamp=160.0))
    assert state.put_answered(put_id, read_back_pending=False) == [StartReadBack(PV, put_id)]
    state.reading_received(reading(2.5, timestamp=170.0), read=True)
    (done,) = done_replies(state.put_completed(put_id))
    assert done.reading.value == 2.5


def test_a_value_the_ioc_changed_waits_for_the_read_back():
    state = connected_state()
    put_id = start_put(state, value=15.0, request_id=7)  # the IOC clips it to its drive limit
    state.put_answered(put_id, read_back_pending=True)
    assert done_replies(state.reading_received(reading(10.0, timestamp=150.0))) == []
    state.reading_received(reading(10.0, timestamp=150.0), read=True)
    (done,) = done_replies(state.put_completed(put_id))
    assert done.reading.value == 10.0


def test_an_update_from_a_read_does_not_settle_a_put_only_the_monitor():
    state = connected_state()
    put_id = start_put(state, value=2.5)
    state.put_answered(put_id, read_back_pending=True)
    assert done_replies(state.reading_received(reading(2.5, timestamp=150.0), read=True)) == []
    assert state.pending_puts == 1


def test_the_monitor_settles_nothing_before_the_completion_and_a_failure_still_fails():
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    assert done_replies(state.reading_received(reading(2.5, timestamp=150.0))) == []
    (reply,) = state.put_completed(put_id, error="IOC refused the put: no")
    assert reply.message.code == "put_failed"


def test_an_array_put_waits_for_the_read_back_even_when_the_monitor_shows_it():
    metadata = dict(FLOAT_METADATA, count=3)
    state = connected_state(metadata, value=np.zeros(3))
    put_id = start_put(state, value=[1.0, 2.0, 3.0])
    state.put_answered(put_id, read_back_pending=True)
    assert done_replies(state.reading_received(reading(np.array([1.0, 2.0, 3.0]), timestamp=150.0))) == []
    assert len(done_replies(state.put_completed(put_id))) == 1


@pytest.mark.parametrize("metadata, put, seen, settles", [
    (md("enum", enum_strs=["Off", "On"]), "On", 1, True),  # a label is put as its index
    (md("string"), "hello", "hello", True),
    (md("string"), "hello", "hello!", False),
    (md("int"), 3, 3, True),
    (md("float"), 0.1, float(np.float32(0.1)), False),  # a float32 record rounds it
])
def test_which_monitor_values_settle_a_put(metadata, put, seen, settles):
    state = connected_state(dict(metadata, read_access=True, write_access=True),
                            value="" if metadata["native_type"] == "string" else 0)
    put_id = start_put(state, value=put, request_id=7)
    state.put_answered(put_id, read_back_pending=True)
    assert bool(done_replies(state.reading_received(reading(seen, timestamp=150.0)))) is settles


def test_two_puts_of_the_same_value_are_both_settled_by_its_update():
    state = connected_state()
    first = start_put(state, value=2.5, request_id=1, client=CLIENT)
    second = start_put(state, value=2.5, request_id=2, client=OTHER_CLIENT)
    state.put_answered(first, read_back_pending=True)
    state.put_answered(second, read_back_pending=True)
    done = done_replies(state.reading_received(reading(2.5, timestamp=150.0)))
    assert sorted(d.id for d in done) == [1, 2]


def test_a_read_back_is_asked_for_only_when_the_value_was_not_seen_by_the_completion():
    # The read sent behind the put was answered before the completion (EPICS base's server).
    state = connected_state()
    put_id = start_put(state, value=2.5, request_id=7)
    assert state.put_answered(put_id, read_back_pending=False) == [StartReadBack(PV, put_id)]
    (done,) = done_replies(state.reading_received(reading(2.5, timestamp=150.0)))
    assert done.id == 7
    # Seen first: done at the completion, nothing read again.
    put_id = start_put(state, value=3.5, request_id=8)
    state.reading_received(reading(3.5, timestamp=160.0))
    effects = state.put_answered(put_id, read_back_pending=False)
    assert [d.id for d in done_replies(effects)] == [8]
    assert not [e for e in effects if isinstance(e, StartReadBack)]


# --- Rule 7: property events ---------------------------------------------------------------------


def test_a_monitor_update_repeating_the_reading_asks_for_the_metadata_again():
    state = connected_state()
    assert state.reading_received(reading(1.0)) == [StartDescribe(PV)]
    assert state.seq == 1  # nothing published until the new metadata comes
    effects = state.metadata_received({**FLOAT_METADATA, "units": "um"})
    (update,) = updates(effects)
    assert update.metadata["units"] == "um" and state.seq == 2


def test_a_monitor_copy_of_a_read_reading_asks_nothing():
    # A put's read-back is held first; the monitor's update of the same value follows.
    state = connected_state()
    state.reading_received(reading(2.0, timestamp=101.0), read=True)
    assert state.reading_received(reading(2.0, timestamp=101.0)) == []
    assert state.reading_received(reading(2.0, timestamp=101.0), read=True) == []
    # From then on the monitor has caught up: its next repeat is a property event again.
    assert state.reading_received(reading(2.0, timestamp=101.0)) == [StartDescribe(PV)]


def test_a_nan_reading_repeated_is_a_property_event_not_a_new_value():
    state = connected_state(value=float("nan"))
    assert state.reading_received(reading(float("nan"))) == [StartDescribe(PV)]
    state = connected_state(value=np.array([1.0, np.nan]))
    assert state.reading_received(reading(np.array([1.0, np.nan]))) == [StartDescribe(PV)]
    assert state.seq == 1


def test_a_newer_update_repeating_value_and_alarm_asks_for_metadata_ever_less_often():
    # A scanned record whose value stays posts nothing but property events, each with the
    # time of its last processing; one that posts its unchanged value at every scan must not
    # cost a metadata read per scan.
    state = connected_state(value=1.0)
    asked = [StartDescribe(PV) in state.reading_received(reading(1.0, timestamp=100.0 + n))
             for n in range(1, 10)]  # fmt: skip
    assert asked == [True, True, False, True, False, False, False, True, False]
    state.metadata_received({**FLOAT_METADATA, "units": "um"})  # what the reads were for
    assert StartDescribe(PV) in state.reading_received(reading(1.0, timestamp=200.0))
    assert StartDescribe(PV) not in state.reading_received(reading(2.0, timestamp=201.0))  # a new value
    assert StartDescribe(PV) not in state.reading_received(reading(2.0, timestamp=202.0, severity=1))


@pytest.mark.parametrize(
    "held, new",
    [(np.arange(3.0), 0.0), (0.0, np.arange(3.0)), (["a", "b"], "a"), (1, 1.0), (np.arange(2.0), np.arange(2.0))],
    ids=["array-then-scalar", "scalar-then-array", "list-then-str", "int-then-float", "arrays"],
)
def test_a_newer_update_of_another_shape_is_a_new_value_not_a_failure(held, new):
    # A waveform holding one element reads as a scalar (NORD 1), so a PV's value may change
    # between an array and a scalar; comparing them must not raise (it ended the actor).
    state = connected_state(value=held)
    effects = state.reading_received(reading(new, timestamp=101.0))
    assert len(updates(effects)) == 1 and StartDescribe(PV) not in effects
