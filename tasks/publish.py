"""Stage 6, publish: stats, plots, model card, then files and manifest to the output URI.

Stats, plots and card are made again only when what they are made of changed (``refs.made_files``):
a re-run with nothing changed reads and writes none of them (the card would read the whole GGUF).
"""

from __future__ import annotations

import os
import tempfile

from prefect import task

from so8t_core.assemble.metadata import general_kvs
from so8t_core.assemble.model import model_card_files
from so8t_core.chat_template import ChatTemplateError, render_chat
from so8t_core.constants import BPW_PLOT, CONVERTER, ERRORS_PLOT, MODEL_CARD_NAME, SIZE_KLD_PLOT, bits_per_weight
from so8t_core.gguf_file import read_gguf
from so8t_core.publish import release
from so8t_core.publish.model_card import (
    gguf_card_facts,
    overview_rows,
    render_model_card,
    render_model_overview,
    source_card_text,
)
from so8t_core.publish.plots import plot_bits_per_weight, plot_size_vs_kld, plot_tensor_errors
from so8t_core.publish.stats import write_stats
from so8t_core.refs import FileRef, SourceRef, StagedTensor, inputs_key, made_files
from so8t_core.storage import redact_uri
from tasks.common import STORAGE_RETRIES, open_checkpoint


@task(name="write-stats", task_run_name="write-stats-{quant}")
def write_stats_parquet(quant: str, staged: list[StagedTensor], path: str) -> FileRef:
    def write() -> list[str]:
        write_stats(path, staged)
        return [path]

    (ref,) = made_files(path + ".inputs.json", inputs_key(CONVERTER, quant, staged), write)
    return ref


@task(name="write-plots", task_run_name="write-plots-{quant}")
def write_plots(name: str, quant: str, staged: list[StagedTensor], folder: str) -> dict[str, FileRef]:
    """The release's PNG plots (file name → ref): error per tensor, bits per weight by class."""
    errors = ERRORS_PLOT.format(name=name, quant=quant)
    bpw = BPW_PLOT.format(name=name, quant=quant)

    def write() -> list[str]:
        plot_tensor_errors(staged, f"{name} {quant}: quantization error per tensor", f"{folder}/{errors}")
        plot_bits_per_weight(staged, f"{name} {quant}: bits per weight by tensor class", f"{folder}/{bpw}")
        return [f"{folder}/{errors}", f"{folder}/{bpw}"]

    refs = made_files(f"{folder}/{errors}.inputs.json", inputs_key(CONVERTER, name, quant, staged), write)
    return {errors: refs[0], bpw: refs[1]}


@task(name="write-model-card")
def write_model_card(path: str, name: str, analysis: dict, files: dict[str, FileRef], model_files: list[str],
                     validations: dict[str, dict], max_bake_error: float, fingerprint: str, converter: str,
                     model_gguf: FileRef | None = None, plots: list[tuple[str, str]] | None = None,
                     extras: dict | None = None, source: SourceRef | None = None) -> FileRef:
    """``model_files``: the names of the model GGUF(s) among ``files``, whose bits per weight the
    card shows; ``model_gguf``: the written model file (its first, for a split set), whose
    metadata gives the card's license, base model, chat template and stop tokens (the template is
    rendered for the card's prompt format); ``extras``: render_model_card's; ``source``: the
    checkpoint, whose own README.md the card carries over."""
    def bpw(uri: str) -> float:
        tensors = read_gguf(uri).tensors
        return bits_per_weight(sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors))

    def write() -> list[str]:
        rows = [{"name": n, "size": f.size, "sha256": f.sha256,
                 "bits_per_weight": bpw(f.uri) if n in model_files else None} for n, f in sorted(files.items())]
        metadata = read_gguf(model_gguf.uri).metadata if model_gguf else {}
        facts = gguf_card_facts(metadata) if model_gguf else {}
        more = dict(extras or {})
        if facts.get("chat_template"):
            more["prompt"] = rendered_prompt(facts["chat_template"], metadata)
        if source is not None:
            more["source_card"] = source_card_text(open_checkpoint(source.uri, source.fingerprint)
                                                   .read_file("README.md"))
        text = render_model_card(name, analysis, rows, validations, max_bake_error, fingerprint, converter, facts,
                                 plots or [], more)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return [path]

    key = inputs_key(CONVERTER, name, analysis, files, model_files, validations, max_bake_error, fingerprint,
                     converter, model_gguf, plots, extras, source and source.fingerprint)
    (ref,) = made_files(path + ".inputs.json", key, write)
    return ref


def rendered_prompt(template: str, metadata: dict) -> str | None:
    """The prompt the chat template makes of one user message, as llama.cpp's chat renders it
    (None when it does not render: the card then leaves the section out)."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str:
        i = metadata.get(key)
        return str(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else ""

    try:
        return render_chat(template, [{"role": "user", "content": "Hello"}], token("tokenizer.ggml.bos_token_id"),
                           token("tokenizer.ggml.eos_token_id"))
    except ChatTemplateError:
        return None


def _publish_run_name() -> str:
    """``publish-<release>``, without credentials: task run names are stored and shown everywhere."""
    from prefect.runtime import task_run

    return f"publish-{redact_uri(task_run.parameters['uri'])}"


@task(name="publish-release", task_run_name=_publish_run_name, **STORAGE_RETRIES)
def publish_release(files: dict[str, FileRef], uri: str, manifest: dict) -> tuple[FileRef, int]:
    """Upload, verify, then commit the release at ``uri`` with its manifest; returns (manifest, files uploaded)."""
    return release.publish_release(files, uri, manifest)


@task(name="publish-latest", **STORAGE_RETRIES)
def publish_latest(dest: str, model: str, entries: dict[str, dict], analysis: dict | None = None,
                   source: SourceRef | None = None) -> FileRef:
    """latest.json, and with ``analysis`` the model's own card (``<dest>/<model>/README.md``: every
    quant latest.json names, from its release's manifest) and its size/KLD plot, under one lock.
    Its license, base model and languages are the general.* keys the GGUFs hold, made again from the
    checkpoint's card and config (cheap; reading a GGUF's metadata decodes its whole vocabulary)."""
    if analysis is None:
        return release.update_latest(dest, model, entries)
    facts = {}
    if source is not None:
        ckpt = open_checkpoint(source.uri, source.fingerprint)
        general = general_kvs(analysis["gguf_architecture"], model, model_card_files(ckpt),
                              analysis["parameters"]["total"])
        facts = gguf_card_facts({kv.key: kv.value for kv in general})

    def model_files(quants: dict[str, dict]) -> dict[str, bytes]:
        manifests = {}
        for q, entry in quants.items():
            uri = release.entry_release(dest, model, entry)
            manifests[q] = release.read_manifest(uri) if uri else None
        rows = overview_rows(model, quants, {q: m for q, m in manifests.items() if m})
        plot = SIZE_KLD_PLOT.format(name=model)
        out = {}
        if any(r["kld_mean"] is not None for r in rows):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, plot)
                plot_size_vs_kld(rows, f"{model}: file size against mean KLD from F32", path)
                with open(path, "rb") as f:
                    out[plot] = f.read()
        out[MODEL_CARD_NAME] = render_model_overview(model, rows, analysis, facts, CONVERTER,
                                                     plot if plot in out else None).encode("utf-8")
        return out

    return release.update_latest(dest, model, entries, model_files)
