"""The wire protocol (``pvhub.protocol``): what goes in comes out, and bad bytes fail cleanly.

Every peer trusts ``decode`` to turn any input into either a valid message or a
``ProtocolError``, so the malformed-input tests matter as much as the round trips.
"""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest

from pvhub import arrays, message_checks, messages, protocol
from pvhub.errors import ProtocolError, UnknownOperationError, UnsupportedVersionError
from pvhub.protocol import (
    MESSAGES,
    PROTOCOL_VERSION,
    ActorReady,
    AdoptPvs,
    DescribeReply,
    DescribeRequest,
    ErrorReply,
    Heartbeat,
    HelloReply,
    HubStopping,
    HelloRequest,
    Message,
    PingRequest,
    PvLost,
    Pong,
    Reading,
    ReadRequest,
    ReleasePvs,
    SetAccepted,
    SetDone,
    SetRequest,
    Snapshot,
    StatusReply,
    StatusRequest,
    Update,
    Updates,
    decode,
    encode,
    pv_from_topic,
    topic,
)

METADATA = {
    "native_type": "enum",
    "count": 1,
    "units": "",
    "precision": None,
    "enum_strs": ["Off", "On", "Auto"],
    "read_access": True,
    "write_access": False,
    "host": "127.0.0.1:5064",
}
READING = Reading(value=1.5, timestamp=1_700_000_000.25, severity=1, status=3)

# One message of every type, with every field set away from its default where it has one.
EXAMPLES: list[Message] = [
    HelloRequest(id=1, client="bluesky@host:123", protocol=PROTOCOL_VERSION),
    ReadRequest(id=2, pv="X:motor", publish=True),
    DescribeRequest(id=3, pv="X:mode"),
    SetRequest(id=4, pv="X:text", value="héllo"),
    StatusRequest(id=5),
    PingRequest(id=6),
    PingRequest(id=8, pvs=["X:motor", "X:x"]),
    HelloReply(id=1, readings="tcp://127.0.0.1:5001", server_version="0.1.0", client=b"\x00\x8b"),
    Snapshot(id=2, pv="X:m", epoch=7, seq=42, connected=True, reading=READING, metadata=METADATA),
    DescribeReply(id=3, pv="X:mode", connected=False, metadata=METADATA),
    SetAccepted(id=4, pv="X:text"),
    SetDone(id=4, pv="X:text", epoch=7, seq=43, reading=Reading("héllo", 1.0)),
    StatusReply(id=5, status={"pvs": {"X:motor": {"clients": 2}}, "uptime": 3.5}),
    Pong(id=6),
    Pong(id=6, pvs_wanted=True),
    ErrorReply(id=7, code="pv_not_allowed", message="no", pv="Y:secret"),
    Update(pv="X:x", epoch=7, seq=44, connected=True, reading=READING, snapshot=True),
    Updates(pv="X:x", epoch=7, items=[[45, 2.5, 1.5, 0, 0], [46, [1, 2], 1.6, 1, 3]]),
    ActorReady(actor="actor-X:x", pid=4242, pvs=["X:x", "X:dt"]),
    AdoptPvs(pvs=["X:x", "X:dt"]),
    Heartbeat(sender="broker"),
    Heartbeat(sender="pv:X:x", stats={"X:x": {"connected": True, "updates": 12, "last_update": 1.5}}),
    PvLost(pv="X:x", reason="the actor owning X:x exited (code -9)"),
    HubStopping(reason="the daemon is stopping"),
    ReleasePvs(pvs=["X:gone"]),
    Pong(id=6, lost=[3, 4]),
]


def packed(body: object) -> bytes:
    """Bytes as a peer might send them, bypassing ``encode``'s checks."""
    return msgpack.packb(body, use_bin_type=True)


def wire(message: Message) -> dict:
    """The map ``encode`` puts on the wire, to be altered by a test."""
    return msgpack.unpackb(encode(message), raw=False)


# --- round trips -------------------------------------------------------------------------------


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.OP)
def test_round_trip_keeps_every_field(message):
    assert decode(encode(message)) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.OP)
def test_wire_form_carries_version_and_op(message):
    body = wire(message)
    assert body["v"] == PROTOCOL_VERSION
    assert body["op"] == message.OP


def test_defaults_survive_a_round_trip():
    assert decode(encode(Update(pv="X:x", epoch=1, seq=0, connected=False))) == Update(
        pv="X:x", epoch=1, seq=0, connected=False
    )


