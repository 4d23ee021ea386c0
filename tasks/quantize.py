"""Stage 3, quantize: one task per output tensor, or per group of small ones (bake, permute,
quantize, stage the bytes).

The staging area is the cache: every staged tensor is stored under a key naming exactly what
it is made of (``so8t_core.quantize.staging.staging_key``: the source tensors' sha256, the transform
(bake, permutation), the target type, the importance matrix and the format version), written
atomically. The flow looks a tensor up there before scheduling its task, so a run whose
inputs did not change executes no quantize task, a changed shard or override re-quantizes
only the affected tensors, and a killed run resumes from the tensors it finished. Tasks
return the small StagedTensor records, never arrays.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType
from prefect import task

from so8t_core.plan import TensorPlan
from so8t_core.quantize.imatrix import load_imatrix_cached
from so8t_core.quantize.staging import stage_tensor
from so8t_core.refs import StagedTensor
from tasks.common import STORAGE_RETRIES, open_adapter, open_checkpoint


def _run_name() -> str:
    from prefect.runtime import task_run

    items = task_run.parameters["items"]
    return f"quantize-{items[0].gguf_name}" + (f"+{len(items) - 1}" if len(items) > 1 else "")


@task(name="quantize-tensors", task_run_name=_run_name, **STORAGE_RETRIES)
def quantize_tensors(source_uri: str, source_fingerprint: str, items: list[TensorPlan],
                     source_sha256: list[list[str]], targets: list[list[tuple[str, str]]], staging_dir: str,
                     engine: str = "ggml", imatrix: tuple[str, str] | None = None, threads: int | None = None,
                     lora: tuple[str, str] | None = None) -> list[list[StagedTensor]]:
    """Quantize ``items`` one after the other; per item, its source tensors' sha256 and its
    ``targets``: (quant, GGML type name) pairs, one per requested quant, from the mix rules.
    ``imatrix``: (URI, sha256) of an importance matrix; each task reads only its own entries.
    ``threads``: the quantizer's threads, so that tasks in parallel do not oversubscribe the CPUs.
    ``lora``: (URI, sha256) of a LoRA adapter, for items the plan marked with one of its pairs.
    Returns, per item, its StagedTensor per target."""
    ckpt = open_checkpoint(source_uri, source_fingerprint)
    im = load_imatrix_cached(*imatrix) if imatrix is not None else None
    staged = []
    for item, shas, item_targets in zip(items, source_sha256, targets, strict=True):
        typed = [(quant, GGMLQuantizationType[name]) for quant, name in item_targets]
        weights = im.for_tensor(item.gguf_name, item.shape[-1]) if im is not None and len(item.shape) == 2 else None
        adapter = open_adapter(*lora) if lora is not None and item.lora is not None else None
        staged.append(stage_tensor(ckpt, item, typed, staging_dir, shas, engine, weights, threads, adapter))
    return staged
