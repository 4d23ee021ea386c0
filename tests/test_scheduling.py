"""The quantize stage's scheduler: how many tensors may be in flight."""


import pytest

from so8t_core.errors import UnsupportedError
from tasks.quantize import tensors_in_flight


def test_memory_cap_limits_tensors_in_flight():
    assert tensors_in_flight(None, 100 << 20, 8) == 8
    assert tensors_in_flight(2.0, 100 << 20, 8) == 2  # (2 GiB − 1 GiB) // (4 × 100 MiB)
    assert tensors_in_flight(64.0, 100 << 20, 8) == 8
    with pytest.raises(UnsupportedError, match="the largest tensor alone needs"):
        tensors_in_flight(1.2, 100 << 20, 8)
