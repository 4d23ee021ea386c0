"""llama-quantize's mix rules, without a conversion: names refused with advice, the 70B rule."""


import gguf
import pytest
from support.published import gguf_path, release  # noqa: F401

from so8t_core.constants import quant_type
from so8t_core.errors import UnsupportedError
from so8t_core.quantize.mixes import ModelShape, assign_types


def test_q8_k_is_refused_with_advice():
    with pytest.raises(UnsupportedError, match="not a file type.*Q8_0"):
        quant_type("Q8_K")


def test_70b_attn_v_rule():
    names = [(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)]
    shape = ModelShape(arch="llama", n_layers=80, n_heads=64, n_kv_heads=8)
    types = assign_types(names, quant_type("Q4_K_S"), shape)
    assert set(types) == {gguf.GGMLQuantizationType.Q5_K}  # Q4_K bumped to Q5_K for 70B
