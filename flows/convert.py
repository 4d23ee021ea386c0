"""The conversion pipeline as a Prefect flow:

    fetch → analyze → importance → target → quantize (one task per tensor, small ones batched; in parallel) → assemble
          → validate → evaluate → publish

The flow's body is that list; each stage is a function below it that calls the stage's tasks
(``tasks/<stage>.py``). Tasks exchange references (URIs, sha256, sizes), never arrays.
Quantized tensors are staged content-addressed under the work directory, so a re-run redoes
only what changed. Nothing reaches the output URI unless every validation gate passed; a quant
that fails its quality gates (the evaluation's) is not published while the others are, and the
run then fails naming it. A release changes only by switching its pointer to a new, complete,
immutable version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType
from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows import console
from flows.params import ConvertParams, check_inputs, check_targets, imatrix_coverage
from flows.runners import task_slots
from so8t_core import storage
from so8t_core.constants import (
    ANALYSIS_NAME,
    CONVERTER,
    EVALUATION_NAME,
    IMATRIX_NAME,
    MODEL_CARD_NAME,
    RECIPE_NAME,
    SIDECAR_NAME,
    STATS_NAME,
    VALIDATION_NAME,
)
from so8t_core.errors import ValidationError
from so8t_core.gguf_file import NO_SPLIT, Split
from so8t_core.plan import TensorPlan
from so8t_core.publish.release import FINGERPRINT_CHARS, release_manifest, release_uri
from so8t_core.quantize import target as target_mix
from so8t_core.quantize.calibration import measured_weights
from so8t_core.quantize.imatrix import Imatrix, load_imatrix
from so8t_core.quantize.mixes import MixOptions, ModelShape, check_imatrix_requirements, mix_types
from so8t_core.refs import FileRef, SourceRef, StagedTensor, file_ref
from so8t_core.source.lora import LoraAdapter, apply_to_plan
from so8t_core.storage import check_writable, default_cache_dir, redact_uri
from so8t_core.testing.demo import DEMO_NAME, build_demo_checkpoint
from so8t_core.validate.gains import PROBE_CHUNKS, gains_file
from so8t_core.validate.inspection import type_counts
from so8t_core.validate.perplexity import KlDivergenceStatistics, gate_failures
from tasks import artifacts
from tasks.analyze import analyze_checkpoint
from tasks.assemble import assemble_gguf, assemble_sidecar
from tasks.evaluate import evaluate_gguf, evaluation_base
from tasks.fetch import fetch_checkpoint
from tasks.importance import ComputedImatrix, compute_imatrix, tokenize_calibration
from tasks.publish import publish_latest, publish_release, write_model_card, write_plots, write_stats_parquet
from tasks.quantize import quantize_plan
from tasks.target import measure_damage, measure_gains
from tasks.validate import reference_logits, validate_gguf

PLOT_CAPTIONS = {"errors": "{quant}: relative RMSE of each quantized tensor against its float32 source, by layer",
                 "bits-per-weight": "{quant}: bits per weight by tensor class"}


@flow(name="convert", task_runner=ThreadPoolTaskRunner(max_workers=os.cpu_count() or 2))
def convert(params: ConvertParams = ConvertParams()) -> dict:
    """Convert an SO8T checkpoint into validated GGUF files and publish one release per quant mix.

    Args:
        params: The checkpoint, destination, quant mixes and options of the conversion.
    """
    run = Run.prepare(params)  # every input checked before any work (flows/params.py: check_inputs)

    # Extract: the checkpoint's tensors, fingerprinted; what it is, and the tensor plan.
    source = fetch(run)
    model = analyze(run, source)

    # Transform: each tensor baked and quantized per mix, the GGUF files assembled, then
    # validated in llama.cpp against the PyTorch SO8T reference.
    # The importance matrix: --imatrix's, or computed on the --calibration text in llama.cpp.
    imatrix = importance(run, source, model)
    # Target mixes (--target-bpw, --target-size): each weight's type from its measured damage.
    target(run, source, model, imatrix)
    staged = quantize(run, source, model, imatrix)
    files = assemble(run, source, model, staged, imatrix)
    validations = validate(run, source, model, staged, files, imatrix)
    # Each quant against the F32 model on the evaluation text, and the quality gates.
    evaluations = evaluate(run, source, model, files)

    # Load: one release per quant mix that passed its gates, and latest.json.
    releases, latest = publish(run, source, model, staged, files, validations, evaluations, imatrix)
    lora = model.analysis.get("lora")
    return {"name": run.name, "output": params.output, "source": run.source, "fingerprint": model.fingerprint,
            "source_fingerprint": source.fingerprint, "releases": releases,
            "lora": lora and {"uri": redact_uri(run.adapter.uri), **lora},
            "latest": latest.model_dump(), "validation": validations, "max_bake_error": max_bake_error(staged),
            "analysis": model.analysis}


# --- What a run works with ------------------------------------------------------------------

@dataclass
class Run:
    """A conversion's inputs, checked and resolved: what every stage reads."""

    params: ConvertParams
    source: str
    name: str
    quants: list[str]
    work_dir: str
    options: MixOptions
    engine: str
    imatrix: Imatrix | None
    adapter: LoraAdapter | None
    eval_text_sha256: str | None
    unmet: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # targets no file met: label → why

    @classmethod
    def prepare(cls, params: ConvertParams) -> "Run":
        inputs = check_inputs(params)  # the name too: Python callers bypass the CLI
        check_writable(params.output)  # not found only at publish, after minutes of work
        return cls(params=params, source=params.source or demo_source(), name=inputs.name, quants=inputs.quants,
                   work_dir=params.work_dir or os.path.join(default_cache_dir(), "work"), options=inputs.options,
                   engine=inputs.engine, imatrix=inputs.imatrix, adapter=inputs.adapter,
                   eval_text_sha256=inputs.eval_text_sha256)

    @property
    def staging_dir(self) -> str:
        return os.path.join(self.work_dir, "tensors")

    @property
    def lora_ref(self) -> tuple[str, str] | None:
        return (self.adapter.uri, self.adapter.sha256) if self.adapter else None

    def say(self, msg: str, *args) -> None:
        """The run's log, and the CLI's terminal when it shows progress."""
        get_run_logger().info(msg, *args)
        console.stage(msg % args)


