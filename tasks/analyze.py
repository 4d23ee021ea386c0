"""Stage 2, analyze: structure report and the tensor plan."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from so8t_core.analysis import analyze, checkpoint_model
from so8t_core.plan import TensorPlan
from so8t_core.refs import SourceRef
from so8t_core.source.tokenizer import TEXT_FILES, check_chat_template
from tasks.common import STORAGE_RETRIES, open_checkpoint


class AnalysisResult(BaseModel):
    analysis: dict
    plan: list[TensorPlan]


@task(name="analyze-checkpoint", **STORAGE_RETRIES)
def analyze_checkpoint(source: SourceRef) -> AnalysisResult:
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    _, _, plan = checkpoint_model(ckpt)
    # Before any tensor is quantized (the CLI's preflight checked it too; Python callers have none).
    check_chat_template({n: data for n in TEXT_FILES if (data := ckpt.read_file(n)) is not None}, ckpt.uri)
    return AnalysisResult(analysis=analyze(ckpt), plan=plan)
