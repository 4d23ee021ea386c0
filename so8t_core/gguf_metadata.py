"""The metadata of a converted model: the keys llama.cpp's converter writes, then ours.

Order and types follow ``convert_hf_to_gguf.py`` (TextModel.set_gguf_parameters and
LlamaModel): general.*, the architecture hyperparameters, general.file_type,
general.quantization_version, the tokenizer, and finally the ``so8t.*`` provenance
keys, which llama.cpp ignores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import gguf
from gguf import Keys as K
from gguf.utility import size_label

from .architectures import ModelSpec, rope_parameters
from .constants import Keys, QuantType
from .gguf_file import GGUFKV, kv_array, kv_f32, kv_str, kv_u32
from .plan import phi3_rope_dims
from .so8t import So8tStructure


@dataclass(frozen=True)
class Provenance:
    """What the ``so8t.*`` keys record about how this GGUF was made."""

    source_fingerprint: str
    structure: So8tStructure
    max_bake_error: float
    converter: str


def general_kvs(name: str, n_params: int) -> list[GGUFKV]:
    # general.architecture is not here: the GGUF writer always puts it first.
    return [
        kv_str(K.General.TYPE, "model"),
        kv_str(K.General.NAME, name),
        kv_str(K.General.SIZE_LABEL, size_label(n_params, n_params, 0, 0)),
    ]


def hparam_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """The architecture's hyperparameters, as llama.cpp's converter class for it writes them."""
    if spec.arch == "phi3":
        return phi3_hparam_kvs(spec, quant)
    kvs = text_model_kvs(spec, quant)
    if spec.arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        a = spec.arch
        kvs += [kv_u32(K.LLM.VOCAB_SIZE.format(arch=a), spec.vocab_size),
                kv_u32(K.Rope.DIMENSION_COUNT.format(arch=a), spec.head_dim)]
    return kvs


def text_model_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """TextModel.set_gguf_parameters: the keys every text architecture shares."""
    a = spec.arch
    kvs = [kv_u32(K.LLM.BLOCK_COUNT.format(arch=a), spec.n_layers)]
    if spec.context_length is not None:
        kvs.append(kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length))
    kvs += [
        kv_u32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden_size),
        kv_u32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.intermediate_size),
        kv_u32(K.Attention.HEAD_COUNT.format(arch=a), spec.n_heads),
        kv_u32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.n_kv_heads),
    ]
    kvs += rope_scaling_kvs(spec)
    if spec.rope_theta is not None:
        kvs.append(kv_f32(K.Rope.FREQ_BASE.format(arch=a), spec.rope_theta))
    if spec.rms_norm_eps is not None:
        kvs.append(kv_f32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.rms_norm_eps))
    if spec.head_dim_explicit:
        kvs += [kv_u32(K.Attention.KEY_LENGTH.format(arch=a), spec.head_dim),
                kv_u32(K.Attention.VALUE_LENGTH.format(arch=a), spec.head_dim)]
    kvs.append(kv_u32(K.General.FILE_TYPE, int(quant.file_type)))
    return kvs


def rope_scaling_kvs(spec: ModelSpec) -> list[GGUFKV]:
    rs = spec.rope_scaling or {}
    rope_type, factor, a = spec.rope_type, rs.get("factor"), spec.arch
    if rope_type == "linear" and factor is not None:
        return [kv_str(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.LINEAR.value),
                kv_f32(K.Rope.SCALING_FACTOR.format(arch=a), factor)]
    if rope_type == "yarn" and factor is not None:
        kvs = [kv_str(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.YARN.value),
               kv_f32(K.Rope.SCALING_FACTOR.format(arch=a), factor),
               kv_u32(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), rs["original_max_position_embeddings"])]
        for key, gguf_key in (("extrapolation_factor", K.Rope.SCALING_YARN_EXT_FACTOR),
                              ("attention_factor", K.Rope.SCALING_YARN_ATTN_FACTOR),
                              ("beta_fast", K.Rope.SCALING_YARN_BETA_FAST),
                              ("beta_slow", K.Rope.SCALING_YARN_BETA_SLOW)):
            value = rs.get(key, rs.get("attn_factor") if key == "attention_factor" else None)
            if value is not None:
                kvs.append(kv_f32(gguf_key.format(arch=a), value))
        return kvs
    if rope_type in ("su", "longrope"):
        return [kv_str(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.LONGROPE.value)]
    return []  # default; llama3 is a rope_freqs tensor, not keys


def phi3_hparam_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """Phi3MiniModel.set_gguf_parameters (and the LongRoPE attention factor)."""
    rope = rope_parameters(spec.config)
    a = spec.arch
    orig_ctx = rope.get("original_max_position_embeddings", spec.context_length)
    kvs = [
        kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length),
        kv_u32(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), orig_ctx),
        kv_u32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden_size),
        kv_u32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.intermediate_size),
        kv_u32(K.LLM.BLOCK_COUNT.format(arch=a), spec.n_layers),
        kv_u32(K.Attention.HEAD_COUNT.format(arch=a), spec.n_heads),
        kv_u32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.n_kv_heads),
        kv_f32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.rms_norm_eps),
        kv_u32(K.Rope.DIMENSION_COUNT.format(arch=a), phi3_rope_dims(spec)),
        kv_f32(K.Rope.FREQ_BASE.format(arch=a), rope.get("rope_theta", 10000.0)),
        kv_u32(K.General.FILE_TYPE, int(quant.file_type)),
        kv_u32(K.Attention.SLIDING_WINDOW.format(arch=a), spec.config.get("sliding_window") or 0),
    ]
    if rope.get("long_factor"):
        scale = spec.context_length / orig_ctx
        rope_type = str(rope.get("rope_type", "")).lower()
        if rope_type in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
        else:  # yarn
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        kvs.append(kv_f32(K.Rope.SCALING_ATTN_FACTOR.format(arch=a), attn))
    return kvs


def provenance_kvs(p: Provenance) -> list[GGUFKV]:
    """so8t.* keys: how this file was made. A plain checkpoint gets only the fingerprint and converter."""
    cfg = p.structure.config
    kvs = []
    if cfg is not None:
        kvs += [kv_u32(Keys.VERSION, cfg.version), kv_str(Keys.ROTATION, cfg.rotation),
                kv_str(Keys.POSITION, cfg.position)]
        if p.structure.gates:  # GGUF has no empty arrays: no key means no gated layer
            kvs.append(kv_array(Keys.BAKED_LAYERS, p.structure.gated_layers, gguf.GGUFValueType.UINT32))
        kvs.append(kv_f32(Keys.MAX_BAKE_ERROR, p.max_bake_error))
    kvs += [kv_str(Keys.SOURCE_FINGERPRINT, p.source_fingerprint), kv_str(Keys.CONVERTER, p.converter)]
    if p.structure.heads:
        kvs.append(kv_array(Keys.TRIALITY_HEADS, [h.head for h in p.structure.heads], gguf.GGUFValueType.STRING))
    return kvs


def model_kvs(name: str, n_params: int, spec: ModelSpec, quant: QuantType,
              tokenizer: Sequence[GGUFKV], provenance: Provenance) -> list[GGUFKV]:
    kvs = general_kvs(name, n_params) + hparam_kvs(spec, quant)
    kvs.append(kv_u32(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION))
    kvs += list(tokenizer)
    kvs += provenance_kvs(provenance)
    return kvs
