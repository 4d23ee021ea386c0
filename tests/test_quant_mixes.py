"""Every mix, byte for byte: each tensor of our GGUF has the type and the bytes that llama.cpp's own
llama-quantize (llama_model_quantize) writes from our F32 GGUF, without an importance matrix and
with the same (synthetic) one; and a mix we refuse is one llama-quantize refuses too."""


import gguf
import pytest
from support.imatrix_files import write_synthetic_imatrix
from support.llama_cpp_oracle import FIXTURES, assert_same_tensors, llama_quantize
from support.published import gguf_path, release  # noqa: F401

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import checkpoint_model
from so8t_core.constants import QUANT_TYPES
from so8t_core.errors import UnsupportedError
from so8t_core.quantize.engines import resolve_engine
from so8t_core.quantize.imatrix import load_imatrix
from so8t_core.quantize.mixes import MixOptions, ModelShape, mix_types, use_more_bits
from so8t_core.source.checkpoint import Checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

MIXES = [q for q in QUANT_TYPES if q != "F32"]


def refusals(src: str, covered: set[str] | None) -> dict[str, str]:
    """The mixes so8t-gguf refuses on this checkpoint before any work, with why."""
    spec, _, plan = checkpoint_model(Checkpoint.open(src))
    out = {}
    for mix in MIXES:
        try:
            mix_types(plan, [mix], ModelShape.from_spec(spec), MixOptions(has_imatrix=covered is not None), covered)
        except UnsupportedError as exc:
            out[mix] = str(exc)
    return out


@pytest.fixture(scope="module", params=[(case, im) for case in FIXTURES for im in ("plain", "imatrix")],
                ids=lambda p: "-".join(p))
def converted(request, make_fixture, tmp_path_factory):
    """Every mix the fixture allows, converted in one run (with the synthetic imatrix, or none)."""
    case, with_imatrix = request.param
    src = make_fixture(**FIXTURES[case])
    out = tmp_path_factory.mktemp(f"{case}-{with_imatrix}")
    imatrix = None
    if with_imatrix == "imatrix":
        imatrix = str(out / "imatrix.gguf")
        write_synthetic_imatrix(imatrix, src)
    refused = refusals(src, set(load_imatrix(imatrix).entries) if imatrix else None)
    convert(ConvertParams(source=src, output=str(out), quants=["F32", *(m for m in MIXES if m not in refused)],
                          run_validation=False, work_dir=str(out / "w"), name="fx", imatrix=imatrix))
    return case, out, imatrix, refused


@pytest.mark.parametrize("mix", MIXES)
def test_mix_is_byte_identical_to_llama_quantize(converted, mix, tmp_path):
    case, out, imatrix, refused = converted
    theirs = str(tmp_path / f"llama-{mix}.gguf")
    entries = load_imatrix(imatrix).entries if imatrix else None
    status = llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES[mix].file_type),
                            imatrix=entries, check=mix not in refused)
    if mix in refused:
        assert status != 0, f"llama-quantize writes the {mix} we refuse ({refused[mix]})"
        return
    types = assert_same_tensors(str(gguf_path(out, "fx", mix)), theirs)
    if case == "llama-256" and mix == "Q4_K_M" and not imatrix:  # the rules really did something
        assert types["output.weight"] == "Q6_K" and types["blk.3.attn_q.weight"] == "Q4_K"
        assert {int(n.split(".")[1]) for n, t in types.items() if "ffn_down" in n and t == "Q6_K"} == \
            {i for i in range(8) if use_more_bits(i, 8)}
    if case == "qwen2-896-tied" and mix == "Q4_K_M":
        assert types["token_embd.weight"] == "Q8_0"  # tied: output rule, 896 % 256 ≠ 0 → Q8_0
        assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K falls back
    if case == "llama-256" and mix == "IQ4_XS":  # the first eighth of ffn_down: Q5_K unless there is an imatrix
        assert types["blk.0.ffn_down.weight"] == ("IQ4_XS" if imatrix else "Q5_K")
        assert types["blk.0.attn_v.weight"] == "Q5_K"  # n_gqa 4
    if case == "llama-256" and mix == "IQ2_M":
        assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "IQ3_S"
        assert types["blk.0.ffn_down.weight"] == "IQ3_S" and types["blk.1.ffn_down.weight"] == "IQ2_S"
    if case == "qwen2-896-tied" and mix == "IQ2_XXS":  # rows of 896 fall back to IQ4_NL
        assert types["blk.0.attn_q.weight"] == "IQ4_NL" and types["token_embd.weight"] == "Q8_0"
        assert types["blk.0.ffn_down.weight"] == "IQ2_XXS"  # rows of 256 (intermediate); 2 layers: n/8 = 0


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


def test_every_engine_writes_the_same_files(make_fixture, tmp_path):
    src = make_fixture(**FIXTURES["mistral-256"])
    assert resolve_engine("auto") == "simd"  # no GPU here: the SIMD kernels are the default
    for engine in ("ggml", "simd", "torch"):
        convert(ConvertParams(source=src, output=str(tmp_path / engine), quants=["Q4_K_M", "Q3_K_S", "Q5_1", "IQ4_NL"],
                              run_validation=False, work_dir=str(tmp_path / f"w-{engine}"), name="fx", engine=engine))
    for mix in ("Q4_K_M", "Q3_K_S", "Q5_1", "IQ4_NL"):  # IQ4_NL: the torch engine hands it to ggml
        a = gguf_path(tmp_path / "ggml", "fx", mix).read_bytes()
        assert a == gguf_path(tmp_path / "simd", "fx", mix).read_bytes(), mix
        assert a == gguf_path(tmp_path / "torch", "fx", mix).read_bytes(), mix
