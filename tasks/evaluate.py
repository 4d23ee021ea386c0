"""Stage 6, evaluate: each quant's logits in llama.cpp against the F32 model's over the evaluation
text, with llama-perplexity's --kl-divergence statistics (so8t_core/validate/perplexity.py)."""

from __future__ import annotations

import os

import llama_cpp
from prefect import task

from so8t_core import storage
from so8t_core.errors import InputChangedError
from so8t_core.refs import FileRef, inputs_key, made_files
from so8t_core.validate.perplexity import EVALUATION_VERSION, evaluate_file, read_eval_text, write_evaluation_base
from tasks.common import STORAGE_RETRIES


def _base_key(f32: FileRef, text_sha256: str, n_ctx: int, n_chunks: int) -> str:
    return inputs_key("evaluation-base", EVALUATION_VERSION, llama_cpp.__version__, f32.sha256, text_sha256, n_ctx,
                      n_chunks)


@task(name="evaluation-base", **STORAGE_RETRIES)
def evaluation_base(f32: FileRef, eval_text: str, text_sha256: str, n_ctx: int, n_chunks: int,
                    work_dir: str) -> FileRef:
    """The F32 model's log-probabilities over the evaluation text, as llama-perplexity's
    ``--kl-divergence-base`` file; made once per F32 file and settings (a re-run reuses it)."""
    key = _base_key(f32, text_sha256, n_ctx, n_chunks)
    path = os.path.join(work_dir, "evaluation", f"{key[:32]}.kld")

    def make() -> list[str]:
        text = read_eval_text(eval_text)
        if storage.sha256_bytes(text.encode("utf-8")) != text_sha256:
            raise InputChangedError(storage.redact_uri(eval_text), "the evaluation text changed during the run",
                                    "run again")
        with storage.local_atomic_file(path) as tmp:
            write_evaluation_base(f32.uri, text, n_ctx, n_chunks, tmp)
        return [path]

    return made_files(path + ".json", key, make)[0]


def evaluation_cache_key(context, params) -> str:
    """An evaluation is a function of the file, the base file (the F32 model, the text and the
    settings), the statistics' code and llama.cpp."""
    return "evaluate-" + inputs_key(EVALUATION_VERSION, llama_cpp.__version__, params["gguf"].sha256,
                                    params["base"].sha256, params["settings"])


@task(name="evaluate-gguf", task_run_name="evaluate-{quant}", cache_key_fn=evaluation_cache_key,
      persist_result=True, result_serializer="json")
def evaluate_gguf(quant: str, gguf: FileRef, base: FileRef, settings: dict) -> dict:
    """One quant's statistics against the base file (``settings``: what the record says it was
    evaluated on). Any GGUF of the model can be evaluated so, whichever mix made it."""
    return {"settings": settings, "statistics": evaluate_file(gguf.uri, base.uri).as_record()}
