"""llama-quantize's mix rules, without a conversion: names refused with advice, the 70B rule, what is
refused without an importance matrix, the new types' fallbacks."""


import os
import re
import shutil
import subprocess
import sys

import gguf
import pytest
from gguf import GGMLQuantizationType as T
from support.published import gguf_path, release  # noqa: F401

from so8t_core.constants import ggml_type, quant_type
from so8t_core.errors import UnsupportedError
from so8t_core.quantize.mixes import MixOptions, ModelShape, assign_types, mix_types


def test_q8_k_is_refused_with_advice():
    with pytest.raises(UnsupportedError, match="not a file type.*Q8_0"):
        quant_type("Q8_K")


def test_70b_attn_v_rule():
    names = [(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)]
    shape = ModelShape(arch="llama", n_layers=80, n_heads=64, n_kv_heads=8)
    types = assign_types(names, quant_type("Q4_K_S"), shape)
    assert set(types) == {gguf.GGMLQuantizationType.Q5_K}  # Q4_K bumped to Q5_K for 70B


def dense_model(layers: int, hidden: int, intermediate: int, tied: bool = False) -> list[tuple[str, tuple]]:
    """A llama-style model's tensors, in llama.cpp's order: (GGUF name, numpy shape)."""
    top = [] if tied else [("output.weight", (512, hidden))]
    top += [("output_norm.weight", (hidden,)), ("token_embd.weight", (512, hidden))]
    shapes = {"attn_k": (hidden // 4, hidden), "attn_norm": (hidden,), "attn_output": (hidden, hidden),
              "attn_q": (hidden, hidden), "attn_v": (hidden // 4, hidden), "ffn_down": (hidden, intermediate),
              "ffn_gate": (intermediate, hidden), "ffn_norm": (hidden,), "ffn_up": (intermediate, hidden)}
    blocks = [(f"blk.{i}.{n}.weight", shape) for i in range(layers) for n, shape in sorted(shapes.items())]
    return top + blocks


class _Plan:
    def __init__(self, name, shape):
        self.gguf_name, self.shape = name, shape


SHAPE = ModelShape(arch="llama", n_layers=8, n_heads=8, n_kv_heads=2)


def plan_of(tensors):
    return [_Plan(n, s) for n, s in tensors]


def test_very_low_bit_mixes_need_an_importance_matrix():
    plan = plan_of(dense_model(8, 256, 512))
    for mix in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"):
        with pytest.raises(UnsupportedError,
                           match=f"refuses {mix} without an importance matrix.*--calibration.*--imatrix"):
            mix_types(plan, [mix], SHAPE)
    weights = {p.gguf_name for p in plan if len(p.shape) == 2} - {"token_embd.weight", "output.weight"}
    types = mix_types(plan, ["IQ2_XXS"], SHAPE, MixOptions(has_imatrix=True), weights)["IQ2_XXS"]
    assert types[0] == T.Q5_K and types[2] == T.Q2_K  # output, token_embd: exempt, and given more bits
    with pytest.raises(UnsupportedError, match="no entry for blk.3.ffn_up.weight, which IQ2_XXS makes IQ2_XXS"):
        mix_types(plan, ["IQ2_XXS"], SHAPE, MixOptions(has_imatrix=True), weights - {"blk.3.ffn_up.weight"})
    # IQ3_S and the 4-bit IQ mixes do without one, as llama-quantize does
    assert mix_types(plan, ["IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "TQ1_0", "Q1_0", "MXFP4_MOE"], SHAPE)


def test_libggml_types_that_need_importance_data_are_refused_where_llama_quantize_would_abort():
    plan = plan_of(dense_model(2, 256, 512))
    with pytest.raises(UnsupportedError, match="token_embd.weight would be IQ1_S.*without importance data"):
        mix_types(plan, ["Q4_K_M"], SHAPE, MixOptions(token_embedding_type=T.IQ1_S))


def test_fallbacks_of_the_new_types():
    # rows of 576 (the demo): the IQ types fall back to IQ4_NL, the ternary ones to Q4_0; Q1_0 has no fallback
    plan = plan_of(dense_model(8, 576, 1536))
    types = dict(zip([p.gguf_name for p in plan], mix_types(plan, ["IQ3_S"], SHAPE)["IQ3_S"]))
    assert types["blk.2.attn_q.weight"] == T.IQ4_NL and types["blk.2.ffn_down.weight"] == T.IQ3_S
    types = dict(zip([p.gguf_name for p in plan], mix_types(plan, ["TQ2_0"], SHAPE)["TQ2_0"]))
    assert types["blk.2.attn_q.weight"] == T.Q4_0 and types["blk.2.ffn_down.weight"] == T.TQ2_0
    with pytest.raises(UnsupportedError, match="rows of 576, not a multiple of Q1_0's 128.*no fallback"):
        mix_types(plan, ["Q1_0"], SHAPE)
    # rows that are not even a multiple of 32: F16, as for the K types
    odd = plan_of(dense_model(1, 256, 48))
    types = dict(zip([p.gguf_name for p in odd], mix_types(odd, ["IQ4_NL"], SHAPE)["IQ4_NL"]))
    assert types["blk.0.ffn_down.weight"] == T.F16


def test_the_q2_0_mix():
    # Blocks of 64, so the demo's rows of 576 fit; token_embd gets Q4_K (Q5_0: 576 is no multiple of 256),
    # output Q6_K (Q8_0 likewise); no importance matrix is needed (its quantizer reads none).
    plan = plan_of(dense_model(8, 576, 1536))
    types = dict(zip([p.gguf_name for p in plan], mix_types(plan, ["Q2_0"], SHAPE)["Q2_0"]))
    assert quant_type("q2_0").file_type == gguf.LlamaFileType.MOSTLY_Q2_0
    assert {types[f"blk.{i}.{n}.weight"] for i in range(8) for n in ("attn_q", "attn_v", "ffn_down")} == {T.Q2_0}
    assert types["token_embd.weight"] == T.Q5_0 and types["output.weight"] == T.Q8_0
    # rows of 256: no fallbacks; tied embeddings take the output rule; rows of 96 fall back to Q4_0, of 48 to F16
    for hidden, intermediate, tied, embd, down in ((256, 512, False, T.Q4_K, T.Q2_0), (256, 96, True, T.Q6_K, T.Q4_0),
                                                   (256, 48, False, T.Q4_K, T.F16)):
        plan = plan_of(dense_model(2, hidden, intermediate, tied))
        types = dict(zip([p.gguf_name for p in plan], mix_types(plan, ["Q2_0"], SHAPE)["Q2_0"]))
        assert (types["token_embd.weight"], types["blk.1.ffn_down.weight"]) == (embd, down)
    assert ggml_type("Q2_0", "--tensor-type") == T.Q2_0


def test_q2_0_is_refused_with_how_to_get_it_when_the_installed_gguf_lacks_it(tmp_path):
    """PyPI's gguf 0.19.0 (what `pip install so8t-gguf` brings) is the pinned llama.cpp's gguf-py without
    Q2_0: that package with its three Q2_0 lines removed stands in for it."""
    shutil.copytree(os.path.dirname(gguf.__file__), tmp_path / "gguf", ignore=shutil.ignore_patterns("__pycache__"))
    constants = tmp_path / "gguf" / "constants.py"
    lines = constants.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not re.match(r"\s*(MOSTLY_Q2_0\s*=|Q2_0\s*=|GGMLQuantizationType\.Q2_0:)", line)]
    assert len(lines) - len(kept) == 3
    constants.write_text("".join(kept))
    script = """
import gguf
from so8t_core.constants import QUANT_TYPES, ggml_type, quant_type
from so8t_core.errors import UnsupportedError
from so8t_core.quantize import mixes, staging
assert not hasattr(gguf.GGMLQuantizationType, "Q2_0") and "Q2_0" not in QUANT_TYPES
for ask in (lambda: quant_type("q2_0"), lambda: ggml_type("q2_0", "--tensor-type")):
    try:
        ask()
    except UnsupportedError as exc:
        print(exc)
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    quant, tensor_type = out.splitlines()
    assert quant.startswith("--quant q2_0: the installed gguf (PyPI's 0.19.0) has no Q2_0 tensor type")
    assert "pip install --no-deps" in quant and "vendor/llama.cpp/gguf-py" in quant and "make install" in quant
    assert tensor_type.startswith("--tensor-type: the installed gguf")


def test_every_mix_has_a_validation_gate():
    from so8t_core.constants import QUANT_TYPES
    from so8t_core.validate.checks import GATES

    assert set(GATES) == set(QUANT_TYPES)
