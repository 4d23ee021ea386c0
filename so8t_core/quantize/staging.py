"""The quantize stage's unit of work: one planned tensor → its quantized bytes, staged.

A staged tensor is content-addressed under the work directory (the source tensors' sha256,
the transform, the type, the importance-matrix entry, the format version), so a re-run finds
what an earlier run already quantized and does nothing for it. Which type each tensor gets is
decided by :mod:`so8t_core.quantize.mixes`; the bytes come from :mod:`so8t_core.quantize.engines`.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Sequence

import numpy as np
from gguf import GGMLQuantizationType

from so8t_core.constants import HAS_Q2_0
from so8t_core.errors import UnsupportedError
from so8t_core.plan import Materializer, TensorPlan
from so8t_core.quantize.engines import dequantize, quantize
from so8t_core.quantize.error_stats import ErrorStats
from so8t_core.quantize.mixes import QUANTIZED_TYPES
from so8t_core.refs import StagedTensor
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.lora import LoraAdapter, MergedReader
from so8t_core.storage import local_atomic_file

# Part of every staging key: bump when the bytes for the same inputs may change. All
# engines write identical bytes, so the engine is not part of the key.
FORMAT_VERSION = "llama.cpp-0.3.36/1"
# Types whose quantizer uses an importance matrix when given one (llama-quantize --imatrix): every
# quantized type but those whose ggml quantizer ignores it (ggml-quants.c: Q8_0, MXFP4, the
# ternary types; Q1_0 and Q2_0 only change how they loop over rows, each row to the reference quantizer).
IMATRIX_TYPES = QUANTIZED_TYPES - {GGMLQuantizationType.Q8_0, GGMLQuantizationType.MXFP4, GGMLQuantizationType.TQ1_0,
                                   GGMLQuantizationType.TQ2_0, GGMLQuantizationType.Q1_0,
                                   *((GGMLQuantizationType.Q2_0,) if HAS_Q2_0 else ())}


# --- one planned tensor → staged bytes ---------------------------------------------------

def staging_key(source_sha256: Sequence[str], item: TensorPlan, qtype: GGMLQuantizationType,
                imatrix_sha256: str | None = None) -> str:
    """Content address of a staged tensor: what went in, what was done, what came out."""
    text = "|".join([*source_sha256, item.transform_id(), item.gguf_name, qtype.name, imatrix_sha256 or "",
                     FORMAT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()


def stage_tensor(ckpt: Checkpoint, item: TensorPlan, targets: Sequence[tuple[str, GGMLQuantizationType]],
                 staging_dir: str, source_sha256: Sequence[str], engine: str = "ggml",
                 imatrix: np.ndarray | None = None, n_threads: int | None = None,
                 adapter: LoraAdapter | None = None) -> list[StagedTensor]:
    """Materialize one planned tensor (bake/permute), quantize it to each (quant, type) target, stage it.

    An item marked with a LoRA pair (``item.lora``) reads its source with the adapter's delta
    merged in, row chunk by row chunk, before the permutation or bake.

    The tensor streams through in row chunks: each chunk is read by byte range, transformed,
    quantized for every target, compared with its dequantization, and appended to the staged
    files, so memory holds a few chunks, never the tensor. Staged files are content-addressed;
    one already staged (same inputs, same code version) is reused, not recomputed.
    """
    imatrix_sha = _imatrix_sha256(imatrix)
    done: dict[int, StagedTensor] = {}
    todo = []
    for i, (quant_name, qtype) in enumerate(targets):
        weights = imatrix if qtype in IMATRIX_TYPES else None
        bin_path = _staged_path(staging_dir, source_sha256, item, qtype, imatrix_sha)
        cached = _staged(bin_path)
        if cached is not None:
            done[i] = cached.model_copy(update={"quant": quant_name})
        else:
            todo.append((i, quant_name, qtype, weights, bin_path))
    if todo:
        t0 = time.perf_counter()
        outputs = {i: _StagedWriter(path) for i, _, _, _, path in todo}
        try:
            reader = ckpt
            if item.lora is not None:
                if adapter is None or adapter.pairs.get(item.source) is None \
                        or adapter.pairs[item.source].sha256 != item.lora:
                    raise UnsupportedError(item.gguf_name, "planned with a LoRA pair the given adapter does not have",
                                           "pass the adapter the plan was made with")
                reader = MergedReader(ckpt, adapter)
            materializer = Materializer(item, reader, ckpt.uri)
            for start, chunk in materializer.chunks():
                for i, _, qtype, weights, _ in todo:
                    raw = quantize(chunk, qtype, engine, expert_importance(weights, item.shape, start), n_threads)
                    outputs[i].add(raw, chunk, dequantize(raw, qtype, chunk.shape, n_threads))
            seconds = time.perf_counter() - t0
            for i, quant_name, qtype, _, bin_path in todo:
                sha, nbytes, stats = outputs[i].finish()
                staged = StagedTensor(
                    gguf_name=item.gguf_name, source=item.source, layer=item.layer, tensor_class=item.tensor_class,
                    quant=quant_name, ggml_type=qtype.name, shape=item.shape, uri=bin_path, sha256=sha,
                    nbytes=nbytes, seconds=seconds, bake_error=materializer.bake_error, **stats)
                with local_atomic_file(bin_path[:-4] + ".json") as tmp:
                    with open(tmp, "w") as f:
                        f.write(staged.model_dump_json())
                done[i] = staged
        finally:
            for w in outputs.values():
                w.close()
    return [done[i] for i in range(len(targets))]


def expert_importance(weights: np.ndarray | None, shape: Sequence[int], first_row: int) -> np.ndarray | None:
    """The importance row for the chunk starting at ``first_row``: a 3-D expert tensor's entry holds one row
    per expert (chunks never span two experts), as llama-quantize indexes it."""
    if weights is None or len(shape) < 3:
        return weights
    columns = shape[-1]
    expert = first_row // shape[1]
    return weights[expert * columns:(expert + 1) * columns]


def _imatrix_sha256(imatrix: np.ndarray | None) -> str | None:
    return None if imatrix is None else hashlib.sha256(np.ascontiguousarray(imatrix).tobytes()).hexdigest()


def _staged_path(staging_dir: str, source_sha256: Sequence[str], item: TensorPlan, qtype: GGMLQuantizationType,
                 imatrix_sha: str | None) -> str:
    key = staging_key(source_sha256, item, qtype, imatrix_sha if qtype in IMATRIX_TYPES else None)
    return os.path.join(staging_dir, key[:2], key + ".bin")


def find_staged(item: TensorPlan, targets: Sequence[tuple[str, GGMLQuantizationType]], staging_dir: str,
                source_sha256: Sequence[str], imatrix: np.ndarray | None = None) -> list[StagedTensor] | None:
    """The staged records of ``item`` for every target, or None when any is missing: a file
    lookup, so a re-run schedules no task for what an earlier run (even a killed one) staged."""
    found = []
    imatrix_sha = _imatrix_sha256(imatrix)
    for quant_name, qtype in targets:
        staged = _staged(_staged_path(staging_dir, source_sha256, item, qtype, imatrix_sha))
        if staged is None:
            return None
        found.append(staged.model_copy(update={"quant": quant_name}))
    return found


def _staged(bin_path: str) -> StagedTensor | None:
    meta_path = bin_path[:-4] + ".json"
    if not (os.path.exists(meta_path) and os.path.exists(bin_path)):
        return None
    staged = StagedTensor.model_validate_json(open(meta_path, "rb").read())
    return staged if os.path.getsize(bin_path) == staged.nbytes else None


class _StagedWriter:
    """Appends chunks of one staged tensor to a temporary file; renamed into place on finish."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}-{id(self)}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.stats = ErrorStats()

    def add(self, raw, reference: np.ndarray, approx: np.ndarray) -> None:
        self.file.write(raw)
        self.sha.update(raw)
        self.nbytes += len(raw)
        self.stats.add(reference, approx)

    def finish(self) -> tuple[str, int, dict]:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.sha.hexdigest(), self.nbytes, self.stats.result()

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