@dataclass
class Model:
    """What the analyze stage found: the structure report, the tensor plan, and each mix's types."""

    analysis: dict
    plan: list[TensorPlan]
    fingerprint: str  # of what is released: the source, and the adapter merged into it
    types: dict[str, list[GGMLQuantizationType]]
    # per quant: (tensor, the rules' type, the type used) where rows did not fit (mixes.assign_types)
    fallbacks: dict[str, list] = dataclasses.field(default_factory=dict)
    recipes: dict[str, "Recipe"] = dataclasses.field(default_factory=dict)  # the target mixes' (AUTO-<B>)
    f32: FileRef | None = None  # the baked model in F32 once a stage needed it (f32_model)

    def mix_of(self, quant: str) -> str:
        """The llama-quantize mix a release's file is written as: the quant itself, or for a target
        mix's AUTO-<B> label the mix its recipe goes with (only general.file_type depends on it)."""
        return self.recipes[quant].base_mix if quant in self.recipes else quant

    def folder(self, run: Run) -> str:
        """Where this run's files are assembled, in the work folder."""
        return os.path.join(run.work_dir, "runs", f"{run.name}-{self.fingerprint[:16]}")


@dataclass
class Recipe:
    """A target mix: the types chosen for one target, as a llama-quantize --tensor-type-file with the
    mix it goes with, and what the card shows of it."""

    label: str  # AUTO-<B>, AUTO-KLD-<K>
    target: dict  # {"bpw": B}, {"size": bytes} or {"kld": K}
    base_mix: str
    tensor_type_file: str
    table: str  # target.render_recipe's Markdown
    predicted_damage: float  # the summed damage: the predicted mean KLD when class_gains were measured
    bits_per_weight: float
    class_gains: dict[str, float] | None  # None: the run did not evaluate, so no probes
    search: dict | None = None  # --target-kld's: the budgets tried and their measured KLD (KldSearch.as_record)

    def summary(self, file_name: str) -> dict:
        """What a release's manifest records of it."""
        predicted = {"predicted_kld": self.predicted_damage} if self.class_gains else \
            {"predicted_damage": self.predicted_damage}
        out = {"target": self.target, "base_mix": self.base_mix, "tensor_type_file": file_name,
               "bits_per_weight": self.bits_per_weight, **predicted, "class_gains": self.class_gains or False}
        return {**out, "search": self.search} if self.search is not None else out


@dataclass
class Importance:
    """The importance matrix every mix of a run is quantized with: --imatrix's file, or the one
    computed on --calibration text, which each release holds as NAME.imatrix.gguf."""

    imatrix: Imatrix
    name: str  # what the GGUFs' quantize.imatrix.file records: the file's name, never a local path
    uncovered: dict[str, list[str]]  # per quant: tensors quantized without an entry
    computed: ComputedImatrix | None = None

    @property
    def info(self) -> tuple[str, str, str]:
        """(URI, sha256, name): what the assemble and validate tasks take."""
        return self.imatrix.uri, self.imatrix.sha256, self.name

    def summary(self, quant: str) -> dict:
        """What a release's manifest records of it."""
        out = self.imatrix.summary(self.uncovered.get(quant, []))
        if self.computed is not None:
            c = self.computed
            out["computed"] = {"file": self.name, "calibration": c.datasets, "calibration_sha256": c.calibration_sha256,
                               "tokens": c.tokens, "chunks": c.chunks, "ctx": c.ctx, "coverage": c.coverage}
        return out


