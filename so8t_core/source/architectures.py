"""Base architectures: what a Hugging Face config means, and how its tensors map to GGUF.

Each supported ``architectures[0]`` of config.json maps to one llama.cpp architecture
and a small set of rules (:class:`ArchRules`): which tensors a layer has and their
shapes, whether Q/K rows are permuted for llama.cpp's RoPE layout, and whether Q/K/V
and gate/up are fused. The hyperparameters are read once into a :class:`ModelSpec`;
everything downstream (plan, metadata, reference forward) reads the spec.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import gguf

from so8t_core.errors import CheckpointError, UnsupportedError, short_repr


@dataclass(frozen=True)
class ArchRules:
    model_arch: gguf.MODEL_ARCH
    permutes_qk: bool = False  # HF rotate-half → llama.cpp interleaved (llama.cpp's LlamaModel)
    fused_qkv: bool = False  # one qkv_proj (phi3)
    fused_gate_up: bool = False  # one gate_up_proj (phi3)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    qkv_bias: bool = False  # q/k/v biases always present (qwen2)
    sandwich_norms: bool = False  # pre/post-FFN and post-attention RMSNorms around each block (gemma2/3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w): llama.cpp's converter writes w + 1 (gemma)
    swa_pattern: int | None = None  # every n-th layer is global, the others sliding (llama.cpp's default)
    # Mixture of experts: how the checkpoint names its experts ("mixtral": block_sparse_moe.experts.E.w1/w2/w3,
    # "qwen": mlp.experts.E.gate_proj/up_proj/down_proj), None for a dense FFN.
    experts: str | None = None
    shared_expert: bool = False  # one always-on expert beside the routed ones, sigmoid-gated (qwen2moe)
    norm_topk: bool = False  # llama.cpp renormalizes the top-k routing weights to sum to 1


LLAMA = ArchRules(gguf.MODEL_ARCH.LLAMA, permutes_qk=True)
QWEN2 = ArchRules(gguf.MODEL_ARCH.QWEN2, qkv_bias=True)
QWEN3 = ArchRules(gguf.MODEL_ARCH.QWEN3, qk_norm=True)
PHI3 = ArchRules(gguf.MODEL_ARCH.PHI3, fused_qkv=True, fused_gate_up=True)
GEMMA2 = ArchRules(gguf.MODEL_ARCH.GEMMA2, sandwich_norms=True, norm_plus_one=True, swa_pattern=2)
GEMMA3 = ArchRules(gguf.MODEL_ARCH.GEMMA3, qk_norm=True, sandwich_norms=True, norm_plus_one=True, swa_pattern=6)
# Mixtral is a llama with experts in GGUF, as llama.cpp converts it.
MIXTRAL = ArchRules(gguf.MODEL_ARCH.LLAMA, permutes_qk=True, experts="mixtral", norm_topk=True)
QWEN2MOE = ArchRules(gguf.MODEL_ARCH.QWEN2MOE, qkv_bias=True, experts="qwen", shared_expert=True)
QWEN3MOE = ArchRules(gguf.MODEL_ARCH.QWEN3MOE, qk_norm=True, experts="qwen", norm_topk=True)

# HF architecture → rules. Mistral is a llama in GGUF, exactly as llama.cpp converts it.
SUPPORTED_ARCHITECTURES: dict[str, ArchRules] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Phi3ForCausalLM": PHI3,
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA3,
    "MixtralForCausalLM": MIXTRAL,
    "Qwen2MoeForCausalLM": QWEN2MOE,
    "Qwen3MoeForCausalLM": QWEN3MOE,
}

# The three projections of an expert, as the checkpoint names them (gate, up, down), and the prefix of a
# layer's expert tensors and of its router (llama.cpp's ffn_gate_inp).
EXPERT_PROJECTIONS = {"mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}
EXPERT_BLOCK = {"mixtral": "block_sparse_moe", "qwen": "mlp"}
EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")

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
    context_length: int | None
    rope_theta: float | None
    rms_norm_eps: float | None
    tied_embeddings: bool
    rope_scaling: dict[str, Any] | None  # rope_parameters / rope_scaling, with rope_type normalized
    head_dim_explicit: bool  # config.json names head_dim (then GGUF gets key/value_length)
    attention_bias: bool  # q/k/v/o biases (llama's attention_bias)
    n_experts: int = 0  # routed experts per layer (0: a dense FFN)
    n_experts_used: int = 0  # experts each token is routed to
    expert_intermediate_size: int = 0  # one expert's FFN width
    shared_expert_intermediate_size: int = 0  # the shared expert's (qwen2moe)
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rules(self) -> ArchRules:
        return SUPPORTED_ARCHITECTURES[self.hf_architecture]

    @property
    def model_arch(self) -> gguf.MODEL_ARCH:
        return self.rules.model_arch

    @property
    def permutes_qk(self) -> bool:
        return self.rules.permutes_qk

    @property
    def attention_width(self) -> int:
        """Width of the attention output, i.e. of o_proj's input (n_heads · head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def rope_type(self) -> str | None:
        rs = self.rope_scaling or {}
        rope_type = rs.get("rope_type", rs.get("type"))
        return rope_type.lower() if isinstance(rope_type, str) else None

    def rotated_width(self, position: str) -> int:
        """Width of the activation an SO8T gate rotates: o_proj's input or its output."""
        return self.attention_width if position == "pre_o_proj" else self.hidden_size

    def expert_tensor(self, layer: int, expert: int, projection: int) -> str:
        """The checkpoint name of one expert's projection (0 gate, 1 up, 2 down)."""
        style = self.rules.experts
        return (f"model.layers.{layer}.{EXPERT_BLOCK[style]}.experts.{expert}."
                f"{EXPERT_PROJECTIONS[style][projection]}.weight")

    def merged_expert_tensor(self, layer: int, projection: int) -> str:
        """The name llama.cpp's converter gives the experts of one projection stacked, which its tensor map
        turns into ``blk.N.ffn_{gate,up,down}_exps``."""
        style = self.rules.experts
        return f"model.layers.{layer}.{EXPERT_BLOCK[style]}.experts.{EXPERT_PROJECTIONS[style][projection]}.weight"

    def tensor_name_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.model_arch, self.n_layers)

    def layer_tensor_shapes(self) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """(required, optional) tensors of one layer: name suffix → shape."""
        r, h, hd, ff = self.rules, self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        required = {"self_attn.o_proj.weight": (h, q), "mlp.down_proj.weight": (h, ff),
                    "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        optional = {"self_attn.o_proj.bias": (h,)}
        if r.fused_qkv:
            required["self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
            optional["self_attn.qkv_proj.bias"] = (q + 2 * kv,)
        else:
            qkv = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv}
            required.update({f"{n}.weight": (rows, h) for n, rows in qkv.items()})
            (required if r.qkv_bias else optional).update({f"{n}.bias": (rows,) for n, rows in qkv.items()})
        if r.experts:
            del required["mlp.down_proj.weight"]
            eff, prefix = self.expert_intermediate_size, f"{EXPERT_BLOCK[r.experts]}."
            required[prefix + "gate.weight"] = (self.n_experts, h)  # the router
            for e in range(self.n_experts):
                gate, up, down = EXPERT_PROJECTIONS[r.experts]
                required.update({f"{prefix}experts.{e}.{gate}.weight": (eff, h),
                                 f"{prefix}experts.{e}.{up}.weight": (eff, h),
                                 f"{prefix}experts.{e}.{down}.weight": (h, eff)})
            if r.shared_expert:
                sff = self.shared_expert_intermediate_size
                required.update({"mlp.shared_expert.gate_proj.weight": (sff, h),
                                 "mlp.shared_expert.up_proj.weight": (sff, h),
                                 "mlp.shared_expert.down_proj.weight": (h, sff),
                                 "mlp.shared_expert_gate.weight": (1, h)})
        elif r.fused_gate_up:
            required["mlp.gate_up_proj.weight"] = (2 * ff, h)
        else:
            required.update({"mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h)})
        if r.sandwich_norms:
            required.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
        if r.qk_norm:
            required.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        return required, optional


def _int(config: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise CheckpointError(where, f"config.json: {key} must be a positive integer, got {short_repr(value)}",
                              "fix config.json")
    return value


def _number(config: Mapping[str, Any], key: str, where: str) -> float | None:
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(where, f"config.json: {key} must be a number, got {short_repr(value)}",
                              "fix config.json")
    return None if value is None else float(value)


# RoPE settings read as numbers (positive ones, and the others), and as lists of numbers.
ROPE_POSITIVE = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "partial_rotary_factor")
ROPE_NUMBERS = ("extrapolation_factor", "attention_factor", "attn_factor", "beta_fast", "beta_slow")
ROPE_LISTS = ("long_factor", "short_factor")


def _check_rope(config: Mapping[str, Any], where: str) -> None:
    """The RoPE block (rope_parameters / rope_scaling) holds what the converter computes with."""
    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

    # Top level: the keys rope_parameters() mirrors into the block.
    blocks = [("", config, ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"))]
    for key in ("rope_parameters", "rope_scaling"):
        block = config.get(key)
        if block is not None and not isinstance(block, Mapping):
            raise CheckpointError(where, f"config.json: {key} must be an object, got {short_repr(block)}",
                                  "fix config.json")
        if block is not None:
            blocks.append((f"{key}.", block, ROPE_POSITIVE + ROPE_NUMBERS + ROPE_LISTS + ("rope_type", "type")))
    for prefix, block, keys in blocks:
        for key in keys:
            value = block.get(key)
            if value is None:
                continue
            if key in ROPE_LISTS:
                ok = isinstance(value, list) and all(number(v) for v in value)
                need = "a list of numbers"
            elif key in ("rope_type", "type"):
                ok, need = isinstance(value, str), "a string"
            else:
                ok = number(value) and (key in ROPE_NUMBERS or value > 0)
                need = "a number" if key in ROPE_NUMBERS else "a positive number"
            if not ok:
                raise CheckpointError(where, f"config.json: {prefix}{key} must be {need}, got {short_repr(value)}",
                                      "fix config.json")


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings in one dict, as llama.cpp's converter assembles them.

    transformers 5 writes ``rope_parameters``; 4.x writes ``rope_theta`` and
    ``rope_scaling`` (with ``type`` in older files). Top-level ``rope_theta``,
    ``partial_rotary_factor`` and ``original_max_position_embeddings`` are mirrored in.
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in params and config.get(key) is not None:
            params[key] = config[key]
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def model_spec(config: Mapping[str, Any], where: str) -> ModelSpec:
    """Read the base-model hyperparameters from config.json, checking they are consistent."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CheckpointError(where, "config.json has no \"architectures\" list",
                              'add e.g. "architectures": ["LlamaForCausalLM"]')
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(where, f"base architecture {hf_arch[:80]} is not supported",
                               f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    _check_rope(config, where)
    if hf_arch == "Gemma2ForCausalLM":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key in config and config[key] is None:  # transformers: no capping; absent: its default
                raise UnsupportedError(where, f"config.json: {key} is null (no soft-capping), but llama.cpp's Gemma 2 "
                                              "always soft-caps", f"set {key} to the model's cap")

    config = with_transformers_defaults(config, hf_arch)
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
    rope = gemma3_rope_parameters(config)[0] if hf_arch == "Gemma3ForCausalLM" else rope_parameters(config)
    rope_theta = rope.get("rope_theta")
    if rope_theta is not None and (isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float))):
        raise CheckpointError(where, f"config.json: rope_theta must be a number, got {rope_theta!r}", "")
    context = config.get("max_position_embeddings")
    if SUPPORTED_ARCHITECTURES[hf_arch].norm_plus_one:
        _check_gemma(config, hf_arch, head_dim, hidden // n_heads, where)
    n_layers = _int(config, "num_hidden_layers", where)
    intermediate = _int(config, "intermediate_size", where)
    moe = _moe_hparams(config, hf_arch, n_layers, intermediate, where) if SUPPORTED_ARCHITECTURES[hf_arch].experts \
        else {}

    return ModelSpec(
        hf_architecture=hf_arch,
        arch=gguf.MODEL_ARCH_NAMES[SUPPORTED_ARCHITECTURES[hf_arch].model_arch],
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=_int(config, "vocab_size", where),
        context_length=None if context is None else _int(config, "max_position_embeddings", where),
        rope_theta=None if rope_theta is None else float(rope_theta),
        rms_norm_eps=_number(config, "rms_norm_eps", where),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=rope if rope.get("rope_type") not in (None, "default") else None,
        head_dim_explicit=head_dim_explicit,
        attention_bias=bool(config.get("attention_bias", False)),
        **moe,
        config=dict(config),
    )


def _moe_hparams(config: Mapping[str, Any], hf_arch: str, n_layers: int, intermediate: int, where: str
                 ) -> dict[str, int]:
    """Expert counts and widths, read as llama.cpp's converter reads them; refuses what llama.cpp's MoE
    graphs would run differently from the checkpoint's model (they read no key for it)."""
    rules = SUPPORTED_ARCHITECTURES[hf_arch]
    count_key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    n_experts = _int(config, count_key, where)
    n_used = _int(config, "num_experts_per_tok", where)
    if n_used > n_experts:
        raise CheckpointError(where, f"config.json: num_experts_per_tok {n_used} is more than the {n_experts} experts",
                              "fix config.json")
    out = {"n_experts": n_experts, "n_experts_used": n_used,
           "expert_intermediate_size": intermediate if rules.experts == "mixtral"
           else _int(config, "moe_intermediate_size", where)}
    if rules.shared_expert:
        out["shared_expert_intermediate_size"] = _int(config, "shared_expert_intermediate_size", where)
    if rules.experts == "qwen":
        if bool(config.get("norm_topk_prob")) != rules.norm_topk:
            raise UnsupportedError(where, f"config.json: norm_topk_prob {short_repr(config.get('norm_topk_prob'))}: "
                                          f"llama.cpp's {rules.model_arch.name.lower()} "
                                          f"{'always' if rules.norm_topk else 'never'} renormalizes the routing "
                                          "weights", "")
        step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
        if step != 1 or dense:
            raise UnsupportedError(where, "config.json: some layers are dense (decoder_sparse_step / mlp_only_layers):"
                                          " llama.cpp's Qwen MoE has experts in every layer", "")
    return out


def gemma3_rope_parameters(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gemma 3's RoPE (global layers, sliding layers) as transformers' Gemma3TextConfig reads it, which is
    what convert sees: ``rope_parameters`` with full_attention / sliding_attention (transformers 5), or
    ``rope_theta`` (default 1e6) and ``rope_scaling`` for the global layers and ``rope_local_base_freq``
    (default 10000) for the sliding ones (4.x files)."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        full, sliding = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:
        full = dict(config.get("rope_scaling") or params or {})
        full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
        sliding = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    for block in (full, sliding):
        if "rope_type" not in block:
            block["rope_type"] = block.pop("type", "default")
    return full, sliding


def gemma_layer_types(config: Mapping[str, Any], hf_arch: str) -> tuple[list[str], list[str]]:
    """(the checkpoint's attention type per layer, llama.cpp's): llama.cpp reads no pattern from the GGUF,
    it makes every ``swa_pattern``-th layer global and the others sliding (Gemma 3 without a sliding
    window, ``sliding_window_pattern`` 1: all global)."""
    layers = config.get("num_hidden_layers")
    layers = layers if type(layers) is int else 0

    def types(pattern: int) -> list[str]:
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]

    default = SUPPORTED_ARCHITECTURES[hf_arch].swa_pattern
    pattern = config.get("sliding_window_pattern")
    ours = config.get("layer_types")
    if ours is None:
        ours = types(pattern if type(pattern) is int and pattern > 0 else default)
    if hf_arch == "Gemma3ForCausalLM" and (pattern == 1 or not config.get("sliding_window")):
        return list(ours), types(1)
    return list(ours), types(default)


def _check_gemma(config: Mapping[str, Any], hf_arch: str, head_dim: int, width_per_head: int, where: str) -> None:
    """What llama.cpp's Gemma models assume rather than read: refuse a checkpoint they would run wrongly.

    llama.cpp always ties the output to token_embd (convert drops lm_head.weight), scales queries by
    1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 27B models, recognized by their layer count),
    and makes every ``swa_pattern``-th layer global, the others sliding: none of these is a GGUF key.
    """
    rules = SUPPORTED_ARCHITECTURES[hf_arch]
    if not config.get("tie_word_embeddings"):
        raise UnsupportedError(where, f"{hf_arch} with an untied lm_head: llama.cpp's Gemma always ties the "
                                      "output to the token embeddings", 'set "tie_word_embeddings": true')
    scalar = _number(config, "query_pre_attn_scalar", where)
    layers = config.get("num_hidden_layers")
    expected = width_per_head if layers == GEMMA_27B_LAYERS[hf_arch] else head_dim
    if scalar != expected:
        raise UnsupportedError(where, f"config.json: query_pre_attn_scalar {short_repr(scalar)} is not what llama.cpp "
                                      f"scales queries by for this model ({expected})", "")
    ours, llama_cpp = gemma_layer_types(config, hf_arch)
    if ours != llama_cpp:
        raise UnsupportedError(where, f"config.json: the sliding/global layer pattern is not llama.cpp's {hf_arch} "
                                      f"one (every {rules.swa_pattern}th layer global, the others sliding)", "")
    if config.get("use_bidirectional_attention"):
        raise UnsupportedError(where, "bidirectional attention: llama.cpp's Gemma is causal", "")
    if hf_arch == "Gemma3ForCausalLM" and config.get("attn_logit_softcapping") is not None:
        raise UnsupportedError(where, "config.json: attn_logit_softcapping is set, but llama.cpp's Gemma 3 does not "
                                      "soft-cap attention", "")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in config and config[key] is not None:
            _number(config, key, where)


# The layer count by which llama.cpp recognizes the 27B Gemmas (queries scaled by hidden/heads).
GEMMA_27B_LAYERS = {"Gemma2ForCausalLM": 46, "Gemma3ForCausalLM": 62}


# Hyperparameters a config.json may leave out, and the value the transformers config class
# (4.x and 5.x alike) then gives them, as llama.cpp's converter sees them (it reads configs
# through AutoConfig) and the model uses them. "hidden/heads" is computed. A table, not an
# import: importing transformers costs seconds. tests/test_converter_parity.py checks it
# against the installed transformers.
HF_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                         "head_dim": "hidden/heads"},
    "MistralForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "rope_theta": 10000.0,
                           "head_dim": "hidden/heads"},
    "Qwen2ForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0},
    "Qwen3ForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                         "head_dim": 128},
    "Phi3ForCausalLM": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "Gemma2ForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "rope_theta": 10000.0,
                          "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "tie_word_embeddings": True},
    "Gemma3ForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "head_dim": 256,
                          "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True},
    "MixtralForCausalLM": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
                           "intermediate_size": 14336, "num_experts": 8, "num_experts_per_tok": 2},
    "Qwen2MoeForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                            "intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                            "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                            "norm_topk_prob": False},
    "Qwen3MoeForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                            "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8,
                            "moe_intermediate_size": 768, "norm_topk_prob": False},
}


def with_transformers_defaults(config: Mapping[str, Any], hf_arch: str) -> dict[str, Any]:
    out = dict(config)
    for key, value in HF_CONFIG_DEFAULTS.get(hf_arch, {}).items():
        if key == "rope_theta" and rope_parameters(out).get("rope_theta") is not None:
            continue
        if out.get(key) is None:
            if value == "hidden/heads":
                hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
                if not (type(hidden) is int and type(heads) is int and heads > 0):
                    continue  # reported by model_spec's own checks
                value = hidden // heads
            out[key] = value
    return out


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
    ("post_attention_norm", NORM), ("post_ffw_norm", NORM),
    ("attn_", ATTENTION), ("ffn_", FFN), ("rope_", OTHER),
)


def gguf_tensor_class(gguf_name: str) -> str:
    """Class of a base-model tensor from its GGUF name (``blk.N.`` stripped)."""
    short = re.sub(r"^blk\.\d+\.", "", gguf_name)
    for prefix, cls in _CLASS_BY_GGUF_PREFIX:
        if short.startswith(prefix):
            return cls
    return OTHER
