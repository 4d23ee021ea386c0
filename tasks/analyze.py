"""Stage 2, analyze: structure report and the tensor plan."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from so8t_core.analysis import analyze, checkpoint_model, require_tokenizer_parity
from so8t_core.plan import TensorPlan
from so8t_core.refs import SourceRef
from so8t_core.source.tokenizer import TEXT_FILES, check_chat_template
from tasks.common import STORAGE_RETRIES, open_checkpoint


class AnalysisResult(BaseModel):
    analysis: dict
    plan: list[TensorPlan]


@task(name="analyze-checkpoint", **STORAGE_RETRIES)
def analyze_checkpoint(source: SourceRef, allow_tokenizer_mismatch: bool = False) -> AnalysisResult:
    """The report and the plan; a tokenizer llama.cpp does not reproduce stops the run here
    (before any tensor is quantized) unless ``allow_tokenizer_mismatch``."""
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    require_tokenizer_parity(ckpt, allow_tokenizer_mismatch)
    _, _, plan = checkpoint_model(ckpt)
    # Before any tensor is quantized (the CLI's preflight checked it too; Python callers have none).
    check_chat_template({n: data for n in TEXT_FILES if (data := ckpt.read_file(n)) is not None}, ckpt.uri)
    return AnalysisResult(analysis=analyze(ckpt), plan=plan)