@dataclass
class Files:
    """The assembled files of a run, in its output folder under the work directory."""

    out_dir: str
    ggufs: dict[str, list[FileRef]]  # per quant: one file, or a split set whose first is the one to load
    sidecar: FileRef | None


# --- The stages ------------------------------------------------------------------------------

def fetch(run: Run) -> SourceRef:
    console.stage(f"fetching {redact_uri(run.source)} (fingerprinting its tensors)")
    src = fetch_checkpoint(run.source, run.work_dir)
    run.say("fetched %s: %d tensors, %.1f MB, fingerprint %s", redact_uri(run.source), len(src.tensor_sha256),
            src.n_bytes / 1e6, src.fingerprint[:16])
    return src


def analyze(run: Run, src: SourceRef) -> Model:
    """The structure report and the tensor plan; a LoRA adapter merges into the plan; each
    quant is one of llama-quantize's mixes, whose rules give every tensor a type."""
    result = analyze_checkpoint(src, run.params.allow_tokenizer_mismatch)
    analysis, plan, fingerprint = result.analysis, result.plan, src.fingerprint
    run.say("analyzed: %s; %d GGUF tensors", analysis["variant"], len(plan))
    if run.adapter is not None:
        adapter = run.adapter
        plan = apply_to_plan(plan, adapter, redact_uri(run.source))
        analysis = {**analysis, "lora": adapter.summary()}
        fingerprint = hashlib.sha256(f"{src.fingerprint}|lora|{adapter.sha256}".encode()).hexdigest()
        run.say("LoRA %s (r=%d, alpha=%g, scale %.4g, %s) merged into %d tensors: %s", redact_uri(adapter.uri),
                adapter.r, adapter.alpha, adapter.scale, "rsLoRA" if adapter.use_rslora else "LoRA",
                len(adapter.pairs), ", ".join(analysis["lora"]["effective_target_modules"]))
    check_targets(run.params, plan, run.source, run.name)
    fallbacks: dict[str, list] = {}
    types = mix_types(plan, run.quants, ModelShape.from_analysis(analysis), run.options,
                      imatrix_coverage(run.params, run.imatrix, plan), fallbacks)
    return Model(analysis=analysis, plan=plan, fingerprint=fingerprint, types=types, fallbacks=fallbacks)


def importance(run: Run, src: SourceRef, model: Model) -> Importance | None:
    """The importance matrix of the run: --imatrix's, or computed on the --calibration text by
    running the baked model (its F32 GGUF) in llama.cpp as llama-imatrix does; None without."""
    if run.imatrix is not None:
        imatrix, name, computed = run.imatrix, posixpath.basename(run.params.imatrix.rstrip("/")), None
    elif run.params.computes_imatrix:
        imatrix, computed = compute_importance(run, src, model)
        name = IMATRIX_NAME.format(name=run.name)
    else:
        return None
    uncovered = {q: imatrix.uncovered(model.plan, model.types[q]) for q in run.quants}
    # llama-quantize only logs this; a silent quality loss worth saying, for the weights an
    # imatrix measures (token_embd is a lookup no llama-imatrix file has; output is left out by default)
    measured = measured_weights([(t.gguf_name, t.shape) for t in model.plan])
    for q, names in uncovered.items():
        if missing := [n for n in names if n in measured]:
            get_run_logger().warning("imatrix has no entry for %d tensors %s quantizes (e.g. %s): quantized "
                                     "without it", len(missing), q, missing[0])
    return Importance(imatrix=imatrix, name=name, uncovered=uncovered, computed=computed)


