"""--lora: a PEFT LoRA adapter is merged (W + scale·B@A) before the SO8T bake, validated against a
reference with the same adapter merged, and cached per affected tensor."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from support.cli import assert_one_line_error
from support.lora import FIXTURE, pair, write_adapter
from support.published import gguf_path, release

from flows.convert import convert
from flows.params import ConvertParams
from so8t_core.analysis import checkpoint_model
from so8t_core.gguf_file import read_gguf
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.lora import load_adapter
from so8t_core.source.rotation import checked_rotation, fold_into_linear
from so8t_core.validate.checks import validation_token_ids
from so8t_core.validate.reference import So8tReference

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_server")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_merged_before_the_bake_and_validated_against_the_merged_reference(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    d = write_adapter(tmp_path / "adapter", src)
    result = convert(ConvertParams(source=src, output=str(tmp_path / "out"), quants=["F32"],
                                   work_dir=str(tmp_path / "w"), name="fx", lora=d))
    f32 = result["validation"]["F32"]
    assert f32["passed"], f32["failures"]
    assert f32["llama_cpp"]["mean_kld"] < 1e-4 and f32["llama_cpp"]["top1_agreement"] >= 0.995

    # The adapter matters: the reference without it is far from the one with it.
    ckpt = Checkpoint.open(src)
    ids = validation_token_ids(ckpt)[:64]
    plain, merged = So8tReference(ckpt).logits(ids), So8tReference(ckpt, adapter=load_adapter(d)).logits(ids)
    assert np.abs(plain - merged).max() > 0.1

    # Read the GGUF back: v_proj (neither permuted nor baked) is exactly W + scale·B@A,
    # and o_proj is the bake of the merged weight (the merge came first).
    g = read_gguf(str(gguf_path(tmp_path / "out", "fx", "F32")))
    scale = 8.0 / 4
    a, b = pair(d, "model.layers.1.self_attn.v_proj.weight")
    want = ckpt.read("model.layers.1.self_attn.v_proj.weight") + scale * (b @ a)
    np.testing.assert_allclose(g.dequantized(g.tensor("blk.1.attn_v.weight")), want,
                               rtol=1e-5, atol=1e-6)
    _, _, plan = checkpoint_model(ckpt)
    item = next(p for p in plan if p.source == "model.layers.0.self_attn.o_proj.weight")
    r = checked_rotation(ckpt.read(item.gate), item.rotation, src, item.gate)
    a, b = pair(d, item.source)
    baked, _ = fold_into_linear((ckpt.read(item.source) + scale * (b @ a)).astype(np.float64), None, r,
                                item.position)
    np.testing.assert_allclose(g.dequantized(g.tensor("blk.0.attn_output.weight")), baked,
                               rtol=1e-4, atol=1e-5)

    # The adapter is named in the result, the manifest and the model card.
    lora = result["lora"]
    assert lora["sha256"] == load_adapter(d).sha256 and lora["r"] == 4 and lora["scale"] == scale
    assert lora["effective_target_modules"] == ["o_proj", "q_proj", "v_proj"]
    rel = release(tmp_path / "out", "fx", "F32")
    assert json.loads((rel / "manifest.json").read_text())["lora"]["sha256"] == lora["sha256"]
    assert lora["sha256"] in (rel / "README.md").read_text()
    assert result["fingerprint"] != result["source_fingerprint"]


def test_changing_the_adapter_restages_only_the_tensors_it_touches(make_fixture, tmp_path, quantize_calls):
    src = make_fixture(**FIXTURE)

    def run(lora=None):
        quantize_calls.clear()
        convert(ConvertParams(source=src, output=str(tmp_path / "out"), quants=["Q8_0"], run_validation=False,
                              work_dir=str(tmp_path / "w"), name="fx", lora=lora))
        return sorted(quantize_calls)

    touched = sorted(f"blk.{i}.{t}.weight" for i in (0, 1) for t in ("attn_q", "attn_v", "attn_output"))
    assert len(run()) == 2 * 9 + 3
    assert run(write_adapter(tmp_path / "a1", src)) == touched
    assert run(write_adapter(tmp_path / "a2", src, alpha=4.0)) == touched  # new scale: every merged tensor
    assert run(write_adapter(tmp_path / "a2", src, alpha=4.0)) == []  # same adapter again: nothing
    # One pair changes: one tensor.
    d = write_adapter(tmp_path / "a3", src, alpha=4.0)
    from safetensors.numpy import load_file

    path = os.path.join(d, "adapter_model.safetensors")
    t = load_file(path)
    t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] *= 2
    save_file(t, path)
    assert run(d) == ["blk.1.attn_v.weight"]


def test_an_adapter_that_targets_nothing_is_a_one_line_cli_error(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    # Its pairs name modules the model does not have (c_fc is GPT-2's MLP).
    d = write_adapter(tmp_path / "a", src, modules=("self_attn.q_proj",), layers=(0,))
    path = os.path.join(d, "adapter_model.safetensors")
    from safetensors.numpy import load_file

    save_file({k.replace("self_attn.q_proj", "mlp.c_fc"): v for k, v in load_file(path).items()}, path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "convert", src, "--lora", d, "--output",
                          str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert_one_line_error(out, "target no weight")


def test_fused_phi3_modules_merge(make_fixture, tmp_path):
    import shutil

    # llama.cpp treats a vocabulary as Phi-3's by general.name, which comes from the folder name.
    src = str(shutil.copytree(make_fixture(arch="phi3"), tmp_path / "tiny-phi3"))
    # A delta of realistic size (std 0.3 makes q/k/v entries ~5 and llama.cpp's F16 KV cache the
    # limit of agreement, though the merged weights stay exact).
    d = write_adapter(tmp_path / "adapter", src, modules=("self_attn.qkv_proj", "mlp.gate_up_proj",
                                                          "self_attn.o_proj"), rslora=True, std=0.1)
    result = convert(ConvertParams(source=src, output=str(tmp_path / "out"), quants=["F32"],
                                   work_dir=str(tmp_path / "w"), name="fx", lora=d))
    f32 = result["validation"]["F32"]
    assert f32["passed"], f32["failures"]
    assert f32["llama_cpp"]["mean_kld"] < 1e-4 and f32["llama_cpp"]["top1_agreement"] >= 0.995
    assert result["lora"]["effective_target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
