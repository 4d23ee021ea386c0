"""Stage 6, publish: stats, model card, then files and manifest to the output URI."""

from __future__ import annotations

from prefect import task

from so8t_core.assemble import file_ref
from so8t_core.model_card import render_model_card
from so8t_core.publish import publish_release, update_latest
from so8t_core.refs import FileRef, StagedTensor
from so8t_core.stats import write_stats

from .common import STORAGE_RETRIES


@task(name="write-stats", task_run_name="write-stats-{quant}")
def write_stats_parquet(quant: str, staged: list[StagedTensor], path: str) -> FileRef:
    write_stats(path, staged)
    return file_ref(path)


@task(name="write-model-card")
def write_model_card(path: str, name: str, analysis: dict, files: dict[str, FileRef], n_params: dict[str, int],
                     validations: dict[str, dict], max_bake_error: float, fingerprint: str, converter: str) -> FileRef:
    rows = [{"name": n, "size": f.size, "sha256": f.sha256,
             "bits_per_weight": 8.0 * f.size / n_params[n] if n in n_params else None}
            for n, f in sorted(files.items())]
    text = render_model_card(name, analysis, rows, validations, max_bake_error, fingerprint, converter)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return file_ref(path)


@task(name="publish-release", task_run_name="publish-{release}", **STORAGE_RETRIES)
def publish(files: dict[str, FileRef], release: str, manifest: dict) -> tuple[FileRef, int]:
    """Upload, verify, then commit the release with its manifest; returns (manifest, files uploaded)."""
    return publish_release(files, release, manifest)


@task(name="publish-latest", **STORAGE_RETRIES)
def publish_latest(dest: str, model: str, entries: dict[str, dict]) -> FileRef:
    return update_latest(dest, model, entries)