def compute_importance(run: Run, src: SourceRef, model: Model) -> tuple[Imatrix, ComputedImatrix]:
    """Tokenize the calibration text (refused here when it is too short), stage and assemble the
    baked model in F32, run it over the text in llama.cpp; cached under the work folder."""
    p = run.params
    console.stage("tokenizing the calibration text")
    tokens = tokenize_calibration(src, p.calibration, p.calibration_ctx, run.work_dir, p.allow_tokenizer_mismatch)
    console.stage(f"staging the baked model in F32 for the importance matrix ({tokens.tokens} calibration tokens)")
    f32 = f32_model(run, src, model)
    console.stage("computing the importance matrix in llama.cpp")
    computed = compute_imatrix(f32, tokens, p.calibration_ctx, p.calibration_chunks or None, run.work_dir)
    tokens_seen = [c["tokens"] for c in computed.coverage.values()]
    run.say("importance matrix on %s: %d weights, %d tokens in %d chunks of %d (%d to %d per weight), "
            "%.0f tokens/s", ", ".join(computed.datasets), len(computed.coverage), computed.tokens,
            computed.chunks, computed.ctx, min(tokens_seen, default=0), max(tokens_seen, default=0),
            computed.tokens_per_second)
    idle = {n: c["matrices_without_tokens"] for n, c in computed.coverage.items() if c["matrices_without_tokens"]}
    if idle:  # llama-quantize quantizes those experts with importance 1 (no data), as the loader gives
        run.say("experts the calibration text never routed to (no importance data for them): %s",
                ", ".join(f"{n} ({k})" for n, k in sorted(idle.items())))
    imatrix = load_imatrix(computed.file.uri)
    # What llama-quantize refuses, now with the entries the imatrix really has.
    check_imatrix_requirements([(t.gguf_name, t.shape) for t in model.plan], model.types, set(imatrix.entries))
    return imatrix, computed


def f32_model(run: Run, src: SourceRef, model: Model) -> FileRef:
    """The baked model in F32 (no imatrix, one file), staged and assembled in the run's folder once
    per run: what the importance matrix is computed with, the target mixes measure, and the
    evaluation's base when the run publishes no F32 release."""
    if model.f32 is None:
        slots, threads = task_slots()
        f32_types = {"F32": [GGMLQuantizationType.F32] * len(model.plan)}
        staged = quantize_plan(src, model.plan, f32_types, run.staging_dir, run.engine, None, run.lora_ref, slots,
                               threads, run.params.max_memory_gb or None, lambda done: None)["F32"]
        model.f32 = assemble_gguf(src, "F32", run.name, staged, os.path.join(model.folder(run), "f32"), NO_SPLIT,
                                  None, run.params.allow_tokenizer_mismatch)[0]
    return model.f32


def target(run: Run, src: SourceRef, model: Model, imatrix: Importance | None) -> None:
    """For each target (--target-bpw, --target-size, --target-kld), a release AUTO-<B> (AUTO-KLD-<K>):
    every tensor of the baked model in F32 is measured in each candidate type (cached), the types
    allocated under the budget (for --target-kld, the smallest budget whose file the evaluation
    measures within the bound: kld_search), and the recipe given as overrides to the mix it goes
    with, through llama-quantize's rules like any mix's overrides. Adds the labels to the run's
    quants and their types to the model's."""
    p = run.params
    if not p.target_bpw and not p.target_size and not p.target_kld:
        return
    console.stage("measuring each weight's damage per candidate type for the target mixes")
    f32 = f32_model(run, src, model)
    imatrix_ref = imatrix.info[:2] if imatrix else None
    tensors = measure_damage(f32, imatrix_ref, run.work_dir)
    gains = None
    if p.evaluates:  # the damage weighted by what each tensor class does to the KLD: a predicted KLD
        console.stage(f"measuring each tensor class's KLD gain with probes on {PROBE_CHUNKS} chunks")
        base, _ = evaluation_base_of(run, src, model)  # the evaluate stage's base, of this F32 file
        gains = measure_gains(f32, base, imatrix_ref, tensors, run.engine,
                              gains_file(run.work_dir, model.fingerprint, imatrix_ref[1] if imatrix_ref else None,
                                         run.eval_text_sha256, p.eval_ctx))
        run.say("class gains (mean KLD per unit of damage): %s",
                ", ".join(f"{k} {v:.3g}" for k, v in sorted(gains.items(), key=lambda kv: -kv[1])))
        tensors = target_mix.with_gains(tensors, gains)
    for label, goal, budget in target_mix.target_budgets(tensors, p.target_bpw, p.target_size_bytes, f32.size):
        if label not in model.types:
            add_recipe(run, model, imatrix, tensors, gains, label, goal, target_mix.allocate(tensors, budget))
    if p.target_kld:
        label = target_mix.kld_label(p.target_kld)
        search = kld_search(run, src, model, imatrix, tensors, label)
        if search.types is None:
            top = search.next_smaller
            run.unmet[label] = [f"--target-kld {p.target_kld:g} not met: even the largest types "
                                f"({top.bits_per_weight:.2f} bits per weight) measure mean KLD {top.kld:.4g}"]
            run.say("target %s: %s; not published", label, run.unmet[label][0])
        else:
            add_recipe(run, model, imatrix, tensors, gains, label, {"kld": p.target_kld}, search.types,
                       search.as_record())


