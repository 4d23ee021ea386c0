"""The metadata of a converted model: the keys llama.cpp's converter writes, then ours.

Order and types follow ``convert_hf_to_gguf.py`` (ModelBase.prepare_metadata,
TextModel.set_gguf_parameters and the architecture's class): keys convert sets while
preparing tensors (Phi-3's LongRoPE attention factor), general.* (from gguf-py's own
``gguf.Metadata``: model card, config.json, generation_config.json, folder name), the
architecture hyperparameters, general.file_type, general.quantization_version, the
tokenizer, and finally the ``so8t.*`` provenance keys, which llama.cpp ignores.
``tests/test_converter_parity.py`` checks all of it against convert itself.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import gguf
import yaml
from gguf import Keys as K
from gguf.utility import size_label

from so8t_core.constants import Keys, QuantType
from so8t_core.errors import CheckpointError
from so8t_core.gguf_file import GGUFKV, kv_array, kv_f32, kv_str, kv_u32
from so8t_core.plan import phi3_rope_dims
from so8t_core.source.architectures import ModelSpec, gemma3_rope_parameters, rope_parameters
from so8t_core.source.so8t import So8tStructure

# The files gguf.Metadata.load reads from a model folder (besides its name).
MODEL_CARD_FILES = ("README.md", "config.json", "generation_config.json")

# transformers config classes that always carry head_dim (hidden_size // num_attention_heads unless
# config.json names it). convert reads config.json through AutoConfig(...).to_dict(), so for these it
# writes attention.key_length/value_length even when config.json has no head_dim; Qwen2Config and
# Phi3Config have no head_dim attribute.
HF_CONFIG_HAS_HEAD_DIM = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"})


@dataclass(frozen=True)
class Provenance:
    """What the ``so8t.*`` keys record about how this GGUF was made."""

    source_fingerprint: str
    structure: So8tStructure
    max_bake_error: float
    converter: str


def parameter_counts(tensors: Sequence[tuple[str, Sequence[int]]]) -> tuple[int, int, int, int]:
    """(total, shared, per-expert, expert count) parameters of a model's tensors (name, shape), as gguf-py's
    GGUFWriter.get_total_parameter_count counts them for convert's size label: a 3-D ``_exps.`` tensor is
    one tensor per expert."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for name, shape in tensors:
        size = math.prod(shape)
        total += size
        if "_exps." in name and len(shape) >= 3:
            count = shape[0]  # numpy order: experts first (GGUF's last dimension)
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
    return total, shared, expert, expert_sum // n_expert_tensors if n_expert_tensors else 0


