"""Stage 2, analyze: structure report and the tensor plan."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from so8t_core.analysis import analyze, checkpoint_model, require_tokenizer_parity
from so8t_core.plan import TensorPlan
from so8t_core.refs import SourceRef
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
    return AnalysisResult(analysis=analyze(ckpt), plan=plan)