def add_recipe(run: Run, model: Model, imatrix: Importance | None, tensors: list, gains: dict[str, float] | None,
               label: str, goal: dict, chosen: dict[str, GGMLQuantizationType], search: dict | None = None) -> None:
    """A target's release: its recipe, its types through llama-quantize's rules, its label among the
    run's quants (``tensors``: their options, damages times ``gains`` when the run measured them)."""
    base, model.types[label] = target_mix.recipe_mix_types(
        [(pl.gguf_name, pl.shape) for pl in model.plan], tensors, chosen, ModelShape.from_analysis(model.analysis),
        imatrix is not None)
    recipe = Recipe(label=label, target=goal, base_mix=base,
                    tensor_type_file=target_mix.tensor_type_file(tensors, chosen),
                    table=target_mix.render_recipe(tensors, chosen, gains=gains is not None),
                    predicted_damage=target_mix.predicted_damage(tensors, chosen),
                    bits_per_weight=target_mix.bits_per_weight(tensors, chosen), class_gains=gains, search=search)
    model.recipes[label] = recipe
    run.quants.append(label)
    if imatrix is not None:
        imatrix.uncovered[label] = imatrix.imatrix.uncovered(model.plan, model.types[label])
    run.say("target %s: %s with per-tensor overrides, %.3f bits per weight, %s %.4g", label, recipe.base_mix,
            recipe.bits_per_weight, "predicted mean KLD" if gains else "summed damage", recipe.predicted_damage)


def kld_search(run: Run, src: SourceRef, model: Model, imatrix: Importance | None, tensors: list,
               label: str) -> target_mix.KldSearch:
    """--target-kld's bisection over budgets (target.search_kld): each candidate's types staged
    (content-addressed: the quantize stage reuses the winner's), assembled in the search folder and
    evaluated by the evaluate stage's task against the same base, so the winner's record in the
    evaluate stage is the one the search measured (cached by the file's sha256 and the settings)."""
    p = run.params
    base, settings = evaluation_base_of(run, src, model)
    evaluate_cached = evaluate_gguf.with_options(result_storage=Path(run.work_dir) / "results")
    search_dir = os.path.join(model.folder(run), "kld-search")
    shapes = [(pl.gguf_name, pl.shape) for pl in model.plan]
    slots, threads = task_slots()

    def measure(chosen: dict[str, GGMLQuantizationType]) -> float:
        bpw = target_mix.bits_per_weight(tensors, chosen)
        console.stage(f"target {label}: trying {bpw:.3f} bits per weight")
        mix, types = target_mix.recipe_mix_types(shapes, tensors, chosen, ModelShape.from_analysis(model.analysis),
                                                 imatrix is not None)
        staged = quantize_plan(src, model.plan, {label: types}, run.staging_dir, run.engine,
                               imatrix.imatrix if imatrix else None, run.lora_ref, slots, threads,
                               p.max_memory_gb or None, lambda done: None)[label]
        gguf = assemble_gguf(src, label, run.name, staged, search_dir, NO_SPLIT, imatrix.info if imatrix else None,
                             p.allow_tokenizer_mismatch, mix=mix)[0]
        kld = evaluate_cached(label, gguf, base, settings)["statistics"]["kld_mean"]
        for made in (gguf.uri, gguf.uri + ".inputs.json"):  # its evaluation is cached by its sha256, the
            os.remove(made)                                   # winner's tensors are staged: it is assembled again
        run.say("target %s: %.3f bits per weight measures mean KLD %.4g (%s %g)", label, bpw, kld,
                "within" if kld <= p.target_kld else "over", p.target_kld)
        return kld

    return target_mix.search_kld(tensors, p.target_kld, measure)


def quantize(run: Run, src: SourceRef, model: Model, imatrix: Importance | None) -> dict[str, list[StagedTensor]]:
    """Every tensor of the plan, staged in every mix's type: as many tasks in flight as the
    runner has slots (fewer under --max-memory)."""
    progress = artifacts.QuantizeProgress(run.name, len(model.plan))
    console.start_bar(len(model.plan), "quantize")

    def tensors_done(done: int) -> None:
        progress.update(done)
        console.update_bar(done)

    slots, threads = task_slots()
    staged = quantize_plan(src, model.plan, model.types, run.staging_dir, run.engine,
                           imatrix.imatrix if imatrix else None, run.lora_ref,
                           slots, threads, run.params.max_memory_gb or None, tensors_done)
    run.say("quantized %d tensors into %s with the %s engine", len(model.plan), ", ".join(run.quants), run.engine)
    artifacts.stats_tables(run.name, staged)
    return staged


