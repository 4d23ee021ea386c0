"""Stage 3, quantize: one task per output tensor (bake, permute, quantize, stage the bytes).

The task's cache key names exactly what its output is made of: the source tensors' sha256,
the transform (bake, permutation), the target types, the importance matrix, the staging
location and the format version. A run whose inputs did not change finds every key and
executes no quantize task; a changed shard or override changes only the affected keys.
Results (the small StagedTensor records) persist as JSON beside the staged bytes.
"""

from __future__ import annotations

import hashlib
import json

from gguf import GGMLQuantizationType
from prefect import task

from so8t_core.imatrix import load_imatrix_cached
from so8t_core.plan import TensorPlan
from so8t_core.quantize import FORMAT_VERSION, stage_tensor
from so8t_core.refs import StagedTensor

from .common import STORAGE_RETRIES, open_checkpoint


def quantize_cache_key(context, params) -> str:
    item: TensorPlan = params["item"]
    imatrix = params.get("imatrix")
    what = [FORMAT_VERSION, params["source_sha256"], item.transform_id(), item.gguf_name, list(item.shape),
            [list(t) for t in params["targets"]], imatrix[1] if imatrix else None, params["staging_dir"]]
    return "quantize-" + hashlib.sha256(json.dumps(what).encode()).hexdigest()


@task(name="quantize-tensor", task_run_name="quantize-{item.gguf_name}", cache_key_fn=quantize_cache_key,
      persist_result=True, result_serializer="json", **STORAGE_RETRIES)
def quantize_tensor(source_uri: str, source_fingerprint: str, item: TensorPlan, source_sha256: list[str],
                    targets: list[tuple[str, str]], staging_dir: str, engine: str = "ggml",
                    imatrix: tuple[str, str] | None = None, threads: int | None = None) -> list[StagedTensor]:
    """``targets``: (quant, GGML type name) pairs, one per requested quant, from the mix rules.
    ``imatrix``: (URI, sha256) of an importance matrix; each task reads only its own entry.
    ``threads``: the quantizer's threads, so that tasks in parallel do not oversubscribe the CPUs."""
    typed = [(quant, GGMLQuantizationType[name]) for quant, name in targets]
    weights = None
    if imatrix is not None and len(item.shape) == 2:
        weights = load_imatrix_cached(*imatrix).for_tensor(item.gguf_name, item.shape[-1])
    ckpt = open_checkpoint(source_uri, source_fingerprint)
    return stage_tensor(ckpt, item, typed, staging_dir, source_sha256, engine, weights, threads)
