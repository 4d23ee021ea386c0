"""Every mix, byte for byte: each tensor of our GGUF has the type and the bytes that llama.cpp's own
llama-quantize (llama_model_quantize) writes from our F32 GGUF."""

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest
from published import gguf_path, release  # noqa: F401

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.constants import QUANT_TYPES, quant_type
from so8t_core.errors import UnsupportedError
from so8t_core.gguf_file import read_gguf
from so8t_core.quantize.engines import resolve_engine
from so8t_core.quantize.mixes import ModelShape, assign_types, use_more_bits

pytestmark = pytest.mark.usefixtures("prefect_server")

MIXES = [q for q in QUANT_TYPES if q != "F32"]
FIXTURES = {
    # rows of 256: K-quants apply; 8 layers so use_more_bits picks a non-trivial set
    "llama-256": dict(arch="llama", layers=8, hidden=256, heads=4, kv_heads=1, intermediate=512, vocab=512),
    # hidden 896, tied: most K-quants fall back; the tied embedding takes the output rule
    "qwen2-896-tied": dict(arch="qwen2", layers=2, hidden=896, heads=14, kv_heads=2, intermediate=256, tied=True),
    # fused attn_qkv follows the attn_v rules
    "phi3-256": dict(arch="phi3", layers=4, hidden=256, heads=4, kv_heads=4, intermediate=512),
    # mistral (a llama in GGUF) with GQA 8 (Q2_K's attn_v rule); qwen3 with head_dim ≠ hidden/heads
    "mistral-256": dict(arch="mistral", layers=3, hidden=256, heads=8, kv_heads=1, intermediate=512),
    "qwen3-256": dict(arch="qwen3", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=128, intermediate=256),
}


def llama_quantize(src: str, dst: str, ftype: int, pure=False, output_type=None, embd_type=None, overrides=()):
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = pure
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if embd_type is not None:
        params.token_embedding_type = int(embd_type)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            arr[i].pattern, arr[i].type = pattern.encode(), int(qtype)
        arr[len(overrides)].pattern, arr[len(overrides)].type = None, llama_cpp.GGML_TYPE_COUNT  # terminator
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) == 0


def assert_same_tensors(ours: str, theirs: str) -> dict:
    a, b = read_gguf(ours), read_gguf(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    types = {}
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, (name, ta[name].tensor_type.name, t.tensor_type.name)
        assert np.ascontiguousarray(ta[name].data).tobytes() == np.ascontiguousarray(t.data).tobytes(), name
        types[name] = t.tensor_type.name
    assert a.value("general.file_type") == b.value("general.file_type")
    assert a.value("general.quantization_version") == b.value("general.quantization_version") == 2
    return types


@pytest.fixture(scope="module", params=list(FIXTURES))
def converted(request, make_fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    convert(ConvertParams(source=make_fixture(**FIXTURES[request.param]), output=str(out), quants=["F32", *MIXES],
                          run_validation=False, work_dir=str(out / "w"), name="fx"))  # the default engine: simd on CPU
    return request.param, out


@pytest.mark.parametrize("mix", MIXES)
def test_mix_is_byte_identical_to_llama_quantize(converted, mix, tmp_path):
    case, out = converted
    theirs = str(tmp_path / f"llama-{mix}.gguf")
    llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES[mix].file_type))
    types = assert_same_tensors(str(gguf_path(out, "fx", mix)), theirs)
    if case == "llama-256" and mix == "Q4_K_M":  # the rules really did something
        assert types["output.weight"] == "Q6_K" and types["blk.3.attn_q.weight"] == "Q4_K"
        assert {int(n.split(".")[1]) for n, t in types.items() if "ffn_down" in n and t == "Q6_K"} == \
            {i for i in range(8) if use_more_bits(i, 8)}
    if case == "qwen2-896-tied" and mix == "Q4_K_M":
        assert types["token_embd.weight"] == "Q8_0"  # tied: output rule, 896 % 256 ≠ 0 → Q8_0
        assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K falls back


def test_overrides_match_llama_quantize(make_fixture, tmp_path):
    T = gguf.GGMLQuantizationType
    src = make_fixture(**FIXTURES["llama-256"])
    out = tmp_path / "out"
    convert(ConvertParams(source=src, output=str(out), quants=["F32", "Q4_K_M"], run_validation=False,
                          work_dir=str(tmp_path / "w"), name="fx", tensor_types=["attn_q=q8_0", "ffn_(up|gate)=Q5_K"],
                          output_tensor_type="q4_k", token_embedding_type="Q8_0"))
    theirs = str(tmp_path / "llama.gguf")
    llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES["Q4_K_M"].file_type), output_type=T.Q4_K,
                   embd_type=T.Q8_0, overrides=[("attn_q", T.Q8_0), ("ffn_(up|gate)", T.Q5_K)])
    types = assert_same_tensors(str(gguf_path(out, "fx", "Q4_K_M")), theirs)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "Q5_K"
    assert types["output.weight"] == "Q4_K" and types["token_embd.weight"] == "Q8_0"
    pure = tmp_path / "pure"
    convert(ConvertParams(source=src, output=str(pure), quants=["F32", "Q5_K_M"], run_validation=False,
                          work_dir=str(tmp_path / "w"), name="fx", pure=True))
    llama_quantize(str(gguf_path(pure, "fx", "F32")), str(tmp_path / "lp.gguf"), int(QUANT_TYPES["Q5_K_M"].file_type),
                   pure=True)
    types = assert_same_tensors(str(gguf_path(pure, "fx", "Q5_K_M")), str(tmp_path / "lp.gguf"))
    assert {t for n, t in types.items() if n.endswith("weight") and "norm" not in n} == {"Q5_K"}


def test_q8_k_is_refused_with_advice():
    with pytest.raises(UnsupportedError, match="not a file type.*Q8_0"):
        quant_type("Q8_K")


def test_70b_attn_v_rule():
    names = [(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)]
    shape = ModelShape(arch="llama", n_layers=80, n_heads=64, n_kv_heads=8)
    types = assign_types(names, quant_type("Q4_K_S"), shape)
    assert set(types) == {gguf.GGMLQuantizationType.Q5_K}  # Q4_K bumped to Q5_K for 70B


def test_every_engine_writes_the_same_files(make_fixture, tmp_path):
    src = make_fixture(**FIXTURES["mistral-256"])
    assert resolve_engine("auto") == "simd"  # no GPU here: the SIMD kernels are the default
    for engine in ("ggml", "simd", "torch"):
        convert(ConvertParams(source=src, output=str(tmp_path / engine), quants=["Q4_K_M", "Q3_K_S", "Q5_1"],
                              run_validation=False, work_dir=str(tmp_path / f"w-{engine}"), name="fx", engine=engine))
    for mix in ("Q4_K_M", "Q3_K_S", "Q5_1"):
        a = gguf_path(tmp_path / "ggml", "fx", mix).read_bytes()
        assert a == gguf_path(tmp_path / "simd", "fx", mix).read_bytes(), mix
        assert a == gguf_path(tmp_path / "torch", "fx", mix).read_bytes(), mix
