"""Base architectures: what a Hugging Face config means, and how its tensors map to GGUF.

Each supported ``architectures[0]`` of config.json maps to one llama.cpp architecture.
The hyperparameters are read once into a :class:`ModelSpec`; everything downstream
(tensor plan, metadata, reference forward) reads the spec, never the raw config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import gguf

from .errors import CheckpointError, UnsupportedError

# HF architecture → llama.cpp architecture. Qwen2/Qwen3/Phi-3/Mistral come next; the
# spec and the tensor plan already carry what they need (biases, head_dim, q/k norms).
SUPPORTED_ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
}

# Which architectures store Q/K in HF's rotate-half layout but need llama.cpp's
# interleaved layout: llama.cpp's converter permutes them for these only.
PERMUTES_QK = {gguf.MODEL_ARCH.LLAMA}

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelSpec:
    hf_architecture: str
    arch: str  # llama.cpp architecture name, e.g. "llama"
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    rope_scaling: dict[str, Any] | None
    head_dim_explicit: bool  # config.json names head_dim (then GGUF gets key/value_length)

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return SUPPORTED_ARCHITECTURES[self.hf_architecture]

    @property
    def attention_width(self) -> int:
        """Width of the attention output, i.e. of o_proj's input (n_heads · head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def permutes_qk(self) -> bool:
        return self.model_arch in PERMUTES_QK

    def tensor_name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.model_arch, self.n_layers)


def _int(config: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise CheckpointError(where, f"config.json: {key} must be a positive integer, got {value!r}",
                              "fix config.json")
    return value


def model_spec(config: Mapping[str, Any], where: str) -> ModelSpec:
    """Read the base-model hyperparameters from config.json, checking they are consistent."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(where, "config.json has no \"architectures\" list",
                              'add e.g. "architectures": ["LlamaForCausalLM"]')
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(where, f"base architecture {hf_arch} is not supported",
                               f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")

    hidden = _int(config, "hidden_size", where)
    n_heads = _int(config, "num_attention_heads", where)
    n_kv = _int(config, "num_key_value_heads", where, default=n_heads)
    head_dim_explicit = config.get("head_dim") is not None
    head_dim = _int(config, "head_dim", where) if head_dim_explicit else hidden // n_heads
    if not head_dim_explicit and hidden % n_heads:
        raise CheckpointError(where, f"config.json: hidden_size {hidden} is not divisible by "
                                     f"num_attention_heads {n_heads}", "set head_dim explicitly")
    if n_heads % n_kv:
        raise CheckpointError(where, f"config.json: num_attention_heads {n_heads} is not a multiple of "
                                     f"num_key_value_heads {n_kv}", "fix config.json")

    # transformers 5 nests rope settings under rope_parameters; 4.x uses rope_theta/rope_scaling.
    rope_params = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = config.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type") not in (None, "default"):
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    eps = config.get("rms_norm_eps", 1e-6)
    if not isinstance(rope_theta, (int, float)) or not isinstance(eps, (int, float)):
        raise CheckpointError(where, "config.json: rope_theta and rms_norm_eps must be numbers", "fix config.json")

    return ModelSpec(
        hf_architecture=hf_arch,
        arch=gguf.MODEL_ARCH_NAMES[SUPPORTED_ARCHITECTURES[hf_arch]],
        n_layers=_int(config, "num_hidden_layers", where),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=_int(config, "intermediate_size", where),
        vocab_size=_int(config, "vocab_size", where),
        context_length=_int(config, "max_position_embeddings", where, default=2048),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(eps),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=dict(rope_scaling) if isinstance(rope_scaling, Mapping) else None,
        head_dim_explicit=head_dim_explicit,
    )


def layer_of(hf_name: str) -> int | None:
    m = LAYER_RE.match(hf_name)
    return int(m.group(1)) if m else None


# Tensor classes reported by the analysis.
EMBEDDING, ATTENTION, FFN, NORM, ROTATION, TRIALITY, OTHER = (
    "embedding", "attention", "ffn", "norm", "so8t_rotation", "triality_heads", "other")
TENSOR_CLASSES = (EMBEDDING, ATTENTION, FFN, NORM, ROTATION, TRIALITY, OTHER)

_CLASS_BY_GGUF_PREFIX = (
    ("token_embd", EMBEDDING), ("output_norm", NORM), ("output.", EMBEDDING),
    ("attn_norm", NORM), ("ffn_norm", NORM), ("attn_q_norm", NORM), ("attn_k_norm", NORM),
    ("attn_", ATTENTION), ("ffn_", FFN),
)


def gguf_tensor_class(gguf_name: str) -> str:
    """Class of a base-model tensor from its GGUF name (``blk.N.`` stripped)."""
    short = re.sub(r"^blk\.\d+\.", "", gguf_name)
    for prefix, cls in _CLASS_BY_GGUF_PREFIX:
        if short.startswith(prefix):
            return cls
    return OTHER
