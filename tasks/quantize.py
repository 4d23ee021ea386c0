"""Stage 3, quantize: one task per output tensor (bake, permute, quantize, stage the bytes).

The staging area is the cache: every staged tensor is stored under a key naming exactly what
it is made of (``so8t_core.quantize.staging_key``: the source tensors' sha256, the transform
(bake, permutation), the target type, the importance matrix and the format version), written
atomically. The flow looks a tensor up there before scheduling its task, so a run whose
inputs did not change executes no quantize task, a changed shard or override re-quantizes
only the affected tensors, and a killed run resumes from the tensors it finished. Tasks
return the small StagedTensor records, never arrays.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType
from prefect import task

from so8t_core.imatrix import load_imatrix_cached
from so8t_core.plan import TensorPlan
from so8t_core.quantize import stage_tensor
from so8t_core.refs import StagedTensor

from .common import STORAGE_RETRIES, open_adapter, open_checkpoint


@task(name="quantize-tensor", task_run_name="quantize-{item.gguf_name}", **STORAGE_RETRIES)
def quantize_tensor(source_uri: str, source_fingerprint: str, item: TensorPlan, source_sha256: list[str],
                    targets: list[tuple[str, str]], staging_dir: str, engine: str = "ggml",
                    imatrix: tuple[str, str] | None = None, threads: int | None = None,
                    lora: tuple[str, str] | None = None) -> list[StagedTensor]:
    """``targets``: (quant, GGML type name) pairs, one per requested quant, from the mix rules.
    ``imatrix``: (URI, sha256) of an importance matrix; each task reads only its own entry.
    ``threads``: the quantizer's threads, so that tasks in parallel do not oversubscribe the CPUs.
    ``lora``: (URI, sha256) of a LoRA adapter, for items the plan marked with one of its pairs."""
    typed = [(quant, GGMLQuantizationType[name]) for quant, name in targets]
    weights = None
    if imatrix is not None and len(item.shape) == 2:
        weights = load_imatrix_cached(*imatrix).for_tensor(item.gguf_name, item.shape[-1])
    ckpt = open_checkpoint(source_uri, source_fingerprint)
    adapter = open_adapter(*lora) if lora is not None and item.lora is not None else None
    return stage_tensor(ckpt, item, typed, staging_dir, source_sha256, engine, weights, threads, adapter)
