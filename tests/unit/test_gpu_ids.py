"""GPU ids: how the scheduler hands them out (``_scheduler.gpu_ids``, through
``Resources``), and which GPUs a session finds (``_accelerators``)."""

import pytest

from shmray._accelerators import as_returned, session_gpus, visible_devices
from shmray._scheduler.gpu_ids import GpuIds
from shmray._scheduler.resources import Resources


def test_fractions_pack_where_they_fit_most_tightly():
    gpus = GpuIds(["0", "1"])
    assert gpus.take(0.5) == ("0",)
    assert gpus.take(0.3) == ("0",)   # the tightest fit, not the emptiest GPU
    assert gpus.take(0.5) == ("1",)   # 0.2 left of "0": too little
    assert gpus.take(0.2) == ("0",)
    assert not gpus.fits(1)           # neither is whole now
    assert gpus.fits(0.5) and not gpus.fits(0.6)


def test_a_fraction_never_spans_two_gpus():
    """1.2 of 2 GPUs is held, 0.8 is free in all, but no GPU has 0.6 left."""
    resources = Resources({"CPU": 4.0, "GPU": 2.0}, ["0", "1"])
    held = [resources.take({"CPU": 1.0, "GPU": 0.6}) for _ in range(2)]
    assert held == [("0",), ("1",)]
    assert resources.available["GPU"] == pytest.approx(0.8)
    assert not resources.fits({"CPU": 1.0, "GPU": 0.6})
    assert resources.fits({"CPU": 1.0, "GPU": 0.4})
    resources.give({"CPU": 1.0, "GPU": 0.6}, held[0])
    assert resources.fits({"CPU": 1.0, "GPU": 1.0})


def test_whole_gpus_take_ids_nobody_holds_any_of():
    gpus = GpuIds(["a", "b", "c"])
    assert gpus.take(0.1) == ("a",)
    assert gpus.take(2) == ("b", "c")
    assert not gpus.fits(1)
    gpus.give(("b", "c"), 2)
    assert gpus.take(1) == ("b",)


def test_tenths_given_back_leave_a_whole_gpu():
    """Counted in fixed point: floats would leave 0.9999999999999999 and no whole GPU."""
    gpus = GpuIds(["0"])
    taken = [gpus.take(0.1) for _ in range(10)]
    assert not gpus.fits(0.1)
    for ids in taken:
        gpus.give(ids, 0.1)
    assert gpus.fits(1)


def test_demands_without_gpus_are_untouched():
    resources = Resources({"CPU": 2.0})
    assert resources.take({"CPU": 1.0}) == ()
    assert resources.fits({"CPU": 1.0}) and not resources.fits({"CPU": 1.0, "GPU": 0.5})


@pytest.mark.parametrize("value, ids", [
    (None, None), ("", []), ("NoDevFiles", []), ("1", ["1"]), ("0, 2,", ["0", "2"]),
    ("GPU-9f2c,GPU-77aa", ["GPU-9f2c", "GPU-77aa"]),
])
def test_cuda_visible_devices_parsed(value, ids):
    environ = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_devices(environ) == ids


def test_the_sessions_gpus():
    listed = {"CUDA_VISIBLE_DEVICES": "4,6,7"}
    assert session_gpus(None, listed) == (["4", "6", "7"], True)
    assert session_gpus(2, listed) == (["4", "6"], True)
    assert session_gpus(2.0, {}) == (["0", "1"], False)
    assert session_gpus(0, listed) == ([], True)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES='4,6,7'"):
        session_gpus(4, listed)
    with pytest.raises(ValueError, match="whole"):
        session_gpus(0.5, {})


def test_ids_returned_as_ray_returns_them():
    assert as_returned(("0", "3"), named=False) == [0, 3]
    assert as_returned(("GPU-9f2c",), named=True) == ["GPU-9f2c"]
