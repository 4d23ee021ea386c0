"""KLD gains per tensor class for target mixes, measured with probes in llama.cpp.

A target mix's damage (:mod:`so8t_core.quantize.target`) is each layer's relative output noise.
How much that noise moves the logits depends on where the layer sits: noise in the embedding or
the output matrix reaches every logit, noise in attn_k is damped by the softmax. One probe per
tensor class measures it: the class at its probe type (≈4.5 bits per weight), every other weight
Q8_0 (near-lossless), mean KLD against the F32 base over a few chunks of the evaluation text; the
gain is that KLD, less the all-Q8_0 file's, per unit of the class's summed damage. With the gains
the summed damage predicts the file's mean KLD (docs/benchmarks.md), and the allocation spends
bits where they lower the KLD most. A probe file is the run's F32 file with its weights quantized
again (:func:`probe_file`), so it holds whatever the run baked or merged into them.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from so8t_core import storage
from so8t_core.gguf_file import TensorInfo, read_gguf, tensor_nbytes, write_gguf
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.quantize.engines import quantize
from so8t_core.quantize.mixes import category
from so8t_core.quantize.staging import expert_importance
from so8t_core.quantize.target import TensorOptions, probe_type
from so8t_core.refs import inputs_key
from so8t_core.validate.perplexity import BaseLogProbs, kl_divergence

GAINS_VERSION = 1  # part of the measured gains' cache key: bump when the probes change
# Chunks of the evaluation text each probe is scored on: one probe per tensor class and one with
# every weight Q8_0, so the gains cost about a dozen short evaluations (2 chunks measured the
# demo's gains well enough to rank its types: docs/benchmarks.md).
PROBE_CHUNKS = 2


def gains_file(work_dir: str, fingerprint: str, imatrix_sha256: str | None, text_sha256: str, n_ctx: int,
               probe_chunks: int = PROBE_CHUNKS) -> str:
    """Where a model's measured gains are kept (JSON): a function of what is released (the source
    and any adapter: ``fingerprint``), the importance matrix, the evaluation text and its chunking,
    the probes' code and llama.cpp. The run writes it; ``convert --dry-run`` reads it."""
    import llama_cpp

    key = inputs_key("class-gains", GAINS_VERSION, llama_cpp.__version__, fingerprint, imatrix_sha256, text_sha256,
                     n_ctx, probe_chunks)
    return os.path.join(work_dir, "gains", f"{key[:32]}.json")


def read_gains(path: str) -> dict[str, float] | None:
    """Gains measured before (:func:`gains_file`), or None."""
    try:
        with open(path, encoding="utf-8") as f:
            return {str(k): float(v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return None


def write_gains(path: str, gains: dict[str, float]) -> None:
    with storage.local_atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(gains, f, indent=1, sort_keys=True)


def probe_file(f32_gguf: str, types: Mapping[str, T], path: str, imatrix=None, engine: str = "ggml",
               n_threads: int | None = None) -> str:
    """``f32_gguf`` (the run's F32 file: baked, any adapter merged) written again at ``path`` with
    the tensors named in ``types`` quantized to them (the others as they are), with the importance
    matrix as the quantize stage gives it: a probe is the model the run's quants are made of."""
    contents = read_gguf(f32_gguf)
    arrays, infos = {}, []
    for t in contents.tensors:
        shape = contents.numpy_shape(t)
        qtype = types.get(t.name, t.tensor_type)
        arrays[t.name] = np.asarray(t.data).reshape(shape)
        infos.append(TensorInfo(t.name, shape, qtype, tensor_nbytes(shape, qtype)))

    def tensor_bytes(info: TensorInfo):
        data = arrays[info.name]
        if info.ggml_type == T.F32:
            return memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B")
        importance = imatrix.for_tensor(info.name, info.shape) if imatrix is not None else None
        if importance is not None and data.ndim == 3:  # one importance row per expert, as staging gives it
            return b"".join(bytes(quantize(data[e], info.ggml_type, engine,
                                           expert_importance(importance, info.shape, e * info.shape[1]), n_threads))
                            for e in range(data.shape[0]))
        return quantize(data, info.ggml_type, engine, importance, n_threads)

    write_gguf(path, contents.value("general.architecture"), contents.kvs(), infos, tensor_bytes)
    return path


def class_gains(f32_gguf: str, tensors: Sequence[TensorOptions], base: BaseLogProbs, work_dir: str, imatrix=None,
                engine: str = "ggml", n_threads: int | None = None) -> dict[str, float]:
    """``{class: KLD per unit of damage}`` for every class of quantized tensors in ``tensors``
    (measured, without gains), from probe files of the F32 GGUF scored against ``base`` (the F32
    file's log-probabilities, :func:`~so8t_core.validate.perplexity.base_log_probs`)."""
    weights = [t for t in tensors if len(t.options) > 1]
    os.makedirs(work_dir, exist_ok=True)

    def probe(cls: str | None) -> tuple[float, float]:
        types = {t.name: probe_type(t) if category(t.name) == cls else T.Q8_0 for t in weights}
        path = probe_file(f32_gguf, types, os.path.join(work_dir, f"probe-{cls or 'Q8_0'}.gguf"), imatrix, engine,
                          n_threads)
        damage = sum(d for t in weights if category(t.name) == cls for q, _, d in t.options if q == types[t.name])
        try:
            with LlamaCppModel(path, n_ctx=base.n_ctx, n_threads=n_threads) as model:
                kld = kl_divergence(model, base).kld_mean
        finally:
            os.remove(path)
        return kld, damage

    floor, _ = probe(None)
    gains = {}
    for cls in sorted({category(t.name) for t in weights}):
        kld, damage = probe(cls)
        gains[cls] = max(kld - floor, 0.0) / damage if damage > 0 else 1.0
    return gains
