"""`so8t-gguf onnx`: the baked model as ONNX, run by onnxruntime and compared with PyTorch.

Measured on the 2-layer llama fixture (max |logit| about 17): onnxruntime differs from both the
baked PyTorch model and the SO8T reference by under 1e-5, against a tolerance of 1e-4 · max|logit|.
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file

from flows.cli import main
from so8t_core.analysis import checkpoint_model
from so8t_core.errors import ValidationError
from so8t_core.export import onnx as onnx_export
from so8t_core.export.onnx import export_onnx, tolerance
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.lora import load_adapter
from so8t_core.validate.reference import So8tReference, baked_model, base_model

pytestmark = pytest.mark.e2e  # exports with torch and runs onnxruntime

BIN = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")
RNG = np.random.default_rng(7)
# Two prompt lengths, neither of them the exporter's example length (8).
PROMPTS = [list(RNG.integers(3, 384, size=n)) for n in (5, 19)]


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_batch(sess: ort.InferenceSession, prompts: list[list[int]]) -> list[np.ndarray]:
    """One padded batch (left padding, as generation pads); each prompt's logits without the padding."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    return [logits[i, width - len(p):] for i, p in enumerate(prompts)]


def torch_logits(model, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([prompt]), use_cache=False).logits[0].numpy()


@pytest.fixture(scope="module")
def llama(make_fixture, tmp_path_factory):
    """The llama fixture (Cayley gates before o_proj on both layers), exported by the library."""
    source = make_fixture()
    out = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return source, export_onnx(Checkpoint.open(source), str(out))


def test_export_writes_a_checked_self_contained_file(llama):
    source, result = llama
    check = result["check"]
    assert check["ok"] and check["n_tokens"] == 384
    assert check["max_abs_diff_vs_so8t_reference"] < 1e-4 * check["max_abs_reference_logit"]
    assert check["tolerance"] == tolerance(np.array([check["max_abs_reference_logit"]]))
    assert result["external_data"] is None and not os.path.exists(result["path"] + ".data")
    assert os.listdir(os.path.dirname(result["path"])) == ["llama.onnx"]  # no staging folder left behind
    model = onnx.load(result["path"])
    onnx.checker.check_model(model, full_check=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                    "logits": ["batch", "sequence", 384]}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["so8t.baked_layers"]) == [0, 1]
    assert len(meta["so8t.source_fingerprint"]) == 64 and meta["so8t.converter"].startswith("so8t-gguf ")
    assert not any(i.name.startswith("so8t.") for i in model.graph.initializer)  # gates folded, heads left out
    # No exporter debugging annotations: they hold stack traces with this machine's install paths.
    assert not any(n.metadata_props for n in model.graph.node)
    assert sys.prefix.encode() not in open(result["path"], "rb").read()


def test_onnx_logits_match_the_baked_and_the_original_so8t_model_at_two_lengths(llama):
    source, result = llama
    ckpt = Checkpoint.open(source)
    sess = session(result["path"])
    baked, reference = baked_model(ckpt), So8tReference(ckpt)
    _, _, plan = checkpoint_model(ckpt)
    ungated = base_model(ckpt.config, reference.spec,
                         {p.source: ckpt.read(p.source) for p in plan if p.transform != "constant"})
    batched = run_batch(sess, PROMPTS)
    for prompt, from_batch in zip(PROMPTS, batched):
        (alone,) = run_batch(sess, [prompt])
        so8t = reference.logits(prompt)  # the unbaked model: gates applied by hooks on o_proj
        bound = tolerance(so8t)
        assert alone.shape == (len(prompt), 384)
        assert np.abs(alone - torch_logits(baked, prompt)).max() < bound
        assert np.abs(alone - so8t).max() < bound
        assert np.abs(from_batch - so8t).max() < bound  # padding is masked out
        # The gates matter: the same weights without them give other logits, by far more than the bound.
        assert np.abs(torch_logits(ungated, prompt) - so8t).max() > 100 * bound