def general_kvs(arch: str, folder_name: str, files: Mapping[str, bytes], n_params: int | tuple[int, int, int, int]
                ) -> list[GGUFKV]:
    """general.type and the general.* keys convert writes (ModelBase.prepare_metadata), from gguf-py itself.

    ``files`` holds the folder's README.md / config.json / generation_config.json (those present);
    ``folder_name`` is the model's name (convert's model folder name: ours by default, else
    ``--name``), which gguf.Metadata mines for name, basename, finetune, version and size label
    when the model card and config.json do not say, and which convert takes verbatim as
    general.name when nothing gives one.
    """
    counts = n_params if isinstance(n_params, tuple) else (n_params, n_params, 0, 0)
    n_params = counts[0]
    with tempfile.TemporaryDirectory(prefix="so8t-model-card-") as tmp:
        model_dir = Path(tmp) / folder_name  # Metadata reads the folder's name: give it the source's
        model_dir.mkdir()
        for name in MODEL_CARD_FILES:
            if name in files:
                (model_dir / name).write_bytes(files[name])
        try:
            metadata = gguf.Metadata.load(None, model_dir, None, n_params)
        except (yaml.YAMLError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad = "README.md front matter" if isinstance(e, yaml.YAMLError) else "README.md or generation_config.json"
            raise CheckpointError(folder_name, f"{bad} cannot be read ({type(e).__name__}: {str(e)[:120]})",
                                  "fix the YAML front matter of README.md (or remove it)") from None
    _mirror_newer_metadata(metadata, files.get("generation_config.json"))
    if metadata.name is None:
        metadata.name = folder_name  # convert's fallback: the model directory's name
    if metadata.size_label is None and n_params > 0:
        metadata.size_label = size_label(*counts)  # "4x1.2M" with experts
    writer = gguf.GGUFWriter(None, arch)  # in memory: only its key/value list is used
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    return [GGUFKV(key, v.value, v.type, v.sub_type) for key, v in writer.kv_data[0].items()
            if key != K.General.ARCHITECTURE]  # written by our GGUF writer itself, always first


def _mirror_newer_metadata(metadata: gguf.Metadata, gen_config_bytes: bytes | None) -> None:
    """What the gguf-py vendored by the llama.cpp we validate against reads and gguf 0.19.0 does not.

    Its Metadata.load falls back from generation_config.json's ``penalty_repeat`` to transformers'
    ``repetition_penalty`` (general.sampling.penalty_repeat). Applied only where the installed gguf
    left the value unset, so a gguf that does it itself is not second-guessed.
    """
    if metadata.sampling_penalty_repeat is not None or not gen_config_bytes:
        return
    try:
        gen = json.loads(gen_config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # Metadata.load ignores an unreadable generation_config.json too
    if isinstance(gen, dict) and gen.get("repetition_penalty") is not None:
        metadata.sampling_penalty_repeat = gen["repetition_penalty"]


def model_folder_name(uri: str, fallback: str) -> str:
    """The checkpoint folder's name, as convert sees ``Path(model_dir).name``."""
    name = os.path.basename(uri.rstrip("/"))
    return fallback if name in ("", ".", "..") else name


def hparam_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """The architecture's hyperparameters, as llama.cpp's converter class for it writes them."""
    if spec.arch == "phi3":
        return phi3_hparam_kvs(spec, quant)
    if spec.arch == "gemma2":
        return gemma2_hparam_kvs(spec, quant)
    if spec.arch == "gemma3":
        return gemma3_hparam_kvs(spec, quant)
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
    if spec.n_experts:
        kvs += [kv_u32(K.LLM.EXPERT_COUNT.format(arch=a), spec.n_experts),
                kv_u32(K.LLM.EXPERT_USED_COUNT.format(arch=a), spec.n_experts_used)]
    if spec.head_dim_explicit or spec.hf_architecture in HF_CONFIG_HAS_HEAD_DIM:
        kvs += [kv_u32(K.Attention.KEY_LENGTH.format(arch=a), spec.head_dim),
                kv_u32(K.Attention.VALUE_LENGTH.format(arch=a), spec.head_dim)]
    kvs.append(kv_u32(K.General.FILE_TYPE, int(quant.file_type)))
    if spec.rules.experts == "qwen":  # Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel's too)
        kvs.append(kv_u32(K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), spec.expert_intermediate_size))
        if spec.shared_expert_intermediate_size:
            kvs.append(kv_u32(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=a),
                              spec.shared_expert_intermediate_size))
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
    """Phi3MiniModel.set_gguf_parameters."""
    rope = rope_parameters(spec.config)
    a = spec.arch
    return [
        kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length),
        kv_u32(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), phi3_original_context(spec)),
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


def gemma2_hparam_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """Gemma2Model.set_gguf_parameters (no RoPE keys: llama.cpp's defaults are Gemma 2's)."""
    a, cfg = spec.arch, spec.config
    return [
        kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length),
        kv_u32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden_size),
        kv_u32(K.LLM.BLOCK_COUNT.format(arch=a), spec.n_layers),
        kv_u32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.intermediate_size),
        kv_u32(K.Attention.HEAD_COUNT.format(arch=a), spec.n_heads),
        kv_u32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.n_kv_heads),
        kv_f32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.rms_norm_eps),
        kv_u32(K.Attention.KEY_LENGTH.format(arch=a), spec.head_dim),
        kv_u32(K.Attention.VALUE_LENGTH.format(arch=a), spec.head_dim),
        kv_u32(K.General.FILE_TYPE, int(quant.file_type)),
        kv_f32(K.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=a), cfg["attn_logit_softcapping"]),
        kv_f32(K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a), cfg["final_logit_softcapping"]),
        kv_u32(K.Attention.SLIDING_WINDOW.format(arch=a), cfg["sliding_window"]),
    ]


