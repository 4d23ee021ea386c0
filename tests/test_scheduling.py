"""The quantize stage's scheduler: how many tensors may be in flight."""


from types import SimpleNamespace

import pytest

from so8t_core.errors import UnsupportedError
from so8t_core.plan import CHUNK_ELEMENTS, tensors_in_flight


def test_memory_cap_limits_tensors_in_flight():
    plan = [SimpleNamespace(n_elements=n) for n in (1000, 100 << 20)]  # the large one streams in 32 MiB chunks
    assert tensors_in_flight(None, plan, 16) == 16
    assert tensors_in_flight(1.5, plan, 16) == 4  # (1.5 GiB − 1 GiB) // (4 × 32 MiB)
    assert tensors_in_flight(64.0, plan, 16) == 16
    assert tensors_in_flight(1.2, [SimpleNamespace(n_elements=CHUNK_ELEMENTS // 2)], 16) == 3
    with pytest.raises(UnsupportedError) as refused:
        tensors_in_flight(1.1, plan, 16)
    assert refused.value.one_line() == (
        "--max-memory 1.1: too small: a conversion needs at least 1.2 GB (1.0 GB for the process: Python, torch, "
        "Prefect; 128.0 MB for one tensor in flight) (hint: allow at least --max-memory 1.2)")
