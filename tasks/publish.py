"""Stage 6, publish: stats, model card, then files and manifest to the output URI."""

from __future__ import annotations

from prefect import task

from so8t_core.constants import BPW_PLOT, ERRORS_PLOT
from so8t_core.gguf_file import read_gguf
from so8t_core.publish import release
from so8t_core.publish.model_card import gguf_card_facts, render_model_card
from so8t_core.publish.plots import plot_bits_per_weight, plot_tensor_errors
from so8t_core.publish.stats import write_stats
from so8t_core.refs import FileRef, StagedTensor, file_ref
from so8t_core.storage import redact_uri
from tasks.common import STORAGE_RETRIES


@task(name="write-stats", task_run_name="write-stats-{quant}")
def write_stats_parquet(quant: str, staged: list[StagedTensor], path: str) -> FileRef:
    write_stats(path, staged)
    return file_ref(path)


@task(name="write-plots", task_run_name="write-plots-{quant}")
def write_plots(name: str, quant: str, staged: list[StagedTensor], folder: str) -> dict[str, FileRef]:
    """The release's PNG plots (file name → ref): error per tensor, bits per weight by class."""
    errors = ERRORS_PLOT.format(name=name, quant=quant)
    bpw = BPW_PLOT.format(name=name, quant=quant)
    plot_tensor_errors(staged, f"{name} {quant}: quantization error per tensor", f"{folder}/{errors}")
    plot_bits_per_weight(staged, f"{name} {quant}: bits per weight by tensor class", f"{folder}/{bpw}")
    return {errors: file_ref(f"{folder}/{errors}"), bpw: file_ref(f"{folder}/{bpw}")}


@task(name="write-model-card")
def write_model_card(path: str, name: str, analysis: dict, files: dict[str, FileRef], n_params: dict[str, int],
                     validations: dict[str, dict], max_bake_error: float, fingerprint: str, converter: str,
                     model_gguf: FileRef | None = None, plots: list[tuple[str, str]] | None = None) -> FileRef:
    """``model_gguf``: the written model file (its first, for a split set), whose metadata gives
    the card's license, base model, chat template and stop tokens."""
    rows = [{"name": n, "size": f.size, "sha256": f.sha256,
             "bits_per_weight": 8.0 * f.size / n_params[n] if n in n_params else None}
            for n, f in sorted(files.items())]
    facts = gguf_card_facts(read_gguf(model_gguf.uri).metadata) if model_gguf else {}
    text = render_model_card(name, analysis, rows, validations, max_bake_error, fingerprint, converter, facts,
                             plots or [])
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return file_ref(path)


def _publish_run_name() -> str:
    """``publish-<release>``, without credentials: task run names are stored and shown everywhere."""
    from prefect.runtime import task_run

    return f"publish-{redact_uri(task_run.parameters['uri'])}"


@task(name="publish-release", task_run_name=_publish_run_name, **STORAGE_RETRIES)
def publish_release(files: dict[str, FileRef], uri: str, manifest: dict) -> tuple[FileRef, int]:
    """Upload, verify, then commit the release at ``uri`` with its manifest; returns (manifest, files uploaded)."""
    return release.publish_release(files, uri, manifest)


@task(name="publish-latest", **STORAGE_RETRIES)
def publish_latest(dest: str, model: str, entries: dict[str, dict]) -> FileRef:
    return release.update_latest(dest, model, entries)