def assemble(run: Run, src: SourceRef, model: Model, staged: dict[str, list[StagedTensor]],
             imatrix: Importance | None) -> Files:
    out_dir = model.folder(run)
    os.makedirs(out_dir, exist_ok=True)
    console.stage("assembling " + ", ".join(run.quants))
    split = Split(max_tensors=run.params.split_max_tensors, max_bytes=run.params.split_max_bytes)
    ggufs = {q: assemble_gguf(src, q, run.name, staged[q], out_dir, split, imatrix.info if imatrix else None,
                              run.params.allow_tokenizer_mismatch, mix=model.mix_of(q)) for q in run.quants}
    return Files(out_dir=out_dir, ggufs=ggufs, sidecar=assemble_sidecar(src, run.name, out_dir))


def validate(run: Run, src: SourceRef, model: Model, staged: dict[str, list[StagedTensor]],
             files: Files, imatrix: Importance | None) -> dict[str, dict]:
    """Each quant's file in llama.cpp against the PyTorch reference; a failed gate stops the run
    before anything is published (the summary artifact says why)."""
    if not run.params.run_validation:
        return {}
    console.stage("validating in llama.cpp against the PyTorch reference")
    reference = reference_logits(src, run.work_dir, run.lora_ref)
    validate_cached = validate_gguf.with_options(result_storage=Path(run.work_dir) / "results")
    validations = {}
    for q in run.quants:
        v = validations[q] = validate_cached(src, q, run.name, files.ggufs[q][0], staged[q], reference,
                                             imatrix.info if imatrix else None,
                                             run.params.allow_tokenizer_mismatch, mix=model.mix_of(q))
        f = v.get("llama_cpp", {})
        run.say("validated %s: mean KLD %.3g, top-1 %.2f%%, %s", q, f.get("mean_kld", float("nan")),
                100 * f.get("top1_agreement", float("nan")), "passed" if v["passed"] else "FAILED")
        _write_json(os.path.join(files.out_dir, VALIDATION_NAME.format(name=run.name, quant=q)), v)
    failed = {q: v["failures"] for q, v in validations.items() if not v["passed"]}
    if failed:
        detail = "; ".join(f"{q}: {', '.join(fs)}" for q, fs in failed.items())
        first = VALIDATION_NAME.format(name=run.name, quant=next(iter(failed)))
        artifacts.summary(run.name, **_facts(run, model, staged, validations), releases={},
                          failure=f"Validation failed: {detail}.")
        raise ValidationError(run.source, f"validation failed ({detail}); nothing was published",
                              f"see {os.path.join(files.out_dir, first)}")
    return validations


def evaluate(run: Run, src: SourceRef, model: Model, files: Files) -> dict[str, dict]:
    """Each quant's file in llama.cpp against the F32 model (the run's F32 file, else one staged
    for it) over the evaluation text, with llama-perplexity's --kl-divergence statistics, and the
    quality gates (--max-kld, --min-same-top) applied to them: the record of each quant."""
    p = run.params
    if not p.evaluates:
        return {}
    chunks = f"{p.eval_chunks} chunks of {p.eval_ctx} tokens"
    console.stage(f"evaluating against the F32 model on {redact_uri(p.eval_text)} ({chunks})")
    base, settings = evaluation_base_of(run, src, model, files)
    evaluate_cached = evaluate_gguf.with_options(result_storage=Path(run.work_dir) / "results")
    gate = {"max_kld": p.max_kld, "min_same_top": p.min_same_top}
    evaluations = {}
    for q in run.quants:
        record = evaluate_cached(q, files.ggufs[q][0], base, settings)
        stats = KlDivergenceStatistics(**record["statistics"])
        failures = gate_failures(stats, p.max_kld, p.min_same_top)
        evaluations[q] = {**record, "gate": gate, "passed": not failures, "failures": failures}
        run.say("evaluated %s: PPL ratio %.4f, mean KLD %.4g, same top p %.2f%% (%d tokens): %s", q, stats.ppl_ratio,
                stats.kld_mean, 100 * stats.same_top_p, stats.count,
                "passed" if not failures else "FAILED, not published: " + "; ".join(failures))
        _write_json(os.path.join(files.out_dir, EVALUATION_NAME.format(name=run.name, quant=q)), evaluations[q])
    return evaluations


