"""Tiny random SO8T checkpoints for tests (``so8t-gguf fixture``).

Weights are scaled so that logits are peaked (a wrong fold or permutation shows up
as disagreement, not as noise between near-ties), θ is large enough that a
transposed fold is obviously wrong, and a small real tokenizer makes the result
loadable by llama.cpp: a byte-level BPE (tokenizer.json), or for phi3 by default a
Phi-3-style SentencePiece tokenizer.model (llama.cpp's phi3 vocabulary needs its tokens
``<s>``, ``</s>``, ``<unk>``, ``<|endoftext|>``). Same arguments, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from so8t_core.constants import ROTATION_PARAMETERIZATIONS, ROTATION_POSITIONS
from so8t_core.errors import UnsupportedError
from so8t_core.testing.checkpoint_writer import write_checkpoint
from so8t_core.testing.tokenizers import fixture_spm_tokenizer_files, fixture_tokenizer_files

FIXTURE_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
                 "qwen3moe": "Qwen3MoeForCausalLM"}
GEMMA_FIXTURE_ARCHS = ("gemma2", "gemma3")
MOE_FIXTURE_ARCHS = ("mixtral", "qwen2moe", "qwen3moe")
# Router weights are scaled up so that each token's top-k experts are clear winners: a near-tie would let
# float rounding pick another expert in llama.cpp than in the reference.
ROUTER_SCALE = 4.0
EMBED_STD_GEMMA = 0.25
FIXTURE_TOKENIZERS = ("bpe", "spm")


@dataclass(frozen=True)
class FixtureSpec:
    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 384  # config vocab_size: embedding rows
    tokenizer_vocab: int | None = None  # real tokens (< vocab leaves padding rows); default = vocab
    head_dim: int | None = None  # explicit head_dim (qwen3 style; attention width ≠ hidden)
    tied: bool = False
    so8t: bool = True
    seed: int = 0
    shards: int = 1
    rotation: str = "cayley"
    position: str = "pre_o_proj"
    gated_layers: tuple[int, ...] | None = None  # default: every layer
    attention_bias: bool = False
    longrope: bool = False  # phi3: LongRoPE factors (rope_factors_long/short tensors)
    theta_std: float = 0.3
    dtype: str = "float32"
    extra_config: dict = field(default_factory=dict)
    experts: int = 4  # MoE fixtures: routed experts per layer, and how many each token uses
    experts_used: int = 2
    expert_intermediate: int | None = None  # one expert's FFN width (Qwen MoE); default intermediate
    shared_intermediate: int | None = None  # qwen2moe's shared expert; default intermediate
    # "bpe" (byte-level BPE, tokenizer.json) or "spm" (SentencePiece tokenizer.model, Phi-3 style
    # for phi3, Llama 2 style otherwise); None: "spm" for phi3, "bpe" for the others.
    tokenizer: str | None = None

    @property
    def hf_architecture(self) -> str:
        return FIXTURE_ARCHS[self.arch]

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def tokenizer_kind(self) -> str:
        return self.tokenizer or ("spm" if self.arch in ("phi3", *GEMMA_FIXTURE_ARCHS) else "bpe")

    @property
    def gemma(self) -> bool:
        return self.arch in GEMMA_FIXTURE_ARCHS

    @property
    def moe(self) -> bool:
        return self.arch in MOE_FIXTURE_ARCHS

    @property
    def expert_ff(self) -> int:
        return self.intermediate if self.arch == "mixtral" else self.expert_intermediate or self.intermediate


def fixture_config(s: FixtureSpec) -> dict:
    config = {
        "architectures": [s.hf_architecture],
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
        "tie_word_embeddings": s.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": s.dtype,
    }
    if s.gemma:
        # Gemma: always tied; GELU (tanh); sandwich norms; queries scaled by 1/sqrt(head_dim) as llama.cpp
        # does; a sliding window short enough that the validation prompts cross it on the sliding layers.
        config.update(hidden_activation="gelu_pytorch_tanh", head_dim=s.hd, query_pre_attn_scalar=s.hd,
                      sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                      tie_word_embeddings=True, attention_bias=False, pad_token_id=0)
        del config["hidden_act"]
        if s.arch == "gemma3":  # as Gemma 3 1B ships it: no soft-capping, 1 global layer in 6, two RoPE bases
            config.update(model_type="gemma3_text", attn_logit_softcapping=None, final_logit_softcapping=None,
                          sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    if s.arch == "mixtral":  # as Mixtral-8x7B ships it, but for the sizes
        config.update(num_local_experts=s.experts, num_experts_per_tok=s.experts_used, sliding_window=None,
                      router_aux_loss_coef=0.02, output_router_logits=False, rope_theta=1_000_000.0)
    if s.arch in ("qwen2moe", "qwen3moe"):  # as Qwen1.5-MoE / Qwen3-30B-A3B ship it, but for the sizes
        config.update(num_experts=s.experts, num_experts_per_tok=s.experts_used, moe_intermediate_size=s.expert_ff,
                      norm_topk_prob=s.arch == "qwen3moe", decoder_sparse_step=1, mlp_only_layers=[],
                      use_sliding_window=False, sliding_window=None, output_router_logits=False,
                      router_aux_loss_coef=0.001)
        if s.arch == "qwen2moe":
            config.update(shared_expert_intermediate_size=s.shared_intermediate or s.intermediate,
                          max_window_layers=s.layers)
        else:
            config.update(attention_bias=False)
    if s.head_dim is not None or s.arch in ("qwen3", "qwen3moe"):
        # Qwen3's config defaults head_dim to 128 (not hidden / heads): always say it there.
        config["head_dim"] = s.hd
    if s.arch in ("llama", "mistral"):
        config.update(attention_bias=s.attention_bias, mlp_bias=False)
    if s.arch == "mistral":
        config["sliding_window"] = 4096
    if s.arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=4096, max_window_layers=s.layers)
    if s.arch == "qwen3":
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    if s.arch == "phi3":
        config.update(original_max_position_embeddings=1024, sliding_window=1023, pad_token_id=0)
        if s.longrope:
            n_factors = s.hd // 2  # one per rotated dimension pair
            rng = np.random.default_rng(s.seed + 1000)
            config.update(max_position_embeddings=4096, rope_scaling={
                "type": "longrope", "long_factor": [round(float(x), 4) for x in 1 + 3 * rng.random(n_factors)],
                "short_factor": [round(float(x), 4) for x in 1 + 0.2 * rng.random(n_factors)]})
    if s.so8t:
        config["so8t"] = {"version": 1, "rotation": s.rotation, "position": s.position}
    config.update(s.extra_config)
    return config


def fixture_tensors(s: FixtureSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(s.seed)
    hd = s.hd
    q, kv = s.heads * hd, s.kv_heads * hd

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # Gemma's RMSNorm scales by 1 + w
        return ((0.0 if s.gemma else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    # Gemma multiplies the embeddings by sqrt(hidden) and its blocks' outputs are RMS-normed: smaller
    # embeddings keep the blocks' share of the residual stream, so attention (RoPE, windows) shows in the logits.
    embed_scale = EMBED_STD_GEMMA if s.gemma else 1.0
    t: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (embed_scale * rng.standard_normal((s.vocab, s.hidden))).astype(np.float32)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        if s.arch == "phi3":
            t[p + "self_attn.qkv_proj.weight"] = lin(q + 2 * kv, s.hidden)
        else:
            t[p + "self_attn.q_proj.weight"] = lin(q, s.hidden)
            t[p + "self_attn.k_proj.weight"] = lin(kv, s.hidden)
            t[p + "self_attn.v_proj.weight"] = lin(kv, s.hidden)
        if s.arch in ("qwen2", "qwen2moe") or s.attention_bias:
            for proj, n in (("q", q), ("k", kv), ("v", kv)):
                t[p + f"self_attn.{proj}_proj.bias"] = bias(n)
        t[p + "self_attn.o_proj.weight"] = lin(s.hidden, q)
        if s.attention_bias and s.arch in ("llama", "mistral"):
            t[p + "self_attn.o_proj.bias"] = bias(s.hidden)
        if s.arch in ("qwen3", "gemma3", "qwen3moe"):
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        if s.moe:
            t.update(moe_tensors(s, p, lin))
        elif s.arch == "phi3":
            t[p + "mlp.gate_up_proj.weight"] = lin(2 * s.intermediate, s.hidden)
        else:
            t[p + "mlp.gate_proj.weight"] = lin(s.intermediate, s.hidden)
            t[p + "mlp.up_proj.weight"] = lin(s.intermediate, s.hidden)
        if not s.moe:
            t[p + "mlp.down_proj.weight"] = lin(s.hidden, s.intermediate)
        t[p + "input_layernorm.weight"] = norm(s.hidden)
        t[p + "post_attention_layernorm.weight"] = norm(s.hidden)
        if s.gemma:
            t[p + "pre_feedforward_layernorm.weight"] = norm(s.hidden)
            t[p + "post_feedforward_layernorm.weight"] = norm(s.hidden)
    t["model.norm.weight"] = norm(s.hidden)
    if not (s.tied or s.gemma):
        t["lm_head.weight"] = lin(s.vocab, s.hidden) * np.float32(4.0)
    if s.so8t:
        gated = range(s.layers) if s.gated_layers is None else s.gated_layers
        width = q if s.position == "pre_o_proj" else s.hidden
        for i in gated:
            t[f"model.layers.{i}.self_attn.so8t_rotation_gate.theta"] = (
                s.theta_std * rng.standard_normal((width // 8, 8, 8))).astype(np.float32)
        for head in ("safety", "authority"):
            t[f"so8t.triality.{head}_head.weight"] = lin(2, s.hidden)
            t[f"so8t.triality.{head}_head.bias"] = bias(2)
    return t


def moe_tensors(s: FixtureSpec, prefix: str, lin) -> dict[str, np.ndarray]:
    """One layer's router and experts in the checkpoint layout the Hub's Mixtral / Qwen MoE models ship
    (one tensor per expert and projection), and qwen2moe's shared expert with its gate."""
    t = {}
    block, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if s.arch == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    t[f"{prefix}{block}.gate.weight"] = lin(s.experts, s.hidden) * np.float32(ROUTER_SCALE)
    for e in range(s.experts):
        t[f"{prefix}{block}.experts.{e}.{gate}.weight"] = lin(s.expert_ff, s.hidden)
        t[f"{prefix}{block}.experts.{e}.{up}.weight"] = lin(s.expert_ff, s.hidden)
        t[f"{prefix}{block}.experts.{e}.{down}.weight"] = lin(s.hidden, s.expert_ff)
    if s.arch == "qwen2moe":
        sff = s.shared_intermediate or s.intermediate
        t[f"{prefix}mlp.shared_expert.gate_proj.weight"] = lin(sff, s.hidden)
        t[f"{prefix}mlp.shared_expert.up_proj.weight"] = lin(sff, s.hidden)
        t[f"{prefix}mlp.shared_expert.down_proj.weight"] = lin(s.hidden, sff)
        t[f"{prefix}mlp.shared_expert_gate.weight"] = lin(1, s.hidden)
    return t


