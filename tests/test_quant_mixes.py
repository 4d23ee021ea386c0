"""Every mix, byte for byte: each tensor of our GGUF has the type and the bytes that llama.cpp's own
llama-quantize (llama_model_quantize) writes from our F32 GGUF, with the importance matrix the run
computed from calibration text (`--calibration`) on a fixture of every architecture and on the demo
(IQ4_XS; its IQ2_M, IQ3_M and IQ4_XS files then answer a question in llama.cpp), and without one
on the fixtures where what no importance matrix changes differs; a mix we refuse is one
llama-quantize refuses too."""

from importlib.resources import files

import gguf
import pytest
from support.llama_cpp_oracle import FIXTURES, assert_same_tensors, llama_quantize
from support.published import gguf_path, release, releases_without_plots

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import checkpoint_model
from so8t_core.constants import QUANT_TYPES
from so8t_core.errors import UnsupportedError
from so8t_core.gguf_file import read_gguf
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.quantize.calibration import measured_weights
from so8t_core.quantize.engines import resolve_engine
from so8t_core.quantize.imatrix import load_imatrix
from so8t_core.quantize.mixes import MixOptions, ModelShape, mix_types, use_more_bits
from so8t_core.source.checkpoint import Checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

MIXES = [q for q in QUANT_TYPES if q != "F32"]
# A few short chunks of the fixtures' corpus: enough for an entry (nonzero sums) for every weight.
CALIBRATION = dict(calibration_ctx=64, calibration_chunks=4)
# Without an importance matrix, the rules differ from the run with one only in their has_imatrix
# branches, which depend on the layer index and the row length, not on the architecture; and every
# tensor takes the reference quantizers (the simd engine's), whose bytes depend on the row length.
# llama-256 has 8 layers (a first eighth, use_more_bits), qwen2-896-tied the fallbacks and a tied
# embedding; the other fixtures run with the computed importance matrix only.
PLAIN = ("llama-256", "qwen2-896-tied")


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


def calibration_text(folder) -> str:
    path = folder / "corpus.txt"
    path.write_text(files("so8t_core.testing").joinpath("fixture_corpus.txt").read_text())
    return str(path)


@pytest.fixture(scope="module", params=[*((case, "computed") for case in FIXTURES), *((c, "plain") for c in PLAIN)],
                ids=lambda p: "-".join(p))
def converted(request, make_fixture, tmp_path_factory):
    """Every mix the fixture allows, converted in one run: with the importance matrix the run
    computes on calibration text, or with none (the releases without their plots: these tests
    are about the GGUFs)."""
    case, variant = request.param
    src = make_fixture(**FIXTURES[case])
    out = tmp_path_factory.mktemp(f"{case}-{variant}")
    covered = None
    calibration = {}
    if variant == "computed":
        _, _, plan = checkpoint_model(Checkpoint.open(src))
        covered = measured_weights([(p.gguf_name, p.shape) for p in plan])
        calibration = dict(calibration=[calibration_text(out)], **CALIBRATION)
    refused = refusals(src, covered)
    with releases_without_plots():
        convert(ConvertParams(source=src, output=str(out), quants=["F32", *(m for m in MIXES if m not in refused)],
                              run_validation=False, work_dir=str(out / "w"), name="fx", **calibration))
    imatrix = None
    if covered is not None:  # the run's own, as published beside each file
        imatrix = load_imatrix(str(release(out, "fx", "F32") / "fx.imatrix.gguf"))
        assert set(imatrix.entries) == covered and imatrix.chunk_count == CALIBRATION["calibration_chunks"]
    return case, out, imatrix, refused


