"""KLD gains per tensor class for target mixes, measured with probes in llama.cpp.

A target mix's damage (:mod:`so8t_core.quantize.target`) is each layer's relative output noise.
How much that noise moves the logits depends on where the layer sits: noise in the embedding or
the output matrix reaches every logit, noise in attn_k is damped by the softmax. One probe per
tensor class measures it: the class at its probe type (≈4.5 bits per weight), every other weight
Q8_0 (near-lossless), mean KLD against the F32 base over a few chunks of the evaluation text; the
gain is that KLD, less the all-Q8_0 file's, per unit of the class's summed damage. With the gains
the summed damage predicts the file's mean KLD (docs/benchmarks.md), and the allocation spends
bits where they lower the KLD most. A probe file is assembled like any mix (its tensors staged,
content-addressed, so later runs and targets reuse them).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from gguf import GGMLQuantizationType as T

from so8t_core.assemble.sequential import convert_sequential
from so8t_core.llama_runtime import LlamaCppModel
from so8t_core.quantize.mixes import MixOptions, category
from so8t_core.quantize.target import TensorOptions, probe_type
from so8t_core.source.fingerprint import fingerprint
from so8t_core.validate.perplexity import BaseLogProbs, kl_divergence


def class_gains(ckpt, tensors: Sequence[TensorOptions], base: BaseLogProbs, work_dir: str, imatrix=None,
                n_threads: int | None = None) -> dict[str, float]:
    """``{class: KLD per unit of damage}`` for every class of quantized tensors in ``tensors``
    (measured, without gains), from probe files of ``ckpt`` scored against ``base`` (the F32
    file's log-probabilities, :func:`~so8t_core.validate.perplexity.base_log_probs`)."""
    weights = [t for t in tensors if len(t.options) > 1]
    source = fingerprint(ckpt)  # once, not per probe
    staging = os.path.join(work_dir, "staging")

    def probe(cls: str | None) -> tuple[float, float]:
        types = {t.name: probe_type(t) if category(t.name) == cls else T.Q8_0 for t in weights}
        recipe = tuple((f"^{re.escape(n)}$", q) for n, q in types.items())
        path = os.path.join(work_dir, f"probe-{cls or 'Q8_0'}.gguf")
        convert_sequential(ckpt, "Q8_0", path, staging, imatrix=imatrix, source=source,
                           options=MixOptions(tensor_types=recipe, has_imatrix=imatrix is not None))
        damage = sum(d for t in weights if category(t.name) == cls for q, _, d in t.options if q == types[t.name])
        with LlamaCppModel(path, n_ctx=base.n_ctx, n_threads=n_threads) as model:
            kld = kl_divergence(model, base).kld_mean
        os.remove(path)
        return kld, damage

    floor, _ = probe(None)
    gains = {}
    for cls in sorted({category(t.name) for t in weights}):
        kld, damage = probe(cls)
        gains[cls] = max(kld - floor, 0.0) / damage if damage > 0 else 1.0
    return gains
