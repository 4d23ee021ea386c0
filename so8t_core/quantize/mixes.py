"""llama.cpp's quantization mixes: which GGML type each tensor gets for a --quant choice.

A mix (Q4_K_M, IQ3_M, Q8_0, ...) is llama-quantize's ``llama_ftype``: a default type plus
per-tensor rules that depend on the tensor's role, its layer, the model's shape, the order
tensors are visited in and whether an importance matrix is given. This module reproduces
``llama_tensor_get_type`` of src/llama-quant.cpp at the pinned llama.cpp (llama-cpp-python
0.3.36), for dense and mixture-of-experts models:

  1. tensors llama.cpp never quantizes (1-D, norms, not ``*weight``) keep their type (F32);
  2. ``--token-embedding-type`` / ``--output-tensor-type`` win outright (no fallback);
  3. otherwise start from the mix's default type; for a quantized default, the first
     matching ``--tensor-type`` regex overrides it, else (unless ``--pure``) the mix rules
     apply; then a row length that does not fit the type's blocks falls back.

and ``tensor_requires_imatrix``: the very-low-bit types llama-quantize refuses to write
without an importance matrix (:func:`check_imatrix_requirements`). The MoE branches are those of
the expert models so8t-gguf converts (Mixtral, Qwen2-MoE, Qwen3-MoE): 3-D ``_exps`` tensors (MXFP4 in
MXFP4_MOE), the layer read from the name for the FFN rules, the ``n_expert >= 4`` and ``== 8`` bumps of
attn_v, attn_k and attn_output. Falcon's branches are not reproduced (not a base so8t-gguf converts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from so8t_core.constants import FLOAT_TYPES, HAS_Q2_0, SUPPORTED_TENSOR_TYPES, QuantType, quant_type
from so8t_core.errors import UnsupportedError

QUANTIZED_TYPES = frozenset(SUPPORTED_TENSOR_TYPES) - set(FLOAT_TYPES)  # ggml_is_quantized

# tensor_type_fallback: a row length that is not a multiple of the type's block size
FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
    **({T.Q2_0: T.Q4_0} if HAS_Q2_0 else {}),
}

# Mixes the rules treat as a family (llama_tensor_get_type_impl's ftype lists).
IQ1_IQ2 = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
OUTPUT_Q5_K = IQ1_IQ2 | {"IQ3_XXS"}  # the output tensor gets Q5_K, not Q6_K
# Types whose quantizer llama-quantize refuses to run without importance data (on every tensor
# but token_embd and output), and those libggml itself aborts on without it.
REQUIRE_IMATRIX = frozenset({T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S})
GGML_REQUIRES_IMATRIX = frozenset({T.IQ2_XXS, T.IQ2_XS, T.IQ1_S})  # ggml_quantize_requires_imatrix
# attn_output of an 8-expert model: Q5_K in these mixes, else the mix's type
ATTN_OUTPUT_Q5_K_WITH_8_EXPERTS = frozenset({"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                                             "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"})
IMATRIX_HINT = ("pass --calibration with your text (or the word builtin, for the built-in text) to compute one, "
                "or --imatrix FILE (from llama-imatrix)")


@dataclass(frozen=True)
class MixOptions:
    """llama-quantize's per-tensor overrides, and whether it is given an importance matrix."""

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
    n_expert: int = 0  # routed experts per layer (llama.cpp's hparams.n_expert; 0 for a dense model)

    @classmethod
    def from_spec(cls, spec) -> "ModelShape":
        return cls(arch=spec.arch, n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads,
                   n_expert=spec.n_experts)

    @classmethod
    def from_analysis(cls, analysis: dict) -> "ModelShape":
        """From ``analysis.analyze``'s report (what the flow's analyze stage passes on)."""
        hp = analysis["hyperparameters"]
        return cls(arch=analysis["gguf_architecture"], n_layers=hp["layers"], n_heads=hp["heads"],
                   n_kv_heads=hp["kv_heads"], n_expert=(analysis.get("experts") or {}).get("count", 0))

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B, the only model type the rules look at
        return self.n_layers == 80 and (self.arch == "qwen2"
                                        or (self.arch == "llama" and self.n_heads != self.n_kv_heads))


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims of a tensor of numpy ``shape``: its GGML dimensions up to the last one above 1, so a
    (1, n) matrix (Qwen2-MoE's ffn_gate_inp_shexp) is 1-D to llama.cpp."""
    dims = len(shape)
    while dims > 1 and shape[len(shape) - dims] == 1:
        dims -= 1
    return max(dims, 1)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensors of the models so8t-gguf converts."""
    return (ggml_n_dims(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
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


def requires_imatrix(name: str, qtype: T, mix: str) -> bool:
    """tensor_requires_imatrix: llama-quantize refuses to write this tensor in ``qtype`` without
    importance data (the result "will be garbage"). The embedding and the output are exempt."""
    if category(name) in ("token_embd", "output"):
        return False
    return qtype in REQUIRE_IMATRIX or (qtype == T.Q2_K and mix == "Q2_K_S")


@dataclass
class _State:
    n_attention_wv: int
    n_layers: int  # n_ffn_down = n_ffn_gate = n_ffn_up: the model's layers
    has_tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    fallbacks: list = field(default_factory=list)


def _output_rule(new: T, shape: Sequence[int], mix: str, opts: MixOptions) -> T:
    """output.weight, and token_embd.weight when the embeddings are tied."""
    if opts.output_tensor_type is not None:
        return opts.output_tensor_type
    if mix == "MXFP4_MOE" or shape[-1] % GGML_QUANT_SIZES[new][0]:
        return T.Q8_0
    if mix in OUTPUT_Q5_K:
        return T.Q5_K
    return T.Q6_K if new != T.Q8_0 else new


def _layer(st_counter: int, name: str, model: ModelShape) -> int:
    """llama-quant.cpp's layer_info: with experts the layer is read from the name (blk.N.), else the counter."""
    return int(name.split(".")[1]) if model.n_expert > 1 else st_counter


def _mix_rules(st: _State, new: T, shape: Sequence[int], mix: str, model: ModelShape, cat: str,
               opts: MixOptions, name: str = "") -> T:
    """llama_tensor_get_type_impl for non-Falcon models, branch for branch."""
    n = st.n_layers
    n_expert = model.n_expert
    if cat == "output" or (st.has_tied_embeddings and cat == "token_embd"):
        got = _output_rule(new, shape, mix, opts)
        # llama.cpp's output rule makes a tensor whose rows do not fit the mix's blocks Q8_0 itself
        # (llama-quantize counts no fallback): the card still says that it is not the rule's type.
        wanted = _output_rule(new, [GGML_QUANT_SIZES[new][0]], mix, opts)  # the rule's type for rows that fit
        if got != wanted:
            st.fallbacks.append((name, wanted, got))
        return got
    if mix == "MXFP4_MOE":  # the experts (3-D, more than one) to MXFP4, everything else to Q8_0
        return T.MXFP4 if len(shape) == 3 and shape[0] > 1 else T.Q8_0
    if cat == "token_embd":
        if opts.token_embedding_type is not None:
            return opts.token_embedding_type
        if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return T.Q2_K
        if mix in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return T.IQ3_S
        if mix in ("TQ1_0", "TQ2_0", "Q2_0"):
            return T.Q4_K
        return new
    if mix in IQ1_IQ2:
        more = T.IQ3_S if mix in ("IQ2_S", "IQ2_M") else T.Q2_K
        if is_attn_v(cat):
            new = T.Q4_K if model.n_gqa >= 4 or n_expert >= 4 else more
            st.i_attention_wv += 1
        elif n_expert == 8 and cat == "attn_k":
            new = T.Q4_K
        elif cat == "ffn_down":
            if st.i_ffn_down < n // 8:
                new = more
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                new = T.Q5_K
            elif mix in ("IQ1_S", "IQ1_M"):
                new = T.IQ2_XXS
            elif mix in ("IQ2_S", "IQ2_M"):
                new = T.IQ3_S
        return new
    if is_attn_v(cat):
        if mix == "Q2_K":
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif mix == "Q2_K_S" and model.n_gqa >= 4:
            new = T.Q4_K
        elif mix == "IQ3_XXS":
            new = T.Q4_K if model.n_gqa >= 4 else T.IQ3_XXS if opts.has_imatrix else T.IQ3_S
        elif mix in ("IQ3_XS", "IQ3_S") and model.n_gqa >= 4:
            new = T.Q4_K
        elif mix == "IQ3_M":
            new = T.Q4_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4:
            new = T.Q5_K
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = T.Q6_K
        elif mix == "Q4_K_S" and st.i_attention_wv < 4:
            new = T.Q5_K
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if n_expert == 8:
            new = T.Q8_0  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        st.i_attention_wv += 1
        return new
    if cat == "attn_k" and n_expert == 8:
        return T.Q8_0
    if cat in ("attn_k", "attn_q"):
        return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(mix, new)
    if cat == "ffn_down":
        i = _layer(st.i_ffn_down, name, model)
        if mix == "Q2_K":
            new = T.Q3_K
        elif mix == "Q2_K_S":
            if i < n // 8:
                new = T.Q4_K
        elif mix == "IQ3_XXS" and not opts.has_imatrix:
            new = T.Q4_K if i < n // 8 else T.Q3_K
        elif mix == "Q3_K_M":
            new = T.Q5_K if i < n // 16 else T.Q4_K
        elif mix == "IQ3_M" and (i < n // 8 or (n_expert == 8 and use_more_bits(i, n))):
            new = T.Q4_K
        elif mix == "Q3_K_L":
            new = T.Q5_K
        elif mix == "Q4_K_M":
            if use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and mix in ("IQ4_NL", "IQ4_XS") and not opts.has_imatrix:
            new = T.Q5_K
        elif mix == "Q5_K_M" and use_more_bits(i, n):
            new = T.Q6_K
        elif mix == "Q4_K_S" and i < n // 8:
            new = T.Q5_K
        elif mix in ("Q4_0", "Q5_0") and opts.has_imatrix and i < n // 8:
            new = T.Q4_1 if mix == "Q4_0" else T.Q5_1
        st.i_ffn_down += 1
        return new
    if cat == "attn_output":
        if n_expert == 8:
            return T.Q5_K if mix in ATTN_OUTPUT_Q5_K_WITH_8_EXPERTS else new
        return {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K, "IQ3_M": T.Q4_K}.get(mix, new)
    # (llama.cpp's own attn_qkv branch comes here, and is never reached: attn_qkv is attn_v-like.)
    if cat in ("ffn_gate", "ffn_up"):
        i = _layer(st.i_ffn_gate if cat == "ffn_gate" else st.i_ffn_up, name, model)
        if mix == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = T.IQ3_XXS
        if cat == "ffn_gate":
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
    return new


def assign_types(tensors: Sequence[tuple[str, Sequence[int]]], quant: QuantType, model: ModelShape,
                 opts: MixOptions = MixOptions(), fallbacks: list | None = None) -> list[T]:
    """The GGML type of every tensor, in llama.cpp's tensor order (``tensors``: (GGUF name, numpy shape));
    ``fallbacks``, when given, receives (name, the rules' type, the type used) of each tensor whose
    rows did not fit the rules' type, the output rule's Q8_0 included (the model card warns of them)."""
    cats = [category(n) for n, _ in tensors]
    st = _State(n_attention_wv=sum(1 for c in cats if is_attn_v(c)), n_layers=model.n_layers,
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
                new = _mix_rules(st, new, shape, quant.name, model, cat, opts, name)
            new = _fallback(st, name, shape, new, quant.name)
        out.append(new)
    if fallbacks is not None:
        fallbacks.extend(st.fallbacks)
    return out


def mix_types(plan: Sequence, quants: Sequence[str], model: ModelShape, opts: MixOptions = MixOptions(),
              covered: Collection[str] | None = None,
              fallbacks: dict[str, list] | None = None) -> dict[str, list[T]]:
    """Each quant's type for every tensor of a plan (``TensorPlan``s, in llama.cpp's order),
    refusing what llama-quantize refuses (:func:`check_imatrix_requirements`; ``covered``: the
    tensors the importance matrix has entries for, None without one); ``fallbacks``, when given,
    receives each quant's list of :func:`assign_types`'s fallbacks."""
    names_shapes = [(p.gguf_name, p.shape) for p in plan]
    fell: dict[str, list] = {q: [] for q in quants}
    types = {q: assign_types(names_shapes, quant_type(q), model, opts, fell[q]) for q in quants}
    if fallbacks is not None:
        fallbacks.update(fell)
    check_imatrix_requirements(names_shapes, types, covered)
    return types


def _fallback(st: _State, name: str, shape: Sequence[int], qtype: T, mix: str) -> T:
    block = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block == 0:
        return qtype
    st.n_fallback += 1
    new = FALLBACK.get(qtype)
    if new is None:
        if block > 32:  # llama-quantize gives up on the whole file
            raise UnsupportedError(f"--quant {mix}", f"{name} has rows of {shape[-1]}, not a multiple of "
                                   f"{qtype.name}'s {block}, and llama.cpp defines no fallback for {qtype.name}",
                                   "choose another mix, or another type for it with --tensor-type")
        new = qtype  # a 32-block type: F16 below, as for a fallback that does not fit
    if shape[-1] % GGML_QUANT_SIZES[new][0]:
        new = T.F16
    if st.fallbacks and st.fallbacks[-1][0] == name:  # the output rule's Q8_0 did not fit either: one entry
        st.fallbacks[-1] = (name, st.fallbacks[-1][1], new)
    else:
        st.fallbacks.append((name, qtype, new))
    return new


def check_imatrix_requirements(tensors: Sequence[tuple[str, Sequence[int]]], types: dict[str, Sequence[T]],
                               covered: Collection[str] | None) -> None:
    """Refuse, before any work, what llama-quantize refuses without importance data.

    ``types``: quant → each tensor's type (:func:`mix_types`); ``covered``: the tensors the
    importance matrix has entries for (None: no importance matrix). llama-quantize refuses a
    mix without an imatrix when any tensor but the embedding and the output gets a very-low-bit
    type (``tensor_requires_imatrix``), and stops at a tensor of such a type the imatrix has no
    entry for; libggml aborts the process on IQ2_XXS, IQ2_XS and IQ1_S without importance data
    even for those two.
    """
    for quant, qtypes in types.items():
        for (name, shape), qtype in zip(tensors, qtypes, strict=True):
            if not allows_quantization(name, shape) or name in (covered or ()):
                continue
            if requires_imatrix(name, qtype, quant):
                why = (f"llama-quantize refuses {quant} without an importance matrix ({name} would be {qtype.name})"
                       if covered is None else f"the importance matrix has no entry for {name}, which {quant} "
                       f"makes {qtype.name}: llama-quantize stops there")
                raise UnsupportedError(f"--quant {quant}", why, IMATRIX_HINT)
            if qtype in GGML_REQUIRES_IMATRIX:
                raise UnsupportedError(f"--quant {quant}", f"{name} would be {qtype.name}, which llama.cpp cannot "
                                       "quantize without importance data, and the importance matrix has none for it",
                                       "give it another type with --tensor-type or --output-tensor-type")


def parse_tensor_types(specs: Sequence[str]) -> tuple[tuple[str, T], ...]:
    """``--tensor-type REGEX=TYPE`` values, as llama-quantize reads them (pattern lower-cased)."""
    from so8t_core.constants import ggml_type

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