def evaluation_base_of(run: Run, src: SourceRef, model: Model, files: Files | None = None) -> tuple[FileRef, dict]:
    """(the F32 model's log-probabilities over the evaluation text, the settings a record says it was
    evaluated on): the run's one F32 file of the baked model when a stage made it (the target mixes,
    the importance matrix: --target-kld's search measured against it), else the F32 release's file,
    else one staged for it."""
    p = run.params
    if model.f32 is None and files is not None and "F32" in files.ggufs:
        f32 = files.ggufs["F32"][0]
    else:
        f32 = f32_model(run, src, model)
    base = evaluation_base(f32, p.eval_text, run.eval_text_sha256, p.eval_ctx, p.eval_chunks, run.work_dir)
    return base, {"text": redact_uri(p.eval_text), "text_sha256": run.eval_text_sha256, "ctx": p.eval_ctx,
                  "max_chunks": p.eval_chunks, "base": "F32", "base_sha256": f32.sha256}


def publish(run: Run, src: SourceRef, model: Model, staged: dict[str, list[StagedTensor]], files: Files,
            validations: dict[str, dict], evaluations: dict[str, dict],
            imatrix: Importance | None) -> tuple[dict[str, dict], FileRef]:
    """One release per quant, ``<output>/<name>/<fingerprint>/<quant>/``: a new immutable version
    in it (with the importance matrix the run computed), then its pointer switched
    (so8t_core/publish/release.py); then latest.json names them. A quant that failed its quality
    gates is left out; the run then fails, naming it and what was published."""
    gated = {q: e["failures"] for q, e in evaluations.items() if not e["passed"]}
    quants = [q for q in run.quants if q not in gated]
    gates_failed = bool(gated)
    gated.update(run.unmet)  # --target-kld's release when no file met it: never assembled, not published
    what = " and ".join(w for w, any_ in (("quality gates failed", gates_failed), ("target not met", run.unmet))
                        if any_)
    hint = "see the evaluation in the run's log, or " + ("loosen --max-kld / --min-same-top" if gates_failed
                                                           else "raise --target-kld")
    analysis_path = os.path.join(files.out_dir, ANALYSIS_NAME)
    _write_json(analysis_path, model.analysis)
    common = {ANALYSIS_NAME: file_ref(analysis_path)}
    if files.sidecar is not None:
        common[SIDECAR_NAME.format(name=run.name)] = files.sidecar
    if imatrix is not None and imatrix.computed is not None:
        common[imatrix.name] = imatrix.computed.file
    releases, latest = {}, {}
    for q in quants:
        release_files = _release_files(run, src, model, staged[q], files, q, validations, evaluations, common,
                                       imatrix.summary(q) if imatrix else None)
        manifest = release_manifest(run.name, q, src.fingerprint, validations.get(q), staged[q],
                                    imatrix.summary(q) if imatrix else None, model.analysis.get("lora"),
                                    model.analysis["tokenizer"], evaluations.get(q),
                                    recipe=model.recipes[q].summary(RECIPE_NAME.format(name=run.name, quant=q))
                                    if q in model.recipes else None)
        release = release_uri(run.params.output, run.name, model.fingerprint, q)
        manifest_ref, uploaded = publish_release(release_files, release, manifest)
        version = manifest_ref.uri.rsplit("/", 1)[0]  # the immutable version current.json now names
        published = {n: FileRef(uri=storage.join(version, n), sha256=f.sha256, size=f.size)
                     for n, f in release_files.items()}
        releases[q] = {"uri": release, "version": version, "files": {n: f.model_dump() for n, f in published.items()},
                       "manifest": manifest_ref.model_dump(), "uploaded": uploaded}
        latest[q] = {"source_fingerprint": src.fingerprint,
                     "release": f"{model.fingerprint[:FINGERPRINT_CHARS]}/{q}/",
                     "gguf": os.path.basename(files.ggufs[q][0].uri)}
        run.say("published %s: %d of %d files uploaded to %s", q, uploaded, len(release_files), redact_uri(release))
    detail = "; ".join(f"{q}: {', '.join(fs)}" for q, fs in gated.items())
    failure = f"{what[:1].upper()}{what[1:]}: {detail}." if gated else None
    if not latest:  # every quant failed its gates: nothing to name
        artifacts.summary(run.name, **_facts(run, model, staged, validations), releases={}, failure=failure)
        raise ValidationError(run.source, f"{what} ({detail}); nothing was published", hint)
    latest_ref = publish_latest(run.params.output, run.name, latest, model.analysis, src)
    artifacts.summary(run.name, **_facts(run, model, staged, validations), releases=releases,
                      **({"failure": failure} if failure else {}))
    artifacts.release_links(run.name, releases)
    if gated:
        raise ValidationError(run.source, f"{what} ({detail}); not published: {', '.join(gated)}; "
                              f"published: {', '.join(releases)}", hint)
    return releases, latest_ref