def test_error_reply_without_pv_round_trips():
    # Errors to hello/status name no PV; the reply must still decode.
    error = ErrorReply(id=1, code="unknown_operation", message="what?")
    assert decode(encode(error)) == error


def test_tuples_arrive_as_lists():
    message = decode(encode(SetRequest(id=1, pv="X:wave", value=(1, 2.5, "a"))))
    assert message.value == [1, 2.5, "a"]


# --- arrays and numpy values -------------------------------------------------------------------

ARRAYS = {
    "float64": np.arange(16, dtype=np.float64),
    "float32": np.linspace(-1, 1, 5, dtype=np.float32),
    "int16": np.array([-32768, 0, 32767], dtype=np.int16),
    "uint8": np.frombuffer(b"abc\x00\xff", dtype=np.uint8),
    "int64": np.array([2**62, -(2**62)], dtype=np.int64),
    "bool": np.array([True, False, True]),
    "complex128": np.array([1 + 2j, -3j]),
    "2-D": np.arange(12, dtype=np.int32).reshape(3, 4),
    "3-D": np.arange(24, dtype=np.float64).reshape(2, 3, 4),
    "empty": np.array([], dtype=np.float64),
    "empty 2-D": np.zeros((0, 3), dtype=np.int32),
    "big-endian float": np.arange(4, dtype=">f8"),
    "big-endian int 2-D": np.arange(6, dtype=">i4").reshape(2, 3),
    "unicode": np.array(["Off", "On"]),
}


def assert_same_array(got, sent):
    assert isinstance(got, np.ndarray)
    assert got.dtype == sent.dtype
    assert got.dtype.str == sent.dtype.str  # byte order included
    assert got.shape == sent.shape
    np.testing.assert_array_equal(got, sent)


@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_array_in_a_reading_keeps_dtype_shape_and_values(array):
    update = Update(pv="X:wave", epoch=1, seq=1, connected=True, reading=Reading(array, 1.0))
    assert_same_array(decode(encode(update)).reading.value, array)


@pytest.mark.parametrize("array", ARRAYS.values(), ids=ARRAYS.keys())
def test_array_as_put_value(array):
    assert_same_array(decode(encode(SetRequest(id=1, pv="X:wave", value=array))).value, array)


def test_zero_dimensional_array_keeps_its_shape():
    array = np.array(7.25)
    assert_same_array(decode(encode(SetRequest(id=1, pv="X:a", value=array))).value, array)


def test_non_contiguous_arrays_travel_as_their_values():
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    strided = np.arange(10, dtype=np.int32)[::3]
    for array in (fortran, strided):
        assert_same_array(decode(encode(SetRequest(id=1, pv="X:w", value=array))).value, array)


def test_decoded_array_is_writable_and_owned():
    value = decode(encode(SetRequest(id=1, pv="X:w", value=np.arange(3.0)))).value
    value[0] = 42.0  # frombuffer alone would give a read-only view of the message
    assert value.flags.owndata


def test_arrays_travel_as_raw_bytes_not_elements():
    array = np.arange(10_000, dtype=np.float64)
    assert len(encode(SetRequest(id=1, pv="X:w", value=array))) < array.nbytes + 100


def test_object_arrays_travel_as_lists():
    value = decode(encode(SetRequest(id=1, pv="X:w", value=np.array(["a", 1], dtype=object))))
    assert value.value == ["a", 1]


@pytest.mark.parametrize(
    ("scalar", "plain"),
    [
        (np.float64(1.5), float),
        (np.float32(0.25), float),
        (np.int32(-7), int),
        (np.uint16(9), int),
        (np.bool_(True), bool),
        (np.str_("On"), str),
    ],
    ids=lambda x: type(x).__name__,
)
def test_numpy_scalars_become_plain_values(scalar, plain):
    value = decode(encode(SetRequest(id=1, pv="X:a", value=scalar))).value
    assert type(value) is plain
    assert value == scalar.item()


def test_values_that_cannot_travel_raise_protocol_error():
    for value in (object(), 2**70, {1, 2}.__iter__()):
        with pytest.raises(ProtocolError):
            encode(SetRequest(id=1, pv="X:a", value=value))


# --- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_random_bytes_raise_protocol_error(seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("cut", [1, 5, 10, -1])
def test_truncated_message_raises_protocol_error(cut):
    with pytest.raises(ProtocolError):
        decode(encode(ReadRequest(id=1, pv="X:motor"))[:cut])


def test_empty_input_raises_protocol_error():
    with pytest.raises(ProtocolError):
        decode(b"")