@pytest.mark.parametrize("mix", MIXES)
def test_mix_is_byte_identical_to_llama_quantize(converted, mix, tmp_path):
    case, out, imatrix, refused = converted
    theirs = str(tmp_path / f"llama-{mix}.gguf")
    status = llama_quantize(str(gguf_path(out, "fx", "F32")), theirs, int(QUANT_TYPES[mix].file_type),
                            imatrix=imatrix.entries if imatrix else None, check=mix not in refused)
    if mix in refused:
        assert status != 0, f"llama-quantize writes the {mix} we refuse ({refused[mix]})"
        return
    types = assert_same_tensors(str(gguf_path(out, "fx", mix)), theirs)
    if case == "llama-256" and mix == "Q4_K_M":  # the rules really did something
        assert types["output.weight"] == "Q6_K" and types["blk.3.attn_q.weight"] == "Q4_K"
        assert {int(n.split(".")[1]) for n, t in types.items() if "ffn_down" in n and t == "Q6_K"} == \
            {i for i in range(8) if use_more_bits(i, 8)}
    if case == "qwen2-896-tied" and mix == "Q4_K_M":
        assert types["token_embd.weight"] == "Q8_0"  # tied: output rule, 896 % 256 ≠ 0 → Q8_0
        assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K falls back
    if case == "gemma2-256" and mix == "Q4_K_M":  # tied: token_embd takes the output rule
        assert types["token_embd.weight"] == "Q6_K" and types["blk.0.post_ffw_norm.weight"] == "F32"
    if case == "llama-256" and mix == "IQ4_XS":  # the first eighth of ffn_down: Q5_K unless there is an imatrix
        assert types["blk.0.ffn_down.weight"] == ("IQ4_XS" if imatrix else "Q5_K")
        assert types["blk.0.attn_v.weight"] == "Q5_K"  # n_gqa 4
    if case == "llama-256" and mix == "Q4_0":  # with an imatrix, the first eighth of ffn_down goes to Q4_1
        assert types["blk.0.ffn_down.weight"] == ("Q4_1" if imatrix else "Q4_0")
    if case == "llama-256" and mix == "IQ2_M":
        assert types["output.weight"] == "Q5_K" and types["token_embd.weight"] == "IQ3_S"
        assert types["blk.0.ffn_down.weight"] == "IQ3_S" and types["blk.1.ffn_down.weight"] == "IQ2_S"
    if case == "llama-256" and mix == "Q2_0":  # the embedding's own rule (Q4_K); blocks of 64 need no fallback
        assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q2_0"
    if case == "qwen2-896-tied" and mix == "Q2_0":  # 896 = 14 × 64: Q2_0 fits where the tied embedding's Q6_K does not
        assert types["blk.0.attn_q.weight"] == "Q2_0" and types["token_embd.weight"] == "Q8_0"
    if case == "qwen2-896-tied" and mix == "IQ2_XXS":  # rows of 896 fall back to IQ4_NL
        assert types["blk.0.attn_q.weight"] == "IQ4_NL" and types["token_embd.weight"] == "Q8_0"
        assert types["blk.0.ffn_down.weight"] == "IQ2_XXS"  # rows of 256 (intermediate); 2 layers: n/8 = 0


DEMO = "smollm2-135m-so8t-demo"
DEMO_MIXES = {"IQ2_M": "IQ2_S", "IQ3_M": "IQ3_S", "IQ4_XS": "IQ4_XS"}  # mix → the type of a middle ffn_down


@pytest.fixture(scope="module")
def demo_converted(demo_checkpoint, tmp_path_factory):
    """The demo (hidden 576, so most of its rows fall back to IQ4_NL) in the IQ mixes the issue asks
    llama.cpp to chat with, with the importance matrix the run computes on two chunks of the built-in
    calibration text. The default work folder: the baked tensors test_demo.py staged are reused."""
    out = tmp_path_factory.mktemp("demo")
    with releases_without_plots():
        convert(ConvertParams(source=None, output=str(out), quants=["F32", *DEMO_MIXES], run_validation=False,
                              calibration=["builtin"], calibration_chunks=2))
    return out


@pytest.mark.parametrize("mix", DEMO_MIXES)
def test_llama_cpp_chats_with_the_demo_quantized_with_its_computed_imatrix(demo_converted, mix):
    g = read_gguf(str(gguf_path(demo_converted, DEMO, mix)))
    types = {t.name: t.tensor_type.name for t in g.tensors}
    assert types["blk.15.ffn_down.weight"] == DEMO_MIXES[mix] and types["blk.15.attn_q.weight"] == "IQ4_NL"
    assert g.value("quantize.imatrix.chunks_count") == 2 and g.value("quantize.imatrix.entries_count") == 30 * 7
    with LlamaCppModel(str(gguf_path(demo_converted, DEMO, mix)), n_ctx=256) as model:
        reply = model.generate_chat("What is the capital of France?", max_tokens=16)
    assert "Paris" in reply, reply


def test_the_demo_in_iq4_xs_with_its_computed_imatrix_is_what_llama_quantize_writes(demo_converted, tmp_path):
    """One of the three (llama_model_quantize takes ~20-50 s per demo mix here): IQ4_XS, whose
    IQ4_NL fallbacks and IQ4_XS weights both take the simd engine's importance-weighted kernels."""
    imatrix = load_imatrix(str(release(demo_converted, DEMO, "IQ4_XS") / f"{DEMO}.imatrix.gguf"))
    theirs = str(tmp_path / "llama-IQ4_XS.gguf")
    llama_quantize(str(gguf_path(demo_converted, DEMO, "F32")), theirs, int(QUANT_TYPES["IQ4_XS"].file_type),
                   imatrix=imatrix.entries)
    assert_same_tensors(str(gguf_path(demo_converted, DEMO, "IQ4_XS")), theirs)


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
    mixes = ("Q4_K_M", "Q3_K_S", "Q5_1", "IQ4_NL", "IQ4_XS")
    for engine in ("ggml", "simd", "torch"):
        convert(ConvertParams(source=src, output=str(tmp_path / engine), quants=list(mixes), run_validation=False,
                              work_dir=str(tmp_path / f"w-{engine}"), name="fx", engine=engine))
    for mix in mixes:  # IQ4_NL, IQ4_XS: the torch engine hands them to ggml
        a = gguf_path(tmp_path / "ggml", "fx", mix).read_bytes()
        assert a == gguf_path(tmp_path / "simd", "fx", mix).read_bytes(), mix
        assert a == gguf_path(tmp_path / "torch", "fx", mix).read_bytes(), mix