def _release_files(run: Run, src: SourceRef, model: Model, staged: list[StagedTensor], files: Files, q: str,
                   validations: dict[str, dict], evaluations: dict[str, dict],
                   common: dict[str, FileRef], imatrix: dict | None) -> dict[str, FileRef]:
    """A release's files (name → ref): the GGUF(s), the analysis and sidecar, the stats, the
    validation report, the plots and the model card written from all of them."""
    qdir = os.path.join(files.out_dir, q)
    os.makedirs(qdir, exist_ok=True)
    out = {os.path.basename(r.uri): r for r in files.ggufs[q]}
    out.update(common)
    if q in model.recipes:  # llama-quantize --tensor-type-file: the same bytes from the F32 GGUF and imatrix
        recipe_name = RECIPE_NAME.format(name=run.name, quant=q)
        with open(os.path.join(qdir, recipe_name), "w", encoding="utf-8") as f:
            f.write(model.recipes[q].tensor_type_file)
        out[recipe_name] = file_ref(os.path.join(qdir, recipe_name))
    stats_name = STATS_NAME.format(name=run.name, quant=q)
    out[stats_name] = write_stats_parquet(q, staged, os.path.join(qdir, stats_name))
    if q in validations:
        report = VALIDATION_NAME.format(name=run.name, quant=q)
        out[report] = file_ref(os.path.join(files.out_dir, report))
    if q in evaluations:
        record = EVALUATION_NAME.format(name=run.name, quant=q)
        out[record] = file_ref(os.path.join(files.out_dir, record))
    plots = write_plots(run.name, q, staged, qdir)
    out.update(plots)
    artifacts.plots(run.name, q, {n: r.uri for n, r in plots.items()})
    out[MODEL_CARD_NAME] = write_model_card(
        os.path.join(qdir, MODEL_CARD_NAME), run.name, model.analysis, out,
        [os.path.basename(r.uri) for r in files.ggufs[q]],
        {q: validations[q]} if q in validations else {}, max_bake_error({q: staged}), model.fingerprint,
        CONVERTER, files.ggufs[q][0], [(n, PLOT_CAPTIONS[n.rsplit(".", 2)[-2]].format(quant=q)) for n in plots],
        {**mix_report(run, model, staged, q, imatrix), "evaluation": evaluations.get(q)}, src)
    return out


def mix_report(run: Run, model: Model, staged: list[StagedTensor], q: str, imatrix: dict | None) -> dict:
    """What the card says of the mix: tensors and bytes per type (counted as ``inspect`` counts a
    file's), the tensors whose rows did not fit the rules' type (and what they got: the analyze
    stage's), the llama.cpp whose bytes these are, the imatrix."""
    import llama_cpp

    rows = type_counts((s.ggml_type, s.n_elements, s.nbytes) for s in staged)
    report = {"quant": q, "types": {r["type"]: r for r in rows}, "llama_cpp": llama_cpp.__version__,
              "imatrix": imatrix, "fallbacks": []}
    if q in model.recipes:  # every type the recipe chose fits its tensor's rows: nothing falls back
        r = model.recipes[q]
        return {**report, "recipe": {"base_mix": r.base_mix, "target": r.target, "table": r.table,
                                     "file": RECIPE_NAME.format(name=run.name, quant=q),
                                     "predicted_kld": r.predicted_damage if r.class_gains else None,
                                     "search": r.search}}
    row_length = {p.gguf_name: int(p.shape[-1]) for p in model.plan}
    return {**report, "fallbacks": [{"tensor": n, "wanted": w.name, "got": g.name, "row_length": row_length[n]}
                                    for n, w, g in model.fallbacks.get(q, [])]}


# --- Small helpers ---------------------------------------------------------------------------

def demo_source() -> str:
    """The embedded demo checkpoint, built once into the cache."""
    path = os.path.join(default_cache_dir(), "demo", DEMO_NAME)
    if not os.path.exists(os.path.join(path, "config.json")):
        build_demo_checkpoint(path)
    return path


def max_bake_error(staged: dict[str, list[StagedTensor]]) -> float:
    """The largest bake error over the gated layers (the same in every quant: it is measured in float32)."""
    first = next(iter(staged.values()), [])
    return max((s.bake_error for s in first if s.bake_error is not None), default=0.0)


def _facts(run: Run, model: Model, staged: dict[str, list[StagedTensor]], validations: dict[str, dict]) -> dict:
    """What the run's summary artifact shows."""
    return dict(source=run.source, fingerprint=model.fingerprint, quants=run.quants, staged=staged,
                validations=validations, max_bake_error=max_bake_error(staged))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
