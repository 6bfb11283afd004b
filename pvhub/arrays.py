"""How values travel inside a wire message (``pvhub.protocol``): numpy arrays as a msgpack
extension type, numpy scalars as plain numbers.

Rule 1: an array travels as its raw bytes after a short header ``[dtype.str, shape]``, never
element by element; only dtypes whose bytes are plain values (booleans, integers, floats,
complex numbers, bytes and text) travel. Nothing is ever pickled.
Rule 2: what comes from a peer is checked before anything is built from it: the dtype, the
shape against the bytes that came, text that holds no character. A bad array is a
``ProtocolError``, and nothing is allocated beyond the bytes that came.
"""

from __future__ import annotations

import warnings
from typing import Any

import msgpack
import numpy as np

from pvhub.errors import ProtocolError

NDARRAY_EXT = 1  # the msgpack extension type code of an array


def pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        array = obj if obj.flags.c_contiguous else obj.copy(order="C")  # keeps 0-D shapes
        if array.dtype.hasobject:
            return array.tolist()
        header = msgpack.packb([array.dtype.str, list(array.shape)])
        return msgpack.ExtType(NDARRAY_EXT, header + array.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot send a value of type {type(obj).__name__}")


def unpack_ext(code: int, data: bytes) -> Any:
    """An ndarray from its ext payload: a msgpack header ``[dtype.str, shape]``, then the
    raw bytes. Anything else is a ``ProtocolError``, and nothing is allocated beyond the
    bytes that came (Rule 2)."""
    if code != NDARRAY_EXT:
        raise ProtocolError(f"unknown msgpack extension type {code}")
    # The header is a few bytes; limits sized from the payload keep a forged length from
    # asking msgpack for more than what arrived.
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"array header is not msgpack: {exc}") from exc
    if type(header) is not list or len(header) != 2:
        raise ProtocolError("array header must be [dtype, shape]")
    dtype_str, shape = header
    dtype = _array_dtype(dtype_str)
    if type(shape) is not list or len(shape) > MAX_ARRAY_DIMS:
        raise ProtocolError(f"array shape must be a list of at most {MAX_ARRAY_DIMS} sizes")
    elements = 1
    span = 1  # the product of the sizes but zeros: what numpy refuses past 2**63 even when empty
    for size in shape:
        if type(size) is not int or size < 0:
            raise ProtocolError(f"array shape {shape!r:.80} holds something other than a size")
        elements *= size  # Python ints: an absurd shape cannot wrap around to a small one
        span *= max(size, 1)
    offset = unpacker.tell()
    if span > _MAX_ARRAY_SPAN or elements * dtype.itemsize != len(data) - offset:
        raise ProtocolError(
            f"array of shape {shape!r:.80} and dtype {dtype.str} does not fit the "
            f"{len(data) - offset} bytes that came"
        )
    if dtype.kind == "U" and elements and not _valid_code_points(data, dtype, offset):
        raise ProtocolError("a text array holds something that is not a character")
    # frombuffer shares the (immutable) message buffer; users expect an array they own.
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).copy()


def _valid_code_points(data: bytes, dtype: np.dtype, offset: int) -> bool:
    # numpy keeps any 32-bit number as a character; Python makes a str of one past U+10FFFF
    # only by raising SystemError (in repr, in a log line), and one of a surrogate never
    # encodes. Neither may get in.
    codes = np.frombuffer(data, dtype=dtype.byteorder.replace("=", "") + "u4", offset=offset)
    return not bool(((codes > 0x10FFFF) | ((codes >= 0xD800) & (codes <= 0xDFFF))).any())


def _array_dtype(dtype_str: Any) -> np.dtype:
    """The dtype a peer named, if it is one whose bytes are plain values (Rule 2)."""
    dtype = _ARRAY_DTYPES.get(dtype_str) if type(dtype_str) is str else None
    if dtype is not None:
        return dtype
    if type(dtype_str) is not str or len(dtype_str) > 16:
        raise ProtocolError(f"array dtype must be a short string, not {dtype_str!r:.40}")
    try:
        with warnings.catch_warnings():  # numpy deprecates some aliases: still just refused
            warnings.simplefilter("ignore")
            dtype = np.dtype(dtype_str)
    except Exception as exc:  # numpy's parser raises TypeError, ValueError, SyntaxError...
        raise ProtocolError(f"{dtype_str!r} is not a dtype") from exc
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ProtocolError(f"arrays of dtype {dtype_str!r} do not travel")
    if len(_ARRAY_DTYPES) < 256:  # a peer naming ever new spellings does not grow it forever
        _ARRAY_DTYPES[dtype_str] = dtype
    return dtype


# Booleans, integers, floats, complex numbers, bytes and text: dtypes whose bytes are values.
# Objects (pointers), void and structured records, datetimes never travel.
_ARRAY_KINDS = frozenset("biufcSU")
_ARRAY_DTYPES: dict[str, np.dtype] = {}
MAX_ARRAY_DIMS = 32
# Sizes past this are absurd even for an empty array (numpy itself stops at 2**63 bytes).
_MAX_ARRAY_SPAN = 2**40
