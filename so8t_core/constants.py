"""One source of truth for names: SO8T keys, GGUF keys we add, quant types, file names.

Modelled on gguf-py's ``constants.py``: every string that two modules must agree on
lives here, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType, LlamaFileType

from so8t_core.errors import UnsupportedError

__version__ = "0.1.0"
CONVERTER = f"so8t-gguf {__version__}"  # written into every GGUF, manifest and model card

# --- SO8T checkpoint format (docs/so8t-format.md) --------------------------------------

SO8T_FORMAT_VERSION = 1
SO8T_CONFIG_KEY = "so8t"
ROTATION_PARAMETERIZATIONS = ("cayley", "expm")
ROTATION_POSITIONS = ("pre_o_proj", "post_o_proj")
ROTATION_BLOCK = 8

# model.layers.{i}.self_attn.so8t_rotation_gate.theta, shape [D/8, 8, 8]; also the original
# project's aliases (self_attn.o_proj.so8t_rotation_gate.*, self_attn.rotation_gate.*) and a
# stored rotation R (.rotation) instead of θ. Group 1: layer; group 2: "theta" or "rotation".
GATE_RE = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.(?:o_proj\.)?(?:so8t_)?rotation_gate\.(theta|rotation)$")

# Triality heads read the final normed hidden state; the task head is the LM head.
TRIALITY_PREFIX = "so8t.triality."
TRIALITY_HEADS = ("safety", "authority")
TRIALITY_HEAD_RE = re.compile(r"^so8t\.triality\.(safety|authority)_head\.(weight|bias)$")
TRIALITY_DEFAULT_LABELS = {
    "safety": ("safe", "unsafe"),
    "authority": ("handle", "escalate"),
}

# --- GGUF keys so8t-gguf writes ---------------------------------------------------------


class Keys:
    """GGUF metadata keys of our own (``so8t.*``); llama.cpp ignores unknown keys."""

    VERSION = "so8t.version"
    ROTATION = "so8t.rotation"
    POSITION = "so8t.position"
    BAKED_LAYERS = "so8t.baked_layers"
    MAX_BAKE_ERROR = "so8t.max_bake_error"
    SOURCE_FINGERPRINT = "so8t.source_fingerprint"
    TRIALITY_HEADS = "so8t.triality_heads"
    CONVERTER = "so8t.converter"

    # Sidecar (<name>.so8t-heads.gguf)
    HEADS_NAMES = "so8t.heads.names"
    HEADS_INPUT = "so8t.heads.input"
    HEADS_LABELS = "so8t.heads.{head}.labels"
    HEADS_EXTRA = "so8t.heads.extra"  # classifier heads of SO8T variants, stored as they are

    # LoRA adapter GGUF (so8t-gguf lora-gguf): the PEFT adapter it was made from. Its
    # so8t.source_fingerprint is the base checkpoint's, as in the base model's GGUF.
    LORA_SHA256 = "so8t.lora.sha256"
    LORA_RANK = "so8t.lora.r"
    LORA_ALPHA = "so8t.lora.lora_alpha"  # PEFT's; llama.cpp's adapter.lora.alpha is scale × r
    LORA_SCALING = "so8t.lora.scaling"  # "lora" (lora_alpha / r) or "rslora" (lora_alpha / sqrt(r))
    LORA_TARGET_MODULES = "so8t.lora.target_modules"


SIDECAR_ARCH = "so8t-heads"
# Which hidden state the heads read: llama.cpp's embeddings output (after output_norm).
HEADS_INPUT_FINAL_NORM = "output_norm"

# --- Quantization types ------------------------------------------------------------------


@dataclass(frozen=True)
class QuantType:
    """A user-facing quant choice (what ``--quant`` accepts): one of llama-quantize's mixes.

    The per-tensor types of a mix are decided by so8t_core.quantize.mixes.
    """

    name: str
    default_type: GGMLQuantizationType  # the mix's default type (llama_ftype_get_default_type)
    file_type: LlamaFileType  # general.file_type written to the GGUF


# Q2_0 (type 42, file type 41: 2.25 bpw in blocks of 64) is in the gguf-py of the pinned llama.cpp, which
# `make install` installs, and not in PyPI's gguf 0.19.0 (the same version number): with that one, the
# type and its mix are not offered, and asking for them says how to get them (UNAVAILABLE_MIXES).
HAS_Q2_0 = hasattr(GGMLQuantizationType, "Q2_0")

QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("F32", GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
        QuantType("F16", GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        QuantType("BF16", GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
        QuantType("Q8_0", GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        QuantType("Q6_K", GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K),
        QuantType("Q5_K_M", GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
        QuantType("Q5_K_S", GGMLQuantizationType.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
        QuantType("Q5_1", GGMLQuantizationType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
        QuantType("Q5_0", GGMLQuantizationType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
        QuantType("Q4_K_M", GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
        QuantType("Q4_K_S", GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
        QuantType("Q4_1", GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
        QuantType("Q4_0", GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
        QuantType("IQ4_NL", GGMLQuantizationType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
        QuantType("MXFP4_MOE", GGMLQuantizationType.MXFP4, LlamaFileType.MOSTLY_MXFP4_MOE),
        QuantType("IQ4_XS", GGMLQuantizationType.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
        QuantType("Q3_K_L", GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
        QuantType("Q3_K_M", GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
        QuantType("IQ3_M", GGMLQuantizationType.IQ3_S, LlamaFileType.MOSTLY_IQ3_M),
        QuantType("IQ3_S", GGMLQuantizationType.IQ3_S, LlamaFileType.MOSTLY_IQ3_S),
        QuantType("Q3_K_S", GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
        QuantType("IQ3_XS", GGMLQuantizationType.IQ3_S, LlamaFileType.MOSTLY_IQ3_XS),
        QuantType("IQ3_XXS", GGMLQuantizationType.IQ3_XXS, LlamaFileType.MOSTLY_IQ3_XXS),
        QuantType("Q2_K", GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K),
        QuantType("Q2_K_S", GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K_S),
        QuantType("IQ2_M", GGMLQuantizationType.IQ2_S, LlamaFileType.MOSTLY_IQ2_M),
        QuantType("IQ2_S", GGMLQuantizationType.IQ2_XS, LlamaFileType.MOSTLY_IQ2_S),
        QuantType("IQ2_XS", GGMLQuantizationType.IQ2_XS, LlamaFileType.MOSTLY_IQ2_XS),
        QuantType("IQ2_XXS", GGMLQuantizationType.IQ2_XXS, LlamaFileType.MOSTLY_IQ2_XXS),
        QuantType("IQ1_M", GGMLQuantizationType.IQ1_M, LlamaFileType.MOSTLY_IQ1_M),
        QuantType("IQ1_S", GGMLQuantizationType.IQ1_S, LlamaFileType.MOSTLY_IQ1_S),
        # For models trained ternary or 1-bit (BitNet b1.58, TriLMs, Bonsai; Q2_0's quantizer rounds to
        # -1, 0, +1 times a block's absmax): on other weights these lose most of the model, and validation says so.
        *((QuantType("Q2_0", GGMLQuantizationType.Q2_0, LlamaFileType.MOSTLY_Q2_0),) if HAS_Q2_0 else ()),
        QuantType("TQ2_0", GGMLQuantizationType.TQ2_0, LlamaFileType.MOSTLY_TQ2_0),
        QuantType("TQ1_0", GGMLQuantizationType.TQ1_0, LlamaFileType.MOSTLY_TQ1_0),
        QuantType("Q1_0", GGMLQuantizationType.Q1_0, LlamaFileType.MOSTLY_Q1_0),
    )
}

def bits_per_weight(tensor_bytes: int, n_weights: int) -> float:
    """Bits per weight, the one definition every report uses (the model card, ``inspect``, the
    run's summary, the stats table): 8 × the bytes of the tensors' data / the weights (elements)
    in them, as llama.cpp's model loader reports a model's BPW. A file's header, metadata (the
    tokenizer alone can be megabytes) and alignment padding are not counted."""
    return 8.0 * tensor_bytes / n_weights if n_weights else 0.0


# Asked-for names that are not llama.cpp storage types, with what to say instead.
NOT_STORAGE_TYPES = {
    "Q8_K": "Q8_K is llama.cpp's internal dot-product type, not a file type; use Q8_0",
}
# Mixes of the pinned llama.cpp so8t-gguf cannot write with the installed gguf, with why and how to get them.
UNAVAILABLE_MIXES = {} if HAS_Q2_0 else {
    "Q2_0": ("the installed gguf (PyPI's 0.19.0) has no Q2_0 tensor type; the pinned llama.cpp's own gguf-py has it",
             "install that one: pip install --no-deps <llama-cpp-python 0.3.36 sdist>/vendor/llama.cpp/gguf-py "
             "(make install does), or use --quant Q2_K or IQ2_M"),
}

# Tensor types so8t-gguf writes, and an override may name (--output-tensor-type, --tensor-type
# REGEX=TYPE): every storage type of the pinned llama.cpp's quantizer but NVFP4, which
# llama-quantize offers no mix of.
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0, GGMLQuantizationType.IQ4_NL,
    GGMLQuantizationType.MXFP4, GGMLQuantizationType.IQ4_XS, GGMLQuantizationType.Q3_K, GGMLQuantizationType.IQ3_S,
    GGMLQuantizationType.IQ3_XXS, GGMLQuantizationType.Q2_K, GGMLQuantizationType.IQ2_S,
    GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ1_M,
    GGMLQuantizationType.IQ1_S, *((GGMLQuantizationType.Q2_0,) if HAS_Q2_0 else ()), GGMLQuantizationType.TQ2_0,
    GGMLQuantizationType.TQ1_0, GGMLQuantizationType.Q1_0,
)
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


# llama-quantize's own shorthands for three mixes (its QUANT_OPTIONS list them as aliases).
QUANT_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}


def quant_name(name: str) -> str:
    """A quant mix's canonical name: any case, llama-quantize's aliases resolved (q4_k → Q4_K_M)."""
    key = name.strip().upper()
    return QUANT_ALIASES.get(key, key)


def quant_type(name: str) -> QuantType:
    key = quant_name(name)
    if key in QUANT_TYPES:
        return QUANT_TYPES[key]
    if key in NOT_STORAGE_TYPES:
        raise UnsupportedError(f"--quant {name}", NOT_STORAGE_TYPES[key], "use --quant Q8_0")
    if key in UNAVAILABLE_MIXES:
        raise UnsupportedError(f"--quant {name}", *UNAVAILABLE_MIXES[key])
    raise UnsupportedError(f"--quant {name}", "unknown or not yet supported quant type",
                           f"choose from {', '.join(QUANT_TYPES)}")


# A target mix's release label (quantize/target.py: auto_label): AUTO-<bits per weight>. Its file is
# written as llama-quantize's mix named by the recipe (target.base_mix) with the recipe's
# per-tensor overrides, so a label is not always a mix name: release_label and the flow's mix_of say which.
AUTO_PREFIX = "AUTO-"


def is_auto_label(label: str) -> bool:
    return label.strip().upper().startswith(AUTO_PREFIX)


def release_label(name: str) -> str:
    """A release's label as published: a target mix's AUTO-<B> as it is, else the mix's canonical
    name (any case and llama-quantize's aliases resolved; an unknown mix refused)."""
    return name.strip().upper() if is_auto_label(name) else quant_type(name).name


def ggml_type(name: str, where: str) -> GGMLQuantizationType:
    """A GGML tensor type by name, for overrides like --output-tensor-type q8_0."""
    try:
        qtype = GGMLQuantizationType[name.upper()]
    except KeyError:
        qtype = None
    if qtype is None and name.upper() in UNAVAILABLE_MIXES:  # the type of the same name as the mix
        raise UnsupportedError(where, *UNAVAILABLE_MIXES[name.upper()])
    if qtype is None or qtype.name in NOT_STORAGE_TYPES or qtype not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedError(where, f"{name!r} is not a tensor type so8t-gguf writes",
                               f"choose from {', '.join(t.name for t in SUPPORTED_TENSOR_TYPES)}")
    return qtype


# --- Output file names -------------------------------------------------------------------

GGUF_NAME = "{name}-{quant}.gguf"
STATS_NAME = "{name}-{quant}.stats.parquet"
RECIPE_NAME = "{name}-{quant}.tensor-types.txt"  # a target mix's recipe: llama-quantize's --tensor-type-file
SIDECAR_NAME = "{name}.so8t-heads.gguf"
IMATRIX_NAME = "{name}.imatrix.gguf"  # the importance matrix a run computed on calibration text
MODEL_CARD_NAME = "README.md"
MANIFEST_NAME = "manifest.json"
ANALYSIS_NAME = "analysis.json"
VALIDATION_NAME = "{name}-{quant}.validation.json"
EVALUATION_NAME = "{name}-{quant}.evaluation.json"  # llama-perplexity --kl-divergence statistics, gates
ERRORS_PLOT = "{name}-{quant}.errors.png"
BPW_PLOT = "{name}-{quant}.bits-per-weight.png"
SIZE_KLD_PLOT = "{name}.size-vs-kld.png"  # the model folder's: every published quant
