"""lora-gguf: a PEFT adapter as a llama.cpp LoRA adapter GGUF in the baked model's space.

The oracle is the merged model: llama.cpp running the base F32 GGUF with the adapter GGUF must
give the logits of the F32 GGUF that ``convert --lora`` merged (same token ids, real llama.cpp)."""

import hashlib
import json
import os
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
from support.cli import run
from support.lora import FIXTURE, write_adapter
from support.published import gguf_path

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import checkpoint_model
from so8t_core.assemble import lora_gguf
from so8t_core.assemble.lora_gguf import check_adapter_file, write_lora_gguf
from so8t_core.constants import Keys
from so8t_core.errors import CheckpointError, StorageError, UnsupportedError, ValidationError
from so8t_core.gguf_file import TensorInfo, kv_str, read_gguf, write_gguf
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.source.lora import load_adapter
from so8t_core.validate.checks import validate_file, validation_token_ids

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Base + adapter in llama.cpp vs the merged F32 model: the same sums in another order
# (W·x + s·B·(A·x) against (W + s·B·A)·x), so they agree to float32 rounding: measured max
# |Δlogit| 4e-6 to 1e-5 on logits that the adapter moves by 6 to 21.
LOGIT_TOLERANCE = 1e-4
N_TOKENS = 64


