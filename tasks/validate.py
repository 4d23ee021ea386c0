"""Stage 5, validate: read-back, per-tensor error, logits in llama.cpp vs the PyTorch reference, tokenizer parity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
from prefect import task

from so8t_core.assemble.model import model_metadata
from so8t_core.constants import quant_type
from so8t_core.quantize.imatrix import imatrix_kvs, load_imatrix_cached
from so8t_core.quantize.staging import FORMAT_VERSION
from so8t_core.refs import FileRef, SourceRef, StagedTensor, file_ref
from so8t_core.source.lora import load_adapter_cached
from so8t_core.storage import local_atomic_file
from so8t_core.validate.checks import (
    GATES,
    VALIDATION_VERSION,
    check_functional,
    check_readback,
    check_tensor_errors,
    check_tokenizer_parity,
    summarize,
    validation_token_ids,
)
from so8t_core.validate.reference import So8tReference
from tasks.common import STORAGE_RETRIES, open_checkpoint


@task(name="reference-logits", **STORAGE_RETRIES)
def reference_logits(source: SourceRef, work_dir: str, lora: tuple[str, str] | None = None) -> FileRef:
    """Logits of the PyTorch SO8T reference (gates live) on the validation text; cached by fingerprint
    (and the LoRA adapter's sha256: with ``lora``, the reference has the adapter merged)."""
    stem = source.fingerprint + (f"-lora-{lora[1][:32]}" if lora else "")
    path = os.path.join(work_dir, "reference", f"{stem}.npz")
    if not os.path.exists(path):
        ckpt = open_checkpoint(source.uri, source.fingerprint)
        ids = validation_token_ids(ckpt)
        logits = So8tReference(ckpt, adapter=load_adapter_cached(*lora) if lora else None).logits(ids)
        with local_atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, token_ids=np.asarray(ids, dtype=np.int64), logits=logits)
    return file_ref(path)


def validation_cache_key(context, params) -> str:
    """A validation's result is a function of the file, the reference, the checkpoint (its
    tokenizer), the gate and the validator: a re-run with all of them unchanged reuses it."""
    import llama_cpp

    reference, imatrix = params["reference"], params.get("imatrix")
    what = [VALIDATION_VERSION, FORMAT_VERSION, llama_cpp.__version__, params["source"].fingerprint,
            params["quant"], params["name"], params["gguf"].sha256, [s.sha256 for s in params["staged"]],
            reference.sha256 if reference else None, imatrix[1] if imatrix else None,
            dataclasses.asdict(GATES[params.get("mix") or params["quant"]]),
            params.get("allow_tokenizer_mismatch", False)]
    return "validate-" + hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()


@task(name="validate-gguf", task_run_name="validate-{quant}", cache_key_fn=validation_cache_key,
      persist_result=True, result_serializer="json")
def validate_gguf(source: SourceRef, quant: str, name: str, gguf: FileRef, staged: list[StagedTensor],
                  reference: FileRef | None, imatrix: tuple[str, str, str] | None = None,
                  allow_tokenizer_mismatch: bool = False, mix: str | None = None) -> dict:
    """``allow_tokenizer_mismatch``: the tokenizer check still runs and is reported, but does
    not fail the validation (the user chose to publish a tokenizer llama.cpp does not reproduce).
    ``mix``: the llama-quantize mix the file is written as when the quant is a target mix's label
    (AUTO-<B>); its gate is that mix's."""
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    extra = imatrix_kvs(load_imatrix_cached(imatrix[0], imatrix[1]), imatrix[2]) if imatrix else []
    arch, kvs = model_metadata(ckpt, quant_type(mix or quant), name, source.fingerprint, staged, extra,
                               allow_tokenizer_mismatch)
    gate = GATES[mix or quant]
    functional = None
    if reference is not None:
        ref = np.load(reference.uri)
        functional = check_functional(gguf.uri, ref["logits"], ref["token_ids"].tolist(), gate)
    errors = {s.gguf_name: s.relative_rmse for s in staged}
    tokenizer = check_tokenizer_parity(gguf.uri, ckpt)
    return summarize(quant, check_readback(gguf.uri, arch, kvs, staged), check_tensor_errors(errors, gate), functional,
                     tokenizer, tokenizer_may_differ=allow_tokenizer_mismatch)
