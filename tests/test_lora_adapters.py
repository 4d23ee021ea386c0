"""PEFT LoRA adapters as read: scaling, and the adapters refused in one line."""

import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file
from support.lora import FIXTURE, pair, write_adapter

from so8t_core.analysis import checkpoint_model
from so8t_core.errors import CheckpointError, UnsupportedError
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.lora import MergedReader, load_adapter


def test_scaling_lora_and_rslora(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    ckpt = Checkpoint.open(src)
    w = "model.layers.0.self_attn.v_proj.weight"
    for rslora, expect in ((False, 16.0 / 4), (True, 16.0 / math.sqrt(4))):
        d = write_adapter(tmp_path / f"a{rslora}", src, alpha=16.0, rslora=rslora)
        adapter = load_adapter(d)
        assert adapter.scale == pytest.approx(expect)
        a, b = pair(d, w)
        merged = MergedReader(ckpt, adapter)
        np.testing.assert_allclose(merged.read(w), ckpt.read(w) + expect * (b @ a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged.read_rows(w, 3, 9), (ckpt.read(w) + expect * (b @ a))[3:9],
                                   rtol=1e-5, atol=1e-6)
        summary = adapter.summary()
        assert summary["effective_target_modules"] == ["o_proj", "q_proj", "v_proj"]
        assert len(summary["merged_tensors"]) == 6 and summary["use_rslora"] is rslora


@pytest.mark.parametrize("config,files,problem", [
    ({"use_dora": True}, None, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"bias": "all"}, None, "train biases"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    (None, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 384), np.float32)}, "embedding"),
    (None, {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.zeros(64, np.float32)},
     "trained bias"),
    (None, {"base_model.model.lm_head.weight": np.zeros((384, 64), np.float32)}, "modules_to_save"),
])
def test_unsupported_adapters_are_refused_in_one_line(make_fixture, tmp_path, config, files, problem):
    d = write_adapter(tmp_path / "a", make_fixture(**FIXTURE), config=config)
    if files:
        from safetensors.numpy import load_file

        path = os.path.join(d, "adapter_model.safetensors")
        save_file({**load_file(path), **files}, path)
    with pytest.raises(UnsupportedError, match=problem) as err:
        load_adapter(d)
    assert "\n" not in str(err.value)


def test_malformed_adapters_are_errors(make_fixture, tmp_path):
    src = make_fixture(**FIXTURE)
    _, _, plan = checkpoint_model(Checkpoint.open(src))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(str(tmp_path))
    d = write_adapter(tmp_path / "rank", src, config={"r": 8})
    with pytest.raises(CheckpointError, match="r=8"):
        load_adapter(d)
    other = make_fixture(**{**FIXTURE, "hidden": 128, "intermediate": 256})
    d = write_adapter(tmp_path / "shape", other)
    with pytest.raises(CheckpointError, match="but the weight is"):
        load_adapter(d).bind(plan, src)