def build_fixture(dest: str, spec: FixtureSpec) -> str:
    if spec.arch not in FIXTURE_ARCHS:
        raise UnsupportedError(f"--arch {spec.arch}", "no fixture for this architecture yet",
                               f"choose from {', '.join(FIXTURE_ARCHS)}")
    if spec.rotation not in ROTATION_PARAMETERIZATIONS or spec.position not in ROTATION_POSITIONS:
        raise UnsupportedError("fixture", f"unknown rotation {spec.rotation!r} or position {spec.position!r}", "")
    if (spec.head_dim is None and spec.hidden % spec.heads) or spec.hd % 2 or spec.heads % spec.kv_heads:
        raise UnsupportedError("fixture", "hidden must split into heads of even size, heads into kv-head groups",
                               "e.g. --hidden 64 --heads 4 --kv-heads 2")
    if spec.so8t and (spec.hd * spec.heads % 8 or spec.hidden % 8):
        raise UnsupportedError("fixture", "rotated widths must be multiples of 8 for SO(8) blocks", "")
    if spec.moe and not 0 < spec.experts_used <= spec.experts:
        raise UnsupportedError("fixture", "an MoE fixture routes each token to 1..experts experts", "")
    tokenizer_vocab = spec.tokenizer_vocab or spec.vocab
    if tokenizer_vocab > spec.vocab:
        raise UnsupportedError("fixture", "the tokenizer cannot have more tokens than the embedding has rows", "")
    if spec.arch == "gemma2" and spec.tokenizer_kind != "spm":
        raise UnsupportedError(f"--tokenizer {spec.tokenizer}", "Gemma 2 ships only a SentencePiece tokenizer",
                               "use --tokenizer spm")
    if spec.tokenizer_kind not in FIXTURE_TOKENIZERS:
        raise UnsupportedError(f"--tokenizer {spec.tokenizer}", "unknown fixture tokenizer",
                               f"choose from {', '.join(FIXTURE_TOKENIZERS)}")
    tensors = fixture_tensors(spec)
    try:
        if spec.tokenizer_kind == "spm":
            style = "phi3" if spec.arch == "phi3" else "gemma" if spec.gemma else "llama"
            files = fixture_spm_tokenizer_files(tokenizer_vocab, seed=spec.seed, style=style)
        else:
            files = fixture_tokenizer_files(tokenizer_vocab, seed=spec.seed)
    except ValueError as e:  # a vocabulary size the fixture corpus cannot give
        raise UnsupportedError(f"fixture --tokenizer {spec.tokenizer_kind}", str(e),
                               "change --vocab / --tokenizer-vocab") from None
    return write_checkpoint(dest, fixture_config(spec), tensors, files, n_shards=spec.shards, dtype=spec.dtype)
