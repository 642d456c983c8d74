"""Round trips through the one layout used inline and in the arena (no store involved)."""

import pickle
from collections import OrderedDict

import numpy as np
import pytest

from shmray._serialization import ALIGN, deserialize, serialize


def roundtrip(value):
    s = serialize(value)
    return deserialize(memoryview(s.to_bytes()))


@pytest.mark.parametrize("value", [
    None, 0, -7, 2**80, 3.5, 1 + 2j, "text", "ünïcode", b"\x00bytes", [1, [2, (3,)]],
    {"a": 1, 2: [b"x"]}, OrderedDict(a=1), {1, 2, 3}, frozenset({4}), (), [],
])
def test_plain_values(value):
    assert roundtrip(value) == value


@pytest.mark.parametrize("dtype", ["u1", "i2", "i4", "i8", "f2", "f4", "f8", "c16", "bool",
                                   "M8[ns]", "U7", "S3", [("x", "f4"), ("y", "i8")]])
def test_numpy_dtypes(dtype):
    a = np.zeros(1000, dtype=dtype)
    if a.dtype.names is None and a.dtype.kind not in "MUS":
        a = np.arange(1000).astype(dtype)
    back = roundtrip(a)
    assert back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)


def test_fortran_and_noncontiguous_arrays():
    f = np.asfortranarray(np.arange(600.0).reshape(20, 30))
    back = roundtrip(f)
    assert back.flags.f_contiguous
    np.testing.assert_array_equal(back, f)
    strided = np.arange(1000.0)[::3]
    np.testing.assert_array_equal(roundtrip(strided), strided)
    t = np.arange(600.0).reshape(20, 30).T[2:, 5:]
    np.testing.assert_array_equal(roundtrip(t), t)


def test_buffers_are_out_of_band_aligned_and_read_only():
    a = np.arange(10_000, dtype=np.float64)
    s = serialize({"a": a, "b": [a[:10].copy()]})
    assert len(s.buffers) == 2
    assert all(offset % ALIGN == 0 for offset, _ in s.buffers)
    assert len(s.header) < 1000  # the array data is not in the pickle stream
    back = deserialize(memoryview(s.to_bytes()))
    assert not back["a"].flags.writeable
    np.testing.assert_array_equal(back["a"], a)


def test_lambdas_and_main_classes_travel_by_value():
    fn = roundtrip(lambda x: x * 2)
    assert fn(21) == 42
    Local = type("Local", (), {"value": 5})
    assert roundtrip(Local)().value == 5


def test_unpicklable_value_names_its_type():
    import threading

    with pytest.raises(TypeError, match="lock"):
        serialize(threading.Lock())


def test_bad_bytes_are_refused():
    with pytest.raises(ValueError, match="magic"):
        deserialize(memoryview(b"\x00" * 64))


def test_plain_pickle_stream_is_standard():
    s = serialize([1, 2, 3])
    assert pickle.loads(s.header[16:]) == [1, 2, 3]
