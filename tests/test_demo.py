"""The embedded demo, converted by the flow exactly as `make run` does, checked against the issue's bars."""

import json

import numpy as np
import pytest
from support.published import gguf_path
from support.published import release as release_dir

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import analyze
from so8t_core.gguf_file import read_gguf
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.plan import permute_qk
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.testing.demo import DEMO_GATED_LAYERS, unpermute_qk
from so8t_core.testing.tokenizers import smollm2_gguf_path

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]
DEMO = "smollm2-135m-so8t-demo"


@pytest.fixture(scope="module")
def release(tmp_path_factory, demo_checkpoint):
    out = tmp_path_factory.mktemp("release")
    result = convert(ConvertParams(source=None, output=str(out), quants=["F32", "Q8_0"]))
    return out, result


def test_f32_matches_the_pytorch_reference_in_llama_cpp(release):
    _, result = release
    f = result["validation"]["F32"]["llama_cpp"]
    assert f["n_tokens"] >= 256
    assert f["mean_kld"] < 1e-4 and f["top1_agreement"] >= 0.995
    q = result["validation"]["Q8_0"]
    assert q["passed"] and q["llama_cpp"]["mean_kld"] < 0.03


def test_llama_cpp_generates_sensible_text_from_the_q8_0_file(release):
    out, _ = release
    with LlamaCppModel(str(gguf_path(out, DEMO, "Q8_0")), n_ctx=512) as model:
        reply = model.generate_chat("What is the capital of France?", max_tokens=24)
    assert "Paris" in reply


def test_gguf_metadata_and_provenance(release):
    out, result = release
    g = read_gguf(str(gguf_path(out, DEMO, "Q8_0")))
    assert g.value("general.architecture") == "llama" and g.value("general.file_type") == 7
    assert g.value("so8t.baked_layers") == list(DEMO_GATED_LAYERS)
    assert g.value("so8t.rotation") == "cayley" and g.value("so8t.position") == "pre_o_proj"
    assert g.value("so8t.source_fingerprint") == result["fingerprint"]
    assert 0 < g.value("so8t.max_bake_error") < 1e-6
    assert g.value("tokenizer.ggml.pre") == "smollm" and len(g.value("tokenizer.ggml.tokens")) == 49152
    assert "<|im_start|>" in g.value("tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in g.tensors}
    assert len(types) == 272 and types["blk.3.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"


def test_unbaked_tensors_round_trip_to_the_original_smollm2_weights(release):
    """Q/K go HF layout and back: non-gated layers equal the original GGUF (after bf16 rounding)."""
    out, _ = release
    ours = read_gguf(str(gguf_path(out, DEMO, "F32")))
    original = read_gguf(smollm2_gguf_path())
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_output.weight", "token_embd.weight"):
        a = ours.dequantized(ours.tensor(name))
        b = original.dequantized(original.tensor(name))
        bf16 = (b.view(np.uint32) + 0x7FFF + ((b.view(np.uint32) >> 16) & 1)) >> 16 << 16
        np.testing.assert_array_equal(a, bf16.astype(np.uint32).view(np.float32), err_msg=name)
    q = original.dequantized(original.tensor("blk.1.attn_q.weight"))
    np.testing.assert_array_equal(permute_qk(unpermute_qk(q, 9), 9), q)
    baked = ours.dequantized(ours.tensor("blk.4.attn_output.weight"))
    assert not np.allclose(baked, original.dequantized(original.tensor("blk.4.attn_output.weight")), atol=1e-3)


def test_sidecar_holds_the_triality_heads(release, demo_checkpoint):
    from so8t_core.source.checkpoint import Checkpoint

    out, _ = release
    side = read_gguf(str(release_dir(out, DEMO, "Q8_0") / "smollm2-135m-so8t-demo.so8t-heads.gguf"))
    assert side.value("general.architecture") == "so8t-heads"
    assert side.value("so8t.heads.names") == ["safety", "authority"]
    assert side.value("so8t.heads.safety.labels") == ["safe", "unsafe"]
    assert side.value("so8t.heads.input") == "output_norm"
    ckpt = Checkpoint.open(demo_checkpoint)
    np.testing.assert_array_equal(side.dequantized(side.tensor("safety_head.weight")),
                                  ckpt.read("so8t.triality.safety_head.weight"))
    assert {t.name for t in side.tensors} == {"safety_head.weight", "safety_head.bias", "authority_head.weight",
                                              "authority_head.bias"}


def test_model_card_states_facts_from_the_run(release):
    out, result = release
    out = release_dir(out, DEMO, "F32")
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        if name != "README.md":
            assert info["sha256"] in card
    assert "[0, 4, 8, 12, 16, 20, 24, 28]" in card and "smollm2-135m-so8t-demo.so8t-heads.gguf" in card
    assert "training loss only" in card and "| F32 | 358 |" in card
    assert "same ids (" in card  # tokenizer parity
    # An Ollama Modelfile with SmolLM2's ChatML template and its turn-ending token.
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in card
    assert 'PARAMETER stop "<|im_end|>"' in card
    assert "](smollm2-135m-so8t-demo-F32.errors.png)" in card


def test_demo_checkpoint_is_byte_identical_on_every_build(demo_checkpoint, tmp_path):
    import hashlib
    import os

    from so8t_core.testing.demo import build_demo_checkpoint

    again = build_demo_checkpoint(str(tmp_path / "again"))
    names = sorted(os.listdir(demo_checkpoint))
    assert names == sorted(os.listdir(again)) and len([n for n in names if n.endswith(".safetensors")]) == 2
    for name in names:
        a = hashlib.sha256(open(os.path.join(demo_checkpoint, name), "rb").read()).hexdigest()
        b = hashlib.sha256(open(os.path.join(again, name), "rb").read()).hexdigest()
        assert a == b, name


def test_demo_analysis(demo_checkpoint):
    a = analyze(Checkpoint.open(demo_checkpoint))
    assert a["shards"] == 2 and a["parameters"]["total"] == 134_554_180
    assert a["gated_layers"] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert all(g["max_orthogonality_error"] < 1e-12 for g in a["rotation_gates"])
    assert a["gguf_tensors"] == 272  # SmolLM2 ties embeddings: no output.weight