def test_cli_export_from_s3_prints_the_check_and_is_byte_identical(llama, tmp_path, s3_endpoint):
    """The CLI in another process, reading the same checkpoint from S3 (a real endpoint on loopback)."""
    import boto3
    import fsspec

    source, result = llama
    boto3.client("s3").create_bucket(Bucket="onnx-ckpts")
    fsspec.filesystem("s3").put(source + "/", "onnx-ckpts/llama/", recursive=True)
    out = tmp_path / "cli" / "model.onnx"
    proc = subprocess.run([BIN, "onnx", "s3://onnx-ckpts/llama", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no exporter warnings reach the user
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"exported {out} (") and "no KV cache" in lines[1]
    assert "vs the SO8T reference, over 384 tokens" in lines[2] and lines[2].endswith("ok")
    # Deterministic: another process exporting the same checkpoint (from elsewhere) writes the same bytes.
    assert out.read_bytes() == open(result["path"], "rb").read()


def write_adapter(dest, source, modules) -> str:
    """A PEFT LoRA adapter (r=4, alpha=8) with random A and B on ``modules`` of both layers."""
    ckpt = Checkpoint.open(source)
    rng = np.random.default_rng(3)
    tensors = {}
    for layer in (0, 1):
        for module in modules:
            name = f"model.layers.{layer}.{module}"
            out_f, in_f = ckpt.tensors[name + ".weight"].shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = (rng.standard_normal((4, in_f)) * 0.3).astype("f4")
            tensors[f"base_model.model.{name}.lora_B.weight"] = (rng.standard_normal((out_f, 4)) * 0.3).astype("f4")
    os.makedirs(dest)
    save_file(tensors, os.path.join(dest, "adapter_model.safetensors"))
    with open(os.path.join(dest, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
                   "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules})}, f)
    return str(dest)


def test_phi3_with_a_lora_adapter_and_external_data(make_fixture, tmp_path, monkeypatch):
    """Phi-3 (fused qkv_proj and gate_up_proj), expm gates after o_proj, a LoRA adapter on qkv_proj
    and o_proj (o_proj's delta goes through the bake), and the weights forced into model.onnx.data
    as for a model over 1.5 GiB."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    source = make_fixture(arch="phi3", rotation="expm", position="post_o_proj")
    adapter = load_adapter(write_adapter(tmp_path / "adapter", source, ("self_attn.qkv_proj", "self_attn.o_proj")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "phi3.onnx.data").write_bytes(b"an earlier export's weights")
    result = export_onnx(Checkpoint.open(source), str(out / "phi3.onnx"), adapter)
    assert result["check"]["ok"]  # against the SO8T reference with the same adapter merged
    data = result["external_data"]
    assert data["path"] == str(out / "phi3.onnx.data") and result["size"] < 50_000 < data["size"]
    assert sorted(os.listdir(out)) == ["phi3.onnx", "phi3.onnx.data"]
    meta = {p.key: p.value for p in onnx.load(result["path"], load_external_data=False).metadata_props}
    assert meta["so8t.lora.sha256"] == adapter.sha256

    ckpt = Checkpoint.open(source)
    (logits,) = run_batch(session(result["path"]), [PROMPTS[1]])
    with_lora = So8tReference(ckpt, adapter=adapter).logits(PROMPTS[1])
    bound = tolerance(with_lora)
    assert np.abs(logits - with_lora).max() < bound
    # The adapter matters: without it the logits are far from the file's.
    assert np.abs(logits - So8tReference(ckpt).logits(PROMPTS[1])).max() > 100 * bound


def test_a_check_over_the_tolerance_fails_and_leaves_nothing(make_fixture, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "RELATIVE_TOLERANCE", 0.0)  # float32 kernels never agree to the last bit
    with pytest.raises(ValidationError, match="onnxruntime's logits differ from PyTorch's by up to"):
        export_onnx(Checkpoint.open(make_fixture()), str(tmp_path / "model.onnx"))
    assert os.listdir(tmp_path) == []


def test_bad_input_is_refused_in_one_line(make_fixture, tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "no-such-checkpoint")
    proc = subprocess.run([BIN, "onnx", missing, "--output", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"so8t-gguf: error: {missing}")

    cases = [(["--output", "s3://bucket/model.onnx"], "written to a local path only"),
             (["--output", str(tmp_path / "model.bin")], "must end in .onnx"),
             (["--output", str(tmp_path / "a-file" / "model.onnx")], "is a file, not a folder")]
    (tmp_path / "a-file").write_bytes(b"")
    for extra, fragment in cases:
        assert main(["onnx", make_fixture(), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and fragment in err and "(hint: " in err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["onnx", make_fixture(), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == ("so8t-gguf: error: so8t-gguf onnx: onnxruntime not installed "
                   "(hint: pip install 'so8t-gguf[onnx]')\n")
    assert os.listdir(tmp_path) == ["a-file"]
