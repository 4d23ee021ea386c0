"""PEFT LoRA adapters for the tests, written as LoraModel.save_pretrained writes them."""

import json
import os

import numpy as np
from safetensors.numpy import save_file

from so8t_core.source.checkpoint import Checkpoint

# The fixture the LoRA tests adapt: small, with gates, two layers.
FIXTURE = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=5)
MODULES = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj")


def write_adapter(dest, source, modules=MODULES, layers=(0, 1), r=4, alpha=8.0, rslora=False, seed=0,
                  config=None, std=0.3):
    """A PEFT-format adapter (what LoraModel.save_pretrained writes) with random A and B."""
    ckpt = Checkpoint.open(source)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            name = f"model.layers.{layer}.{module}"
            out_f, in_f = ckpt.tensors[name + ".weight"].shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = (rng.standard_normal((r, in_f)) * std
                                                                  ).astype(np.float32)
            tensors[f"base_model.model.{name}.lora_B.weight"] = (rng.standard_normal((out_f, r)) * std
                                                                  ).astype(np.float32)
    os.makedirs(dest, exist_ok=True)
    save_file(tensors, os.path.join(dest, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": False,
           "bias": "none", "use_dora": False, "modules_to_save": None, "task_type": "CAUSAL_LM",
           "target_modules": sorted({m.split(".")[-1] for m in modules}), "base_model_name_or_path": source,
           **(config or {})}
    with open(os.path.join(dest, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dest)


def pair(adapter_dir, weight):
    """The (A, B) pair an adapter folder holds for a base weight."""
    from safetensors.numpy import load_file

    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    module = "base_model.model." + weight[: -len(".weight")]
    return t[module + ".lora_A.weight"], t[module + ".lora_B.weight"]