def gemma3_hparam_kvs(spec: ModelSpec, quant: QuantType) -> list[GGUFKV]:
    """TextModel.set_gguf_parameters with Gemma3Model's overrides (same keys, same places) and additions:
    RoPE scaling and base of the global layers, the sliding layers' base, the final soft-capping when set,
    and the sliding window unless there is none (``sliding_window_pattern`` 1)."""
    a, cfg = spec.arch, spec.config
    full, sliding = gemma3_rope_parameters(cfg)
    kvs = [kv_u32(K.LLM.BLOCK_COUNT.format(arch=a), spec.n_layers),
           kv_u32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context_length),
           kv_u32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden_size),
           kv_u32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.intermediate_size),
           kv_u32(K.Attention.HEAD_COUNT.format(arch=a), spec.n_heads),
           kv_u32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.n_kv_heads)]
    kvs += rope_scaling_kvs(spec)
    kvs.append(kv_f32(K.Rope.FREQ_BASE.format(arch=a), full.get("rope_theta", 1_000_000.0)))
    if sliding.get("rope_theta") is not None:
        kvs.append(kv_f32(K.Rope.FREQ_BASE_SWA.format(arch=a), sliding["rope_theta"]))
    kvs += [kv_f32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.rms_norm_eps),
            kv_u32(K.Attention.KEY_LENGTH.format(arch=a), spec.head_dim),
            kv_u32(K.Attention.VALUE_LENGTH.format(arch=a), spec.head_dim),
            kv_u32(K.General.FILE_TYPE, int(quant.file_type))]
    if cfg.get("final_logit_softcapping"):
        kvs.append(kv_f32(K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a), cfg["final_logit_softcapping"]))
    if cfg.get("sliding_window_pattern") != 1:
        kvs.append(kv_u32(K.Attention.SLIDING_WINDOW.format(arch=a), cfg["sliding_window"]))
    return kvs


def phi3_original_context(spec: ModelSpec) -> int:
    return rope_parameters(spec.config).get("original_max_position_embeddings", spec.context_length)


def tensor_stage_kvs(spec: ModelSpec) -> list[GGUFKV]:
    """Keys convert sets while preparing tensors (generate_extra_tensors), so before general.*.

    Phi-3 with LongRoPE factors: the attention factor, beside the rope_factors_long/short tensors.
    """
    rope = rope_parameters(spec.config)
    if spec.arch != "phi3" or not rope.get("long_factor"):
        return []
    orig_ctx = phi3_original_context(spec)
    scale = spec.context_length / orig_ctx
    rope_type = str(rope.get("rope_type", "")).lower()
    if rope_type in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
    else:  # yarn
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    return [kv_f32(K.Rope.SCALING_ATTN_FACTOR.format(arch=spec.arch), attn)]


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


def model_kvs(general: Sequence[GGUFKV], spec: ModelSpec, quant: QuantType,
              tokenizer: Sequence[GGUFKV], provenance: Provenance, extra: Sequence[GGUFKV] = ()) -> list[GGUFKV]:
    """Every key of the model GGUF, in convert's order; ``general`` from :func:`general_kvs`."""
    kvs = tensor_stage_kvs(spec) + list(general) + hparam_kvs(spec, quant)
    kvs.append(kv_u32(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION))
    kvs += list(tokenizer)
    kvs += list(extra)
    kvs += provenance_kvs(provenance)
    return kvs
