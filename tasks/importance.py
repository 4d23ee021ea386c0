"""Stage 3, importance: the importance matrix every mix of a run is quantized with, computed on
the user's calibration text in llama.cpp as llama-imatrix computes it.

The text is read, rendered and tokenized first (a malformed or too short text fails here,
before the model runs); the baked model's F32 GGUF, staged and assembled like any quant, is run
over the tokens (``so8t_core.quantize.calibration``); the sums are written in llama.cpp's GGUF
imatrix format under ``<work>/imatrix/``, keyed by the F32 file's sha256, the tokens' sha256,
the context, the chunks and the code's version, so a re-run with the same inputs computes
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os

from prefect import task
from pydantic import BaseModel

from so8t_core.quantize.calibration import (
    CALIBRATION_VERSION,
    calibration_tokens,
    check_enough_tokens,
    collect_activations,
    coverage,
    read_tokens,
    write_tokens,
)
from so8t_core.quantize.imatrix import write_imatrix
from so8t_core.refs import FileRef, SourceRef, file_ref
from so8t_core.storage import local_atomic_file
from tasks.common import STORAGE_RETRIES, open_checkpoint


class CalibrationTokens(BaseModel):
    """The tokenized calibration text of a run, saved under the work folder."""

    path: str
    sha256: str
    tokens: int
    documents: int
    datasets: list[str]


class ComputedImatrix(BaseModel):
    """An importance matrix computed on calibration text, and what it was computed on."""

    file: FileRef
    datasets: list[str]
    calibration_sha256: str = ""  # of the calibration tokens (CalibrationTokens.sha256): part of the key
    tokens: int  # evaluated: chunks × context
    chunks: int
    ctx: int
    seconds: float
    tokens_per_second: float
    coverage: dict[str, dict]  # weight → tokens seen (and matrices that saw none)


@task(name="tokenize-calibration", **STORAGE_RETRIES)
def tokenize_calibration(source: SourceRef, uris: list[str], n_ctx: int, work_dir: str,
                         allow_tokenizer_mismatch: bool = False) -> CalibrationTokens:
    """Read, render and tokenize the calibration text with the checkpoint's tokenizer; refuse it
    when it is shorter than llama-imatrix's two chunks."""
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    calibration, tokens = calibration_tokens(ckpt, uris, allow_tokenizer_mismatch)
    check_enough_tokens(len(tokens), n_ctx, "--calibration " + " ".join(uris))
    path, sha = write_tokens(tokens, os.path.join(work_dir, "imatrix"))
    return CalibrationTokens(path=path, sha256=sha, tokens=len(tokens), documents=calibration.documents,
                             datasets=calibration.datasets)


@task(name="compute-imatrix")
def compute_imatrix(f32: FileRef, tokens: CalibrationTokens, n_ctx: int, n_chunks: int | None, work_dir: str,
                    threads: int | None = None) -> ComputedImatrix:
    """The importance matrix of the F32 model ``f32`` on ``tokens``: found under the work folder,
    or computed in llama.cpp and written there."""
    import llama_cpp

    key = hashlib.sha256(json.dumps([f32.sha256, tokens.sha256, n_ctx, n_chunks, CALIBRATION_VERSION,
                                     llama_cpp.__version__]).encode()).hexdigest()
    folder = os.path.join(work_dir, "imatrix")
    path, record = os.path.join(folder, f"{key}.imatrix.gguf"), os.path.join(folder, f"{key}.json")
    if os.path.exists(record) and os.path.exists(path):
        found = ComputedImatrix.model_validate_json(open(record, "rb").read())
        if file_ref(path) == found.file:
            return found.model_copy(update={"calibration_sha256": tokens.sha256})  # the key holds it
    sums = collect_activations(f32.uri, read_tokens(tokens.path), n_ctx, n_chunks, threads)
    write_imatrix(path, sums.sums, sums.counts, tokens.datasets, sums.chunk_count, sums.chunk_size)  # atomic
    result = ComputedImatrix(file=file_ref(path), datasets=tokens.datasets, calibration_sha256=tokens.sha256,
                             tokens=sums.tokens, chunks=sums.chunk_count, ctx=n_ctx, seconds=sums.seconds,
                             tokens_per_second=sums.tokens_per_second, coverage=coverage(sums))
    with local_atomic_file(record) as tmp:
        with open(tmp, "w") as f:
            f.write(result.model_dump_json())
    return result
