"""llama.cpp's quantization mixes: which GGML type each tensor gets for a --quant choice.

A mix (Q4_K_M, Q5_K_S, Q8_0, ...) is llama-quantize's ``llama_ftype``: a default type plus
per-tensor rules that depend on the tensor's role, its layer, the model's shape and the
order tensors are visited in. This module reproduces ``llama_tensor_get_type`` of
src/llama-quant.cpp at the pinned llama.cpp (llama-cpp-python 0.3.36), for dense models:

  1. tensors llama.cpp never quantizes (1-D, norms, not ``*weight``) keep their type (F32);
  2. ``--token-embedding-type`` / ``--output-tensor-type`` win outright (no fallback);
  3. otherwise start from the mix's default type; for a quantized default, the first
     matching ``--tensor-type`` regex overrides it, else (unless ``--pure``) the mix rules
     apply; then a row length that does not fit the type's blocks falls back.

Rules that only concern IQ/TQ/MXFP4 types, MoE or Falcon models are not reproduced: so8t-gguf
offers none of those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from so8t_core.constants import QuantType, quant_type

QUANTIZED_TYPES = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}

# tensor_type_fallback: a row length that is not a multiple of the type's block size
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


@dataclass(frozen=True)
class MixOptions:
    """llama-quantize's per-tensor overrides."""

    tensor_types: tuple[tuple[str, T], ...] = ()  # (regex, type): --tensor-type, first match wins
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    pure: bool = False
    has_imatrix: bool = False


@dataclass(frozen=True)
class ModelShape:
    """What the mix rules need to know about the model."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int

    @classmethod
    def from_spec(cls, spec) -> "ModelShape":
        return cls(arch=spec.arch, n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads)

    @classmethod
    def from_analysis(cls, analysis: dict) -> "ModelShape":
        """From ``analysis.analyze``'s report (what the flow's analyze stage passes on)."""
        hp = analysis["hyperparameters"]
        return cls(arch=analysis["gguf_architecture"], n_layers=hp["layers"], n_heads=hp["heads"],
                   n_kv_heads=hp["kv_heads"])

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B, the only model type the rules look at
        return self.n_layers == 80 and (self.arch == "qwen2"
                                        or (self.arch == "llama" and self.n_heads != self.n_kv_heads))


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensors dense models have."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def category(name: str) -> str:
    """tensor_get_category: the role of a tensor, from its GGUF name."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    # The first clause catches every i_layer < n/8, so the modulo only ever sees i ≥ n/8,
    # where C's and Python's % agree.
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _State:
    n_attention_wv: int
    n_ffn_down: int
    has_tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    n_fallback: int = 0
    fallbacks: list = field(default_factory=list)


def _mix_rules(st: _State, new: T, name: str, shape: Sequence[int], mix: str, model: ModelShape,
               cat: str, opts: MixOptions) -> T:
    """llama_tensor_get_type_impl, dense non-Falcon models, non-IQ mixes."""
    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        if opts.output_tensor_type is not None:
            return opts.output_tensor_type
        if shape[-1] % GGML_QUANT_SIZES[new][0]:
            return T.Q8_0
        return T.Q6_K if new != T.Q8_0 else new
    if cat == "token_embd":
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        return new
    if is_attn_v(cat):
        if mix == "Q2_K":
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = T.Q6_K
        elif mix == "Q4_K_S" and st.i_attention_wv < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        st.i_attention_wv += 1
        return new
    if cat == "ffn_down":
        i_layer, n_layer = st.i_ffn_down, st.n_ffn_down
        if mix == "Q2_K":
            new = T.Q3_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix == "Q4_K_M":
            if use_more_bits(i_layer, n_layer):
                new = T.Q6_K
        elif mix == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            new = T.Q6_K
        elif mix == "Q4_K_S" and i_layer < n_layer // 8:
            new = T.Q5_K
        elif mix in ("Q4_0", "Q5_0") and opts.has_imatrix and i_layer < n_layer // 8:
            new = T.Q4_1 if mix == "Q4_0" else T.Q5_1
        st.i_ffn_down += 1
        return new
    if cat == "attn_output":
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix, new)
    if cat == "attn_qkv":  # unreachable (attn_qkv is attn_v-like), kept out as llama.cpp does
        return new
    return new


def assign_types(tensors: Sequence[tuple[str, Sequence[int]]], quant: QuantType, model: ModelShape,
                 opts: MixOptions = MixOptions()) -> list[T]:
    """The GGML type of every tensor, in llama.cpp's tensor order (``tensors``: (GGUF name, numpy shape))."""
    cats = [category(n) for n, _ in tensors]
    st = _State(n_attention_wv=sum(1 for c in cats if is_attn_v(c)), n_ffn_down=model.n_layers,
                has_tied_embeddings="output" not in cats)
    patterns = [(re.compile(p), t) for p, t in opts.tensor_types]
    out = []
    for (name, shape), cat in zip(tensors, cats):
        if not allows_quantization(name, shape):
            out.append(T.F32)  # the source type: so8t-gguf's float tensors are F32
            continue
        if opts.token_embedding_type is not None and cat == "token_embd":
            out.append(opts.token_embedding_type)
            continue
        if opts.output_tensor_type is not None and cat == "output":
            out.append(opts.output_tensor_type)
            continue
        new = quant.default_type
        if new in QUANTIZED_TYPES:
            manual = next((t for p, t in patterns if p.search(name)), None)
            if manual is not None:
                new = manual
            elif not opts.pure:
                new = _mix_rules(st, new, name, shape, quant.name, model, cat, opts)
            new = _fallback(st, name, shape, new)
        out.append(new)
    return out


def mix_types(plan: Sequence, quants: Sequence[str], model: ModelShape,
              opts: MixOptions = MixOptions()) -> dict[str, list[T]]:
    """Each quant's type for every tensor of a plan (``TensorPlan``s, in llama.cpp's order)."""
    names_shapes = [(p.gguf_name, p.shape) for p in plan]
    return {q: assign_types(names_shapes, quant_type(q), model, opts) for q in quants}


def _fallback(st: _State, name: str, shape: Sequence[int], qtype: T) -> T:
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block == 0:
        return qtype
    st.n_fallback += 1
    new = FALLBACK.get(qtype, qtype)
    if shape[-1] % GGML_QUANT_SIZES[new][0]:
        new = T.F16
    st.fallbacks.append((name, qtype, new))
    return new


def parse_tensor_types(specs: Sequence[str]) -> tuple[tuple[str, T], ...]:
    """``--tensor-type REGEX=TYPE`` values, as llama-quantize reads them (pattern lower-cased)."""
    from so8t_core.constants import ggml_type
    from so8t_core.errors import UnsupportedError

    out = []
    for spec in specs:
        pattern, sep, type_name = spec.partition("=")  # llama-quantize splits at the first '='
        if not sep or not pattern:
            raise UnsupportedError(f"--tensor-type {spec}", "expected REGEX=TYPE", "e.g. --tensor-type attn_v=q8_0")
        try:
            re.compile(pattern.lower())
        except re.error as exc:
            raise UnsupportedError(f"--tensor-type {spec}", f"not a valid regular expression ({exc})", "") from None
        out.append((pattern.lower(), ggml_type(type_name, f"--tensor-type {spec}")))
    return tuple(out)
