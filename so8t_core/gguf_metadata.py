"""The metadata of a converted model: the keys llama.cpp's converter writes, then ours.

Order and types follow ``convert_hf_to_gguf.py`` (TextModel.set_gguf_parameters and
LlamaModel): general.*, the architecture hyperparameters, general.file_type,
general.quantization_version, the tokenizer, and finally the ``so8t.*`` provenance
keys, which llama.cpp ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gguf
from gguf import Keys as K
from gguf.utility import size_label

from .architectures import ModelSpec
from .constants import Keys, QuantType
from .gguf_file import GGUFKV, kv_array, kv_f32, kv_str, kv_u32
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
    a = spec.arch
    kvs = [
        kv_u32(K.LLM.BLOCK_COUNT.format(arch=a), spec.n_layers),
        kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length),
        kv_u32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden_size),
        kv_u32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.intermediate_size),
        kv_u32(K.Attention.HEAD_COUNT.format(arch=a), spec.n_heads),
        kv_u32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.n_kv_heads),
    ]
    kvs += rope_scaling_kvs(spec)
    kvs += [
        kv_f32(K.Rope.FREQ_BASE.format(arch=a), spec.rope_theta),
        kv_f32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.rms_norm_eps),
    ]
    if spec.head_dim_explicit:
        kvs += [kv_u32(K.Attention.KEY_LENGTH.format(arch=a), spec.head_dim),
                kv_u32(K.Attention.VALUE_LENGTH.format(arch=a), spec.head_dim)]
    kvs.append(kv_u32(K.General.FILE_TYPE, int(quant.file_type)))
    if spec.arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        kvs += [kv_u32(K.LLM.VOCAB_SIZE.format(arch=a), spec.vocab_size),
                kv_u32(K.Rope.DIMENSION_COUNT.format(arch=a), spec.head_dim)]
    return kvs


def rope_scaling_kvs(spec: ModelSpec) -> list[GGUFKV]:
    rs = spec.rope_scaling or {}
    rope_type = rs.get("rope_type", rs.get("type"))
    factor = rs.get("factor")
    a = spec.arch
    if rope_type == "linear" and factor is not None:
        return [kv_str(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.LINEAR.value),
                kv_f32(K.Rope.SCALING_FACTOR.format(arch=a), factor)]
    if rope_type == "yarn" and factor is not None:
        return [kv_str(K.Rope.SCALING_TYPE.format(arch=a), gguf.RopeScalingType.YARN.value),
                kv_f32(K.Rope.SCALING_FACTOR.format(arch=a), factor),
                kv_u32(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), rs["original_max_position_embeddings"])]
    return []  # "default"; llama3/longrope factors arrive with the architectures issue


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
