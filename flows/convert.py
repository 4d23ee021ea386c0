"""The conversion pipeline as a Prefect flow.

    fetch → analyze → quantize (one task per tensor, small ones batched; in parallel) → assemble → validate → publish

Tasks exchange references (URIs, sha256, sizes), never arrays. Quantized tensors are
staged content-addressed under the work directory, so a re-run redoes only what
changed. Nothing reaches the output URI unless every validation gate passed, and
``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
from pathlib import Path

from gguf import GGMLQuantizationType
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows import console
from flows.runners import task_slots
from so8t_core.constants import (
    ANALYSIS_NAME,
    CONVERTER,
    MODEL_CARD_NAME,
    SIDECAR_NAME,
    STATS_NAME,
    VALIDATION_NAME,
    ggml_type,
    quant_type,
)
from so8t_core.errors import UnsupportedError, ValidationError
from so8t_core.gguf_file import Split
from so8t_core.plan import CHUNK_ELEMENTS, quantize_batches
from so8t_core.publish.release import FINGERPRINT_CHARS, release_uri
from so8t_core.quantize.engines import resolve_engine
from so8t_core.quantize.imatrix import load_imatrix
from so8t_core.quantize.mixes import MixOptions, ModelShape, assign_types, parse_tensor_types
from so8t_core.quantize.staging import find_staged
from so8t_core.refs import file_ref
from so8t_core.source.lora import apply_to_plan, load_adapter
from so8t_core.storage import default_cache_dir, redact_uri
from so8t_core.testing.demo import DEMO_NAME, build_demo_checkpoint
from tasks import artifacts
from tasks.analyze import analyze_checkpoint
from tasks.assemble import assemble_gguf, assemble_sidecar
from tasks.fetch import fetch_checkpoint
from tasks.publish import publish, publish_latest, write_model_card, write_plots, write_stats_parquet
from tasks.quantize import quantize_tensors
from tasks.validate import reference_logits, validate_gguf

DEFAULT_QUANTS = ("Q8_0",)
PLOT_CAPTIONS = {"errors": "{quant}: relative RMSE of each quantized tensor against its float32 source, by layer",
                 "bits-per-weight": "{quant}: bits per weight by tensor class"}
# Per tensor in flight, per row chunk: the source bytes, their float32 form, the quantized
# bytes and the dequantized copy used for error statistics.
BYTES_IN_FLIGHT_PER_F32_BYTE = 4
BASELINE_BYTES = 1 << 30  # interpreter, torch, Prefect


def demo_source() -> str:
    """The embedded demo checkpoint, built once into the cache."""
    path = os.path.join(default_cache_dir(), "demo", DEMO_NAME)
    if not os.path.exists(os.path.join(path, "config.json")):
        build_demo_checkpoint(path)
    return path


def default_name(source: str) -> str:
    return os.path.basename(source.rstrip("/")) or "model"


def tensors_in_flight(max_memory_gb: float | None, largest_tensor_f32: int, workers: int) -> int:
    if max_memory_gb is None:
        return workers
    budget = max_memory_gb * (1 << 30) - BASELINE_BYTES
    per_tensor = BYTES_IN_FLIGHT_PER_F32_BYTE * largest_tensor_f32
    if budget < per_tensor:
        need = (BASELINE_BYTES + per_tensor) / (1 << 30)
        raise UnsupportedError(f"--max-memory {max_memory_gb:g}", f"too small: the largest tensor alone needs "
                                                                   f"about {need:.1f} GB", f"allow at least {need:.1f}")
    return max(1, min(workers, int(budget // per_tensor)))


@flow(name="convert", task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2))
def convert(source: str | None = None, output: str = "./artifacts", quants: list[str] = list(DEFAULT_QUANTS),
            run_validation: bool = True, name: str | None = None, max_memory_gb: float | None = None,
            work_dir: str | None = None, split_max_tensors: int = 0, split_max_size: int = 0,
            tensor_types: list[str] | None = None, output_tensor_type: str | None = None,
            token_embedding_type: str | None = None, pure: bool = False, engine: str = "auto",
            imatrix: str | None = None, lora: str | None = None) -> dict:
    """Convert an SO8T checkpoint into validated GGUF files and publish them to ``output``.

    ``lora``: a PEFT LoRA adapter folder merged into the weights before the bake; the release is
    then that of the merged model (its fingerprint covers the adapter)."""
    log = get_run_logger()

    def say(msg: str, *args) -> None:  # the run's log, and the CLI's terminal when it shows progress
        log.info(msg, *args)
        console.stage(msg % args)
    quants = list(dict.fromkeys(quant_type(q).name for q in quants))  # refuse bad names before any work
    # An importance matrix is read (and checked) once here; tasks get its URI and sha256.
    im = load_imatrix(imatrix) if imatrix else None
    im_ref = (im.uri, im.sha256) if im else None
    adapter = load_adapter(lora) if lora else None
    lora_ref = (adapter.uri, adapter.sha256) if adapter else None
    options = MixOptions(
        tensor_types=parse_tensor_types(tensor_types or []), pure=pure, has_imatrix=im is not None,
        output_tensor_type=ggml_type(output_tensor_type, "--output-tensor-type") if output_tensor_type else None,
        token_embedding_type=(ggml_type(token_embedding_type, "--token-embedding-type")
                              if token_embedding_type else None))
    engine = resolve_engine(engine)
    if source is None:
        source, name = demo_source(), name or DEMO_NAME
    name = name or default_name(source)
    work_dir = work_dir or os.path.join(default_cache_dir(), "work")
    staging_dir = os.path.join(work_dir, "tensors")

    console.stage(f"fetching {redact_uri(source)} (fingerprinting its tensors)")
    src = fetch_checkpoint(source, work_dir)
    say("fetched %s: %d tensors, %.1f MB, fingerprint %s", redact_uri(source), len(src.tensor_sha256),
             src.n_bytes / 1e6, src.fingerprint[:16])
    result = analyze_checkpoint(src)
    analysis, plan = result.analysis, result.plan
    say("analyzed: %s; %d GGUF tensors", analysis["variant"], len(plan))
    fingerprint = src.fingerprint  # of what is released: the source, and the adapter merged into it
    if adapter is not None:
        plan = apply_to_plan(plan, adapter, redact_uri(source))
        analysis = {**analysis, "lora": adapter.summary()}
        fingerprint = hashlib.sha256(f"{src.fingerprint}|lora|{adapter.sha256}".encode()).hexdigest()
        say("LoRA %s (r=%d, alpha=%g, scale %.4g, %s) merged into %d tensors: %s", redact_uri(adapter.uri),
            adapter.r, adapter.alpha, adapter.scale, "rsLoRA" if adapter.use_rslora else "LoRA",
            len(adapter.pairs), ", ".join(analysis["lora"]["effective_target_modules"]))

    # Each quant is one of llama-quantize's mixes: its rules give every tensor a type.
    hp = analysis["hyperparameters"]
    shape = ModelShape(arch=analysis["gguf_architecture"], n_layers=hp["layers"], n_heads=hp["heads"],
                       n_kv_heads=hp["kv_heads"])
    names_shapes = [(p.gguf_name, p.shape) for p in plan]
    types = {q: assign_types(names_shapes, quant_type(q), shape, options) for q in quants}

    # Quantize: one task per tensor (small ones share one), at most `limit` tasks at once.
    # Tensors stream through in row chunks: what a task holds is bounded by the chunk size.
    largest = min(max(p.n_elements for p in plan), CHUNK_ELEMENTS) * 4
    # The runner says how many tasks to keep in flight: the CPUs (threads), or twice the
    # worker threads of a Dask cluster, which also fixes the quantizer's threads per task.
    slots, threads = task_slots()
    limit = tensors_in_flight(max_memory_gb, largest, slots)
    threads = threads or max(1, slots // limit)  # tensors in parallel × threads per tensor = the CPUs
    staged_by_tensor: list = [None] * len(plan)
    to_quantize = []  # (position in plan, source sha256s, targets)
    for i, item in enumerate(plan):
        shas = [src.tensor_sha256[n] for n in (item.source, item.gate, item.bias_source) if n]
        targets = [(q, types[q][i].name) for q in quants]
        # Already staged by an earlier run (content-addressed, same inputs): no task needed.
        weights = im.for_tensor(item.gguf_name, item.shape[-1]) if im and len(item.shape) == 2 else None
        staged_by_tensor[i] = find_staged(item, [(q, GGMLQuantizationType[t]) for q, t in targets], staging_dir,
                                          shas, weights)
        if staged_by_tensor[i] is None:
            to_quantize.append((i, shas, targets))
    progress = artifacts.QuantizeProgress(name, len(plan))
    console.start_bar(len(plan), "quantize")
    done = len(plan) - len(to_quantize)
    progress.update(done)
    console.update_bar(done)
    # A new task starts as soon as any running one finishes (not the oldest: a big tensor
    # would otherwise leave the other CPUs idle behind it). Every future puts itself on
    # `finished` when it ends, whatever the runner (thread or Dask futures), so waiting for
    # "any one" is a get().
    finished, running = queue.SimpleQueue(), {}  # running: future → its tensors' positions

    def wait_for_one() -> None:
        nonlocal done
        future = finished.get()
        positions = running.pop(future)
        for i, staged_tensor in zip(positions, future.result(), strict=True):
            staged_by_tensor[i] = staged_tensor
        done += len(positions)
        progress.update(done)
        console.update_bar(done)

    for batch in quantize_batches([plan[i].n_elements for i, _, _ in to_quantize]):
        if len(running) >= limit:
            wait_for_one()
        jobs = [to_quantize[j] for j in batch]
        future = quantize_tensors.submit(src.uri, src.fingerprint, [plan[i] for i, _, _ in jobs],
                                         [shas for _, shas, _ in jobs], [targets for _, _, targets in jobs],
                                         staging_dir, engine, im_ref, threads, lora_ref)
        running[future] = [i for i, _, _ in jobs]
        future.add_done_callback(finished.put)
    while running:
        wait_for_one()
    staged = {q: [per_tensor[i] for per_tensor in staged_by_tensor] for i, q in enumerate(quants)}
    say("quantized %d tensors into %s with the %s engine", len(plan), ", ".join(quants), engine)

    out_dir = os.path.join(work_dir, "runs", f"{name}-{fingerprint[:16]}")
    os.makedirs(out_dir, exist_ok=True)
    split = Split(max_tensors=split_max_tensors, max_bytes=split_max_size)
    im_info = (im.uri, im.sha256, imatrix) if im else None
    uncovered: list[str] = []
    if im:
        uncovered = [p.gguf_name for p, t in zip(plan, types[quants[0]]) if t.name not in ("F32", "F16", "BF16")
                     and p.gguf_name not in im.entries]
        if uncovered:  # llama-quantize only logs this; a silent quality loss worth saying
            log.warning("imatrix has no entry for %d quantized tensors (e.g. %s): quantized without it",
                        len(uncovered), uncovered[0])
    console.stage("assembling " + ", ".join(quants))
    ggufs = {q: assemble_gguf(src, q, name, staged[q], out_dir, split, im_info) for q in quants}
    sidecar = assemble_sidecar(src, name, out_dir)

    validations: dict[str, dict] = {}
    validation_files = {}
    if run_validation:
        console.stage("validating in llama.cpp against the PyTorch reference")
        reference = reference_logits(src, work_dir, lora_ref)
        validate = validate_gguf.with_options(result_storage=Path(work_dir) / "results")
        for q in quants:
            validations[q] = validate(src, q, name, ggufs[q][0], staged[q], reference, im_info)
            v = validations[q]
            f = v.get("llama_cpp", {})
            say("validated %s: mean KLD %.3g, top-1 %.2f%%, %s", q, f.get("mean_kld", float("nan")),
                     100 * f.get("top1_agreement", float("nan")), "passed" if v["passed"] else "FAILED")
            report = os.path.join(out_dir, VALIDATION_NAME.format(name=name, quant=q))
            _write_json(report, v)
            validation_files[q] = file_ref(report)

    bake_errors = {s.gguf_name: s.bake_error for s in staged[quants[0]] if s.bake_error is not None}
    max_bake_error = max(bake_errors.values(), default=0.0)
    artifacts.stats_tables(name, staged)
    facts = dict(source=source, fingerprint=fingerprint, quants=quants, staged=staged,
                  validations=validations, max_bake_error=max_bake_error)
    failed = {q: v["failures"] for q, v in validations.items() if not v["passed"]}
    if failed:
        detail = "; ".join(f"{q}: {', '.join(fs)}" for q, fs in failed.items())
        first = VALIDATION_NAME.format(name=name, quant=next(iter(failed)))
        artifacts.summary(name, **facts, releases={}, failure=f"Validation failed: {detail}.")
        raise ValidationError(source, f"validation failed ({detail}); nothing was published",
                              f"see {os.path.join(out_dir, first)}")

    analysis_path = os.path.join(out_dir, ANALYSIS_NAME)
    _write_json(analysis_path, analysis)
    common = {ANALYSIS_NAME: file_ref(analysis_path)}
    if sidecar is not None:
        common[SIDECAR_NAME.format(name=name)] = sidecar

    # One release per quant: <output>/<name>/<fingerprint>/<quant>/, manifest.json last.
    releases, latest = {}, {}
    for q in quants:
        qdir = os.path.join(out_dir, q)
        os.makedirs(qdir, exist_ok=True)
        files = {os.path.basename(r.uri): r for r in ggufs[q]}
        files.update(common)
        files[STATS_NAME.format(name=name, quant=q)] = write_stats_parquet(
            q, staged[q], os.path.join(qdir, STATS_NAME.format(name=name, quant=q)))
        if q in validations:
            files[VALIDATION_NAME.format(name=name, quant=q)] = validation_files[q]
        plots = write_plots(name, q, staged[q], qdir)
        files.update(plots)
        artifacts.plots(name, q, {n: r.uri for n, r in plots.items()})
        n_params = {os.path.basename(r.uri): sum(s.n_elements for s in staged[q]) for r in ggufs[q]}
        files[MODEL_CARD_NAME] = write_model_card(
            os.path.join(qdir, MODEL_CARD_NAME), name, analysis, files, n_params,
            {q: validations[q]} if q in validations else {}, max_bake_error, fingerprint, CONVERTER,
            ggufs[q][0], [(n, PLOT_CAPTIONS[n.rsplit(".", 2)[-2]].format(quant=q)) for n in plots])
        manifest = {"name": name, "quant": q, "converter": CONVERTER, "source_fingerprint": src.fingerprint,
                    "validation": validations.get(q), "bake_errors": bake_errors,
                    "imatrix": None if im is None else {"sha256": im.sha256, "entries": len(im.entries),
                                                        "tensors_without_entry": uncovered}}
        if adapter is not None:
            manifest["lora"] = analysis["lora"]
        release = release_uri(output, name, fingerprint, q)
        manifest_ref, uploaded = publish(files, release, manifest)
        releases[q] = {"uri": release, "files": {n: f.model_dump() for n, f in files.items()},
                       "manifest": manifest_ref.model_dump(), "uploaded": uploaded}
        latest[q] = {"source_fingerprint": src.fingerprint,
                     "release": f"{fingerprint[:FINGERPRINT_CHARS]}/{q}/",
                     "gguf": os.path.basename(ggufs[q][0].uri)}
        say("published %s: %d of %d files uploaded to %s", q, uploaded, len(files), redact_uri(release))
    latest_ref = publish_latest(output, name, latest)
    artifacts.summary(name, **facts, releases=releases)
    artifacts.release_links(name, releases)
    return {"name": name, "output": output, "source": source, "fingerprint": fingerprint,
            "source_fingerprint": src.fingerprint, "lora": analysis.get("lora"),
            "releases": releases, "latest": latest_ref.model_dump(), "validation": validations,
            "max_bake_error": max_bake_error, "analysis": analysis}


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