def llama_logits(model: str, ids, lora: str | None = None) -> np.ndarray:
    # An F32 KV cache: with F16, K and V computed in a different order round to different halves.
    llm = llama_cpp.Llama(model_path=model, lora_path=lora, logits_all=True, n_ctx=128, n_batch=128,
                          n_threads=2, n_gpu_layers=0, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def f32_gguf(src, out, lora=None) -> str:
    convert(ConvertParams(source=src, output=str(out), quants=["F32"], run_validation=False,
                          work_dir=str(out) + "-work", name="fx", lora=lora))
    return str(gguf_path(out, "fx", "F32"))


CASES = {
    # permute_q / permute_k, the gate folded into o_proj's input (A rotated), plain copies
    "llama-pre": (dict(FIXTURE), ALL_LLAMA, False),
    # the gate after o_proj (B rotated; with a bias, baked separately), rsLoRA scaling
    "llama-post-rslora": (dict(FIXTURE, position="post_o_proj", attention_bias=True),
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj"), True),
    # Phi-3's fused qkv_proj and gate_up_proj are single GGUF tensors: their pairs are copied
    "phi3-fused": (dict(arch="phi3"), ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_gguf_in_llama_cpp_equals_the_merged_model(make_fixture, tmp_path, monkeypatch, case):
    spec, modules, rslora = CASES[case]
    # llama.cpp treats a vocabulary as Phi-3's by general.name, which comes from the folder name.
    src = str(shutil.copytree(make_fixture(**spec), tmp_path / f"tiny-{spec.get('arch', 'llama')}"))
    adapter = write_adapter(tmp_path / "adapter", src, modules=modules, rslora=rslora, std=0.1)
    base = f32_gguf(src, tmp_path / "base")
    merged = f32_gguf(src, tmp_path / "merged", lora=adapter)
    out = tmp_path / "adapter.gguf"
    result = write_lora_gguf(adapter, src, str(out))

    ids = validation_token_ids(Checkpoint.open(src))[:N_TOKENS]
    with_adapter = llama_logits(base, ids, lora=str(out))
    want = llama_logits(merged, ids)
    plain = llama_logits(base, ids)
    diff = float(np.abs(with_adapter - want).max())
    effect = float(np.abs(plain - want).max())
    print(f"{case}: max |logit(base+adapter) - logit(merged)| = {diff:.3g}; adapter effect {effect:.3g}")
    assert diff < LOGIT_TOLERANCE
    assert effect > 1000 * LOGIT_TOLERANCE  # the adapter changes the model a lot, so the match means something
    assert (with_adapter.argmax(-1) == want.argmax(-1)).all()
    if spec.get("arch", "llama") == "llama":
        # The same pairs without the base's permutation and rotation are far off: the transforms matter.
        monkeypatch.setattr(lora_gguf, "baked_pair", lambda adapter, item, ckpt: adapter.pair_arrays(item.source))
        write_lora_gguf(adapter, src, str(tmp_path / "naive.gguf"))
        naive = float(np.abs(llama_logits(base, ids, lora=str(tmp_path / "naive.gguf")) - want).max())
        print(f"{case}: the pairs as PEFT saved them: {naive:.3g}")
        assert naive > 100 * LOGIT_TOLERANCE

    # What llama.cpp reads, and where it came from.
    g = read_gguf(str(out))
    a = load_adapter(adapter)
    assert g.value("general.type") == "adapter" and g.value("adapter.type") == "lora"
    assert g.value("adapter.lora.alpha") == pytest.approx(a.scale * a.r, rel=1e-6)
    assert g.value(Keys.LORA_SHA256) == a.sha256 == result["adapter_sha256"]
    assert result["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert g.value(Keys.SOURCE_FINGERPRINT) == read_gguf(base).value(Keys.SOURCE_FINGERPRINT)
    assert g.value(Keys.LORA_SCALING) == ("rslora" if rslora else "lora")
    assert len(g.tensors) == 2 * len(modules) * 2 == result["tensors"]
    assert all(t.tensor_type.name == "F32" for t in g.tensors)


def test_same_inputs_same_bytes(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    adapter = write_adapter(tmp_path / "adapter", src)
    first = write_lora_gguf(adapter, src, str(tmp_path / "one.gguf"))
    second = write_lora_gguf(adapter, src, str(tmp_path / "two.gguf"))
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()
    assert first["sha256"] == second["sha256"]


def test_refusals(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    # Shapes of another model.
    other = make_fixture(**{**FIXTURE, "hidden": 128, "intermediate": 256})
    with pytest.raises(CheckpointError, match="but the weight is"):
        write_lora_gguf(write_adapter(tmp_path / "shape", other), src, str(tmp_path / "x.gguf"))
    # lora_alpha 0: llama.cpp would read it as scale 1.
    with pytest.raises(UnsupportedError, match="lora_alpha is 0"):
        write_lora_gguf(write_adapter(tmp_path / "zero", src, alpha=0.0), src, str(tmp_path / "x.gguf"))
    # A Linear-style pair on the token embedding (llama.cpp wants embedding LoRA in another layout).
    from safetensors.numpy import save_file

    d = write_adapter(tmp_path / "embd", src, modules=("self_attn.q_proj",), layers=(0,))
    rng = np.random.default_rng(0)
    save_file({"base_model.model.model.embed_tokens.lora_A.weight": rng.standard_normal((4, 64), np.float32),
               "base_model.model.model.embed_tokens.lora_B.weight": rng.standard_normal((384, 4), np.float32)},
              os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match="token_embd"):
        write_lora_gguf(d, src, str(tmp_path / "x.gguf"))
    with pytest.raises(UnsupportedError, match="local path"):
        write_lora_gguf(write_adapter(tmp_path / "ok", src), src, "s3://bucket/x.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        write_lora_gguf(str(tmp_path / "ok"), src, str(tmp_path / "dir.gguf"))
    assert not (tmp_path / "x.gguf").exists()




def test_validate_runs_base_and_adapter_against_the_merged_reference(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    peft = write_adapter(tmp_path / "adapter", src, std=0.1)
    convert(ConvertParams(source=src, output=str(tmp_path / "base"), quants=["F32", "Q8_0"], run_validation=False,
                          work_dir=str(tmp_path / "work"), name="fx"))
    f32, q8 = (str(gguf_path(tmp_path / "base", "fx", q)) for q in ("F32", "Q8_0"))
    adapter = str(tmp_path / "adapter.gguf")
    write_lora_gguf(peft, src, adapter)

    # The CLI on F32: the tight gate (mean KLD ≤ 1e-4, top-1 ≥ 99.5%), the adapter file equal to the pairs.
    out = run("validate", f32, "--reference", src, "--lora", adapter, "--lora-reference", peft, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["passed"] and report["adapter"]["ok"] and report["adapter"]["max_abs_diff"] == 0.0
    assert report["adapter"]["pairs"] == 6
    assert report["llama_cpp"]["mean_kld"] < 1e-4 and report["llama_cpp"]["top1_agreement"] >= 0.995

    # The adapter works on a quantized base too (Q8_0's gate).
    report = validate_file(q8, Checkpoint.open(src), lora=(adapter, load_adapter(peft)))
    assert report["passed"], report["failures"]

    # Checked against another PEFT adapter (same shapes), the file and the logits both fail: exit 1.
    other = write_adapter(tmp_path / "other", src, std=0.1, seed=1)
    out = run("validate", f32, "--reference", src, "--lora", adapter, "--lora-reference", other)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("  LoRA adapter") and line.endswith("FAILED") for line in lines)
    assert any("problem: so8t.lora.sha256" in line for line in lines)
    assert lines[-1].startswith("FAILED:") and "adapter" in lines[-1] and "llama_cpp" in lines[-1]


def test_an_adapter_gguf_made_for_another_base_is_named_as_such(make_fixture, tmp_path):
    src, other_base = make_fixture(**FIXTURE), make_fixture(**{**FIXTURE, "seed": 6})  # same shapes
    peft = write_adapter(tmp_path / "adapter", other_base)
    foreign = str(tmp_path / "foreign.gguf")
    write_lora_gguf(peft, other_base, foreign)
    ckpt = Checkpoint.open(src)
    spec, _, plan = checkpoint_model(ckpt)
    base_fingerprint = fingerprint(ckpt).fingerprint
    check = check_adapter_file(read_gguf(foreign), load_adapter(peft), ckpt, plan, spec.arch, base_fingerprint)
    assert not check["ok"] and any("another base" in p for p in check["problems"])
    # The same adapter made for this base passes.
    write_lora_gguf(peft, src, str(tmp_path / "own.gguf"))
    check = check_adapter_file(read_gguf(str(tmp_path / "own.gguf")), load_adapter(peft), ckpt, plan, spec.arch,
                               base_fingerprint)
    assert check["ok"], check["problems"]
    # A model GGUF is not an adapter.
    model = str(tmp_path / "model.gguf")
    weight = np.zeros((2, 2), np.float32)
    write_gguf(model, "llama", [kv_str("general.type", "model")],
               [TensorInfo("output_norm.weight", weight.shape, gguf.GGMLQuantizationType.F32, weight.nbytes)],
               lambda t: weight.tobytes())
    with pytest.raises(ValidationError, match="not a LoRA adapter GGUF"):
        check_adapter_file(read_gguf(model), load_adapter(peft), ckpt, plan, spec.arch, None)
