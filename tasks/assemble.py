"""Stage 4, assemble: stream staged tensors into the model GGUF; write the heads sidecar."""

from __future__ import annotations

import os

from prefect import task

from so8t_core.analysis import checkpoint_model
from so8t_core.assemble.model import assemble_model, model_metadata
from so8t_core.assemble.sidecar import assemble_heads_sidecar
from so8t_core.constants import GGUF_NAME, SIDECAR_NAME, quant_type
from so8t_core.gguf_file import NO_SPLIT, Split
from so8t_core.quantize.imatrix import imatrix_kvs, load_imatrix_cached
from so8t_core.refs import FileRef, SourceRef, StagedTensor
from tasks.common import STORAGE_RETRIES, open_checkpoint


@task(name="assemble-gguf", task_run_name="assemble-{quant}", **STORAGE_RETRIES)
def assemble_gguf(source: SourceRef, quant: str, name: str, staged: list[StagedTensor], out_dir: str,
                  split: Split = NO_SPLIT, imatrix: tuple[str, str, str] | None = None,
                  allow_tokenizer_mismatch: bool = False, mix: str | None = None) -> list[FileRef]:
    """The model GGUF for one quant: one file, or a split set whose first file is the one to load.
    ``imatrix``: (URI, sha256, the name the user gave) when quantized with an importance matrix;
    ``mix``: the llama-quantize mix the file is written as when the quant is a target mix's label."""
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    extra = imatrix_kvs(load_imatrix_cached(imatrix[0], imatrix[1]), imatrix[2]) if imatrix else []
    arch, kvs = model_metadata(ckpt, quant_type(mix or quant), name, source.fingerprint, staged, extra,
                               allow_tokenizer_mismatch)
    return assemble_model(os.path.join(out_dir, GGUF_NAME.format(name=name, quant=quant)), arch, kvs, staged,
                          split)


@task(name="assemble-heads-sidecar", **STORAGE_RETRIES)
def assemble_sidecar(source: SourceRef, name: str, out_dir: str) -> FileRef | None:
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    _, structure, _ = checkpoint_model(ckpt)
    return assemble_heads_sidecar(os.path.join(out_dir, SIDECAR_NAME.format(name=name)), ckpt, structure, name,
                                  source.fingerprint)
