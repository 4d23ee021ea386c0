"""so8t-gguf's library: SO8T checkpoints in, real llama.cpp GGUF files out.

Plain functions and small classes with no orchestration import; the Prefect tasks in
``tasks/`` wrap these, and ``flows/`` composes the tasks into the pipeline. The subpackages
are the pipeline's stages, each importing only from its own layer or below:

    foundation   errors, refs, storage, constants, metrics, gguf_file, llama_runtime
    source/      fetch: checkpoints, fingerprints, architectures, SO8T gates and heads, LoRA, tokenizer
    analysis, plan   what a checkpoint is, and the tensor plan every later stage reads
    quantize/    mixes, imatrix, staging, error_stats; engines/ (ggml, simd, torch)
    assemble/    the model GGUF, the heads sidecar, LoRA adapter GGUFs, the sequential pipeline
    validate/    checks in llama.cpp against the PyTorch reference, heads, inspection
    publish/     atomic releases, model card, stats, plots, the run report
    export/      ONNX
    testing/     the demo checkpoint and test fixtures (not part of the pipeline)

This module is the front door: the names below are the public API, imported on first use
(``import so8t_core`` stays instant; torch and transformers load only when needed).
"""

from __future__ import annotations

import importlib
from typing import Any

from so8t_core.constants import CONVERTER, __version__

_PUBLIC = {
    # foundation
    "So8tError": "errors", "CheckpointError": "errors", "StorageError": "errors", "UnsupportedError": "errors",
    "ValidationError": "errors",
    "FileRef": "refs", "SourceRef": "refs", "StagedTensor": "refs", "file_ref": "refs",
    "QUANT_TYPES": "constants", "quant_type": "constants",
    "read_gguf": "gguf_file", "write_gguf": "gguf_file",
    # fetch
    "Checkpoint": "source.checkpoint", "fingerprint": "source.fingerprint", "load_adapter": "source.lora",
    # analyze
    "analyze": "analysis", "preflight": "analysis", "checkpoint_model": "analysis", "TensorPlan": "plan",
    # quantize
    "MixOptions": "quantize.mixes", "ModelShape": "quantize.mixes", "assign_types": "quantize.mixes",
    "load_imatrix": "quantize.imatrix",
    "stage_tensor": "quantize.staging",
    # assemble
    "assemble_model": "assemble.model", "model_metadata": "assemble.model", "write_lora_gguf": "assemble.lora_gguf",
    "convert_sequential": "assemble.sequential",
    # validate
    "validate_file": "validate.checks", "LlamaCppModel": "llama_runtime", "run_heads": "validate.heads",
    "inspect_gguf": "validate.inspection",
    # publish, export
    "publish_release": "publish.release", "model_gguf": "publish.retrieve", "export_onnx": "export.onnx",
    # try it
    "build_demo_checkpoint": "testing.demo", "FixtureSpec": "testing.fixtures", "build_fixture": "testing.fixtures",
}

__all__ = ["CONVERTER", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'so8t_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"so8t_core.{module}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
