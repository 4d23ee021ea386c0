"""Tiny random SO8T checkpoints for tests (``so8t-gguf fixture``).

Weights are scaled so that logits are peaked (a wrong fold or permutation shows up
as disagreement, not as noise between near-ties), θ is large enough that a
transposed fold is obviously wrong, and a small real byte-level BPE tokenizer makes
the result loadable by llama.cpp. Same arguments, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .architectures import SUPPORTED_ARCHITECTURES
from .checkpoint_writer import write_checkpoint
from .constants import ROTATION_PARAMETERIZATIONS, ROTATION_POSITIONS
from .demo_tokenizer import fixture_tokenizer_files
from .errors import UnsupportedError

FIXTURE_ARCHS = {"llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class FixtureSpec:
    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384
    tied: bool = False
    so8t: bool = True
    seed: int = 0
    shards: int = 1
    rotation: str = "cayley"
    position: str = "pre_o_proj"
    gated_layers: tuple[int, ...] | None = None  # default: every layer
    attention_bias: bool = False
    theta_std: float = 0.3
    dtype: str = "float32"
    extra_config: dict = field(default_factory=dict)


def fixture_config(s: FixtureSpec) -> dict:
    config = {
        "architectures": [FIXTURE_ARCHS[s.arch]],
        "model_type": s.arch,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": s.vocab,
        "hidden_act": "silu",
        "attention_bias": s.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": s.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": s.dtype,
    }
    if s.so8t:
        config["so8t"] = {"version": 1, "rotation": s.rotation, "position": s.position}
    config.update(s.extra_config)
    return config


def fixture_tensors(s: FixtureSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(s.seed)
    hd = s.hidden // s.heads

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((s.vocab, s.hidden)).astype(np.float32)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = lin(s.heads * hd, s.hidden)
        t[p + "self_attn.k_proj.weight"] = lin(s.kv_heads * hd, s.hidden)
        t[p + "self_attn.v_proj.weight"] = lin(s.kv_heads * hd, s.hidden)
        t[p + "self_attn.o_proj.weight"] = lin(s.hidden, s.heads * hd)
        if s.attention_bias:
            for proj, n in (("q", s.heads * hd), ("k", s.kv_heads * hd), ("v", s.kv_heads * hd), ("o", s.hidden)):
                t[p + f"self_attn.{proj}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        t[p + "mlp.gate_proj.weight"] = lin(s.intermediate, s.hidden)
        t[p + "mlp.up_proj.weight"] = lin(s.intermediate, s.hidden)
        t[p + "mlp.down_proj.weight"] = lin(s.hidden, s.intermediate)
        t[p + "input_layernorm.weight"] = norm(s.hidden)
        t[p + "post_attention_layernorm.weight"] = norm(s.hidden)
    t["model.norm.weight"] = norm(s.hidden)
    if not s.tied:
        t["lm_head.weight"] = lin(s.vocab, s.hidden) * np.float32(4.0)
    if s.so8t:
        gated = range(s.layers) if s.gated_layers is None else s.gated_layers
        for i in gated:
            t[f"model.layers.{i}.self_attn.so8t_rotation_gate.theta"] = (
                s.theta_std * rng.standard_normal((s.heads * hd // 8, 8, 8))).astype(np.float32)
        for head in ("safety", "authority"):
            t[f"so8t.triality.{head}_head.weight"] = lin(2, s.hidden)
            t[f"so8t.triality.{head}_head.bias"] = (0.1 * rng.standard_normal(2)).astype(np.float32)
    return t


def build_fixture(dest: str, spec: FixtureSpec) -> str:
    if spec.arch not in FIXTURE_ARCHS or FIXTURE_ARCHS[spec.arch] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(f"--arch {spec.arch}", "no fixture for this architecture yet",
                               f"choose from {', '.join(FIXTURE_ARCHS)}")
    if spec.rotation not in ROTATION_PARAMETERIZATIONS or spec.position not in ROTATION_POSITIONS:
        raise UnsupportedError("fixture", f"unknown rotation {spec.rotation!r} or position {spec.position!r}", "")
    if spec.hidden % spec.heads or (spec.hidden // spec.heads) % 2 or spec.heads % spec.kv_heads:
        raise UnsupportedError("fixture", "hidden must split into heads of even size, heads into kv-head groups",
                               "e.g. --hidden 64 --heads 4 --kv-heads 2")
    if (spec.hidden // spec.heads * spec.heads) % 8:
        raise UnsupportedError("fixture", "the attention width must be a multiple of 8 for SO(8) blocks", "")
    tensors = fixture_tensors(spec)
    files = fixture_tokenizer_files(spec.vocab, seed=spec.seed)
    return write_checkpoint(dest, fixture_config(spec), tensors, files, n_shards=spec.shards, dtype=spec.dtype)