@pytest.mark.parametrize("body", [[1, 2], "read", 1, None, b"map"], ids=repr)
def test_non_map_raises_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize("version", [None, "1", 1.0], ids=repr)
def test_missing_or_non_integer_version_raises_protocol_error(version):
    body = wire(PingRequest(id=1))
    if version is None:
        del body["v"]
    else:
        body["v"] = version
    with pytest.raises(ProtocolError) as excinfo:
        decode(packed(body))
    assert not isinstance(excinfo.value, UnsupportedVersionError)


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 99])
def test_other_version_raises_unsupported_version(version):
    body = wire(PingRequest(id=1)) | {"v": version}
    with pytest.raises(UnsupportedVersionError):
        decode(packed(body))
    assert issubclass(UnsupportedVersionError, ProtocolError)


@pytest.mark.parametrize("op", ["explode", "", None, 7, "Message"], ids=repr)
def test_unknown_or_missing_op_raises_protocol_error(op):
    body = wire(PingRequest(id=1))
    if op is None:
        del body["op"]
    else:
        body["op"] = op
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (ReadRequest(id=1, pv="X:a"), "pv"),
        (ReadRequest(id=1, pv="X:a"), "id"),
        (SetRequest(id=1, pv="X:a", value=1), "value"),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "seq"),
        (ErrorReply(id=1, code="internal", message="m", pv="X:a"), "code"),
    ],
    ids=lambda x: getattr(x, "OP", x),
)
def test_missing_required_field_raises_protocol_error(message, field):
    body = wire(message)
    del body[field]
    with pytest.raises(ProtocolError, match=field):
        decode(packed(body))


@pytest.mark.parametrize("bad_id", ["1", 1.0, True, None, [1]], ids=repr)
def test_non_integer_id_raises_protocol_error(bad_id):
    body = wire(ReadRequest(id=1, pv="X:a")) | {"id": bad_id}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize("bad_pv", ["", None, 5, b"X:a"], ids=repr)
def test_empty_or_non_string_pv_raises_protocol_error(bad_pv):
    body = wire(DescribeRequest(id=1, pv="X:a")) | {"pv": bad_pv}
    with pytest.raises(ProtocolError):
        decode(packed(body))


def test_malformed_reading_raises_protocol_error():
    body = wire(Update(pv="X:a", epoch=1, seq=1, connected=True, reading=READING))
    del body["reading"]["timestamp"]
    with pytest.raises(ProtocolError):
        decode(packed(body))


