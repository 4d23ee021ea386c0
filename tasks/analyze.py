"""Stage 2, analyze: structure report and the tensor plan."""

from __future__ import annotations

from prefect import task
from pydantic import BaseModel

from so8t_core.analysis import analyze, checkpoint_model
from so8t_core.plan import TensorPlan
from so8t_core.refs import SourceRef
from tasks.common import STORAGE_RETRIES, open_checkpoint


class AnalysisResult(BaseModel):
    analysis: dict
    plan: list[TensorPlan]


@task(name="analyze-checkpoint", **STORAGE_RETRIES)
def analyze_checkpoint(source: SourceRef) -> AnalysisResult:
    ckpt = open_checkpoint(source.uri, source.fingerprint)
    _, _, plan = checkpoint_model(ckpt)
    return AnalysisResult(analysis=analyze(ckpt), plan=plan)