def _array_ext(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(arrays.NDARRAY_EXT, packed([dtype, shape]) + data)


@pytest.mark.parametrize(
    "ext",
    [
        msgpack.ExtType(99, b"whatever"),  # unknown extension type
        _array_ext("<f8", [3], b"\x00" * 16),  # shape does not match the bytes
        _array_ext("not a dtype", [1], b"\x00" * 8),
        _array_ext("|O", [1], b"\x00" * 8),  # an object array from raw memory: never
        msgpack.ExtType(arrays.NDARRAY_EXT, b"\xc1"),  # header is not msgpack
    ],
    ids=["unknown-ext", "short-data", "bad-dtype", "object-dtype", "bad-header"],
)
def test_malformed_array_raises_protocol_error(ext):
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": ext}
    with pytest.raises(ProtocolError):
        decode(packed(body))


def _nested(depth: int) -> object:
    """A value that makes a message ``depth`` levels deep (the message's map is level 1)."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_message_as_deep_as_the_limit_decodes():
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": _nested(protocol.MAX_DEPTH)}
    assert decode(packed(body)).id == 1


@pytest.mark.parametrize("depth", [protocol.MAX_DEPTH + 1, 500, 1024, 1025, 100_000])
def test_a_message_nested_too_deep_raises_protocol_error(depth):
    # By hand: msgpack's packer refuses to go this deep, a peer's need not.
    marker = packed("VALUE")
    data = packed(wire(SetRequest(id=1, pv="X:w", value="VALUE")))
    data = data.replace(marker, b"\x91" * (depth - 1) + b"\x01")
    with pytest.raises(ProtocolError):
        decode(data)


def test_depth_counts_maps_too_and_unknown_fields():
    deep: object = {}
    for _ in range(protocol.MAX_DEPTH + 2):
        deep = {"k": deep}
    body = wire(PingRequest(id=1)) | {"extension": deep}  # an unknown field is no way around
    with pytest.raises(ProtocolError, match="nests"):
        decode(packed(body))


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # an array 32 of 2**32-1 elements, in five bytes
        b"\xdf\xff\xff\xff\xff",  # a map 32 likewise
        b"\xc6\xff\xff\xff\xff",  # bin 32 of 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext 32 of 4 GiB
        b"\x81\xa1v\x01" + b"\xdd\x7f\xff\xff\xff",
    ],
    ids=["array", "map", "bin", "str", "ext", "nested-array"],
)
def test_claimed_lengths_beyond_the_bytes_raise_protocol_error_at_once(data):
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    ("dtype", "shape", "data"),
    [
        ("|V8", [1], b"\x00" * 8),  # void: raw memory
        ("f8,i4", [1], b"\x00" * 12),  # structured
        ("(2,)f8", [1], b"\x00" * 16),  # a sub-array dtype grows the shape behind the header
        ("<M8[s]", [1], b"\x00" * 8),  # datetime
        ("<m8[s]", [1], b"\x00" * 8),  # timedelta
        ("S0", [4], b""),  # zero-sized items: any shape fits no bytes
        ("<U0", [4], b""),
        ("a", [1], b"x"),
        ("f8," * 100, [1], b""),  # long: not parsed at all
        (8, [1], b"\x00" * 8),  # not a string
        (None, [1], b""),
    ],
    ids=["void", "structured", "subarray", "datetime", "timedelta", "S0", "U0", "alias-a", "long", "int", "none"],
)
def test_arrays_of_dtypes_that_are_not_plain_values_raise_protocol_error(dtype, shape, data):
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": _array_ext(dtype, shape, data)}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([-1], b""),
        ([2**62, 2**62], b""),  # the product wraps to 0 in 64 bits
        ([0, 2**62], b""),  # empty, but numpy cannot make it
        ([2**64 - 1], b""),
        ([1] * 40, b"\x00" * 8),  # more dimensions than numpy has
        ([True], b"\x00" * 8),
        ([1.0], b"\x00" * 8),
        (["1"], b"\x00" * 8),
        (1, b"\x00" * 8),
        ({"n": 1}, b"\x00" * 8),
        ([[1]], b"\x00" * 8),
        ([2], b"\x00" * 8),
        ([1], b"\x00" * 9),
        ([], b""),  # a 0-D array has one element
    ],
    ids=repr,
)
def test_array_shapes_that_do_not_fit_the_bytes_raise_protocol_error(shape, data):
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": _array_ext("<f8", shape, data)}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize(
    "header",
    [packed("<f8"), packed(["<f8"]), packed(["<f8", [1], 0]), packed({"<f8": [1]}), b"", b"\x92"],
    ids=["str", "one", "three", "map", "empty", "truncated"],
)
def test_array_headers_that_are_not_dtype_and_shape_raise_protocol_error(header):
    ext = msgpack.ExtType(arrays.NDARRAY_EXT, header + b"\x00" * 8)
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": ext}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize("code_point", [0x110000, 0xFFFFFFFF, 0xD800, 0xDFFF])
def test_text_arrays_with_what_is_not_a_character_raise_protocol_error(code_point):
    # numpy would keep them; Python could not even repr them (SystemError) or encode them.
    data = np.array([code_point], dtype="<u4").tobytes()
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": _array_ext("<U1", [1], data)}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize("dtype", ["<f8", ">f8", "=f8", "float64", "<i2", ">u4", "|b1", "<c16", ">U2", "|S3"])
def test_arrays_of_plain_dtypes_in_any_byte_order_decode(dtype):
    array = np.zeros(3, dtype=dtype)
    body = wire(SetRequest(id=1, pv="X:w", value=0)) | {"value": _array_ext(dtype, [3], array.tobytes())}
    got = decode(packed(body)).value
    assert got.dtype == np.dtype(dtype) and got.shape == (3,)


@pytest.mark.parametrize(
    ("message", "field", "bad"),
    [
        (ReadRequest(id=1, pv="X:a"), "publish", "yes"),
        (ReadRequest(id=1, pv="X:a"), "fresh", 1),
        (HelloRequest(id=1), "client", 7),
        (HelloRequest(id=1), "protocol", "1"),
        (PingRequest(id=1), "pvs", "X:a"),
        (PingRequest(id=1), "pvs", {"X:a": 1}),
        (PingRequest(id=1, pvs=["X:a"]), "pvs", ["X:a", 2]),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "seq", 1.5),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "connected", 1),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "metadata", [1]),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "reading", 5),
        (Update(pv="X:a", epoch=1, seq=1, connected=True), "reading", [1.0, 2.0]),
        (StatusReply(id=1), "status", []),
        (HelloReply(id=1, readings="tcp://h:1", server_version="1"), "client", "text"),
        (ErrorReply(id=1, code="x", message="m"), "code", None),
        (AdoptPvs(pvs=["X:a"]), "pvs", [None]),
    ],
    ids=lambda x: repr(x)[:20] if not isinstance(x, Message) else x.OP,
)
def test_fields_of_the_wrong_type_raise_protocol_error(message, field, bad):
    body = wire(message) | {field: bad}
    with pytest.raises(ProtocolError, match=field):
        decode(packed(body))


@pytest.mark.parametrize(
    ("field", "bad"), [("timestamp", "now"), ("severity", 1.5), ("status", None), ("timestamp", True)]
)
def test_reading_fields_of_the_wrong_type_raise_protocol_error(field, bad):
    body = wire(Update(pv="X:a", epoch=1, seq=1, connected=True, reading=READING))
    body["reading"][field] = bad
    with pytest.raises(ProtocolError, match=field):
        decode(packed(body))


def test_an_integer_timestamp_is_a_timestamp():
    body = wire(Update(pv="X:a", epoch=1, seq=1, connected=True, reading=READING))
    body["reading"]["timestamp"] = 1_700_000_000
    assert decode(packed(body)).reading.timestamp == 1_700_000_000


def test_a_pv_name_with_a_nul_raises_protocol_error():
    # Rule 4: the NUL ends a topic; "X:a\0b" would receive X:a's readings.
    body = wire(ReadRequest(id=1, pv="X:a")) | {"pv": "X:a\0b"}
    with pytest.raises(ProtocolError):
        decode(packed(body))


@pytest.mark.parametrize("op", ["explode", "", "Message", "x" * 10_000])
def test_an_unknown_operation_is_unknown_operation(op):
    with pytest.raises(UnknownOperationError) as excinfo:
        decode(packed(wire(PingRequest(id=1)) | {"op": op}))
    assert excinfo.value.code == "unknown_operation"
    assert len(str(excinfo.value)) < 200  # the error quotes the op, never all of it


def test_every_field_of_every_message_has_its_type_checked():
    # A field added with an annotation decode does not know would fail at import; this
    # proves the table covers every message, and that only values may be anything.
    for cls in MESSAGES.values():
        checked = {name for name, _ in message_checks._FIELD_TYPES[cls]}
        unchecked = set(messages.FIELDS[cls]) - checked
        assert unchecked <= {"value"}, (cls.OP, unchecked)


@pytest.mark.parametrize("seed", range(300))
def test_mutated_messages_decode_or_raise_protocol_error(seed):
    # Any byte of a real message changed, dropped or repeated: decode answers, never crashes.
    rng = random.Random(seed)
    data = bytearray(encode(rng.choice(EXAMPLES)))
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data))
        action = rng.randrange(3)
        if action == 0:
            data[at] = rng.randrange(256)
        elif action == 1:
            del data[at]
        else:
            data[at:at] = data[at : at + rng.randrange(1, 8)]
    try:
        message = decode(bytes(data))
    except ProtocolError:
        return
    assert isinstance(message, Message)


# --- compatibility -----------------------------------------------------------------------------


def test_unknown_fields_are_ignored():
    body = wire(ReadRequest(id=9, pv="X:a")) | {"priority": 3, "trace": {"span": "ab"}}
    assert decode(packed(body)) == ReadRequest(id=9, pv="X:a")


def test_unknown_fields_in_a_reading_are_ignored():
    body = wire(Update(pv="X:a", epoch=1, seq=1, connected=True, reading=READING))
    body["reading"]["units"] = "mm"
    assert decode(packed(body)).reading == READING


# --- topics ------------------------------------------------------------------------------------


def test_topic_is_name_and_nul():
    assert topic("X:motor") == b"X:motor\0"


def test_topic_of_one_pv_is_not_a_prefix_of_another():
    # ZeroMQ subscriptions match by prefix; the NUL keeps X:a's subscribers from X:ab's.
    assert not topic("X:ab").startswith(topic("X:a"))
    assert topic("X:a").startswith(b"X:a")


@pytest.mark.parametrize("pv", ["X:motor", "X:a.VAL", "Ünïcode:pv", "a"])
def test_pv_from_topic_inverts_topic(pv):
    assert pv_from_topic(topic(pv)) == pv
