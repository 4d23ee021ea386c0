"""The parameters of a conversion, defined once: the flow takes them, the CLI's options and the
Prefect UI's form are made from them.

``ConvertParams`` is the one list. Prefect turns it into a JSON schema
(``parameter_openapi_schema``), which the UI renders as the deployment's "Custom run" form and
the server checks before a run is created; enums become drop-downs, so the quant mixes and
engines are chosen, not typed, and the choices come from the library's own tables. The CLI
builds ``so8t-gguf convert``'s options from the same fields (:func:`add_cli_options`): each
field's description is its help, and a :class:`Cli` marker says how it is spelled there when
the plain ``--field-name`` will not do. ``tests/test_params.py`` checks the three agree.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from so8t_core import storage
from so8t_core.constants import QUANT_TYPES, SUPPORTED_TENSOR_TYPES, ggml_type, quant_name, quant_type
from so8t_core.errors import So8tError, UnsupportedError
from so8t_core.quantize.calibration import DEFAULT_CTX, MIN_ROWS
from so8t_core.quantize.engines import ENGINES
from so8t_core.storage import NAME_PATTERN, NAME_RULE, redact_uri, refuse_credentials
from so8t_core.validate.perplexity import (
    BUILTIN_EVAL_TEXT,
    DEFAULT_EVAL_CHUNKS,
    DEFAULT_EVAL_CTX,
    DEFAULT_MAX_KLD,
    DEFAULT_MIN_SAME_TOP,
)

RUNNERS = ("threads", "dask")
# A URI with credentials in it (scheme://user:secret@host/...). The form and the Prefect server
# check the schema before a run is created, so such a value never reaches a run's stored
# parameters; in Python the fields' validator refuses it (pydantic's own patterns cannot look ahead).
NO_CREDENTIALS_PATTERN = r"^(?![A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@)"
URI_FIELDS = ("source", "output", "work_dir", "imatrix", "lora", "dask_address", "eval_text")
URI_LIST_FIELDS = ("calibration",)  # lists of URIs
SIZE_PATTERN = r"^\s*[0-9]+\s*[KkMmGg]?\s*$"
ADDRESS_PATTERN = r"^\s*[a-z]+://\S+\s*$"
# The evaluation's chunk count when none is given. SO8T_EVAL_CHUNKS changes it: the test suite sets 0
# (no evaluation) so that its many conversions of tiny fixtures do not each pay for one; the tests of
# the evaluation ask for it (docs/cli.md).
EVAL_CHUNKS = int(os.environ.get("SO8T_EVAL_CHUNKS", DEFAULT_EVAL_CHUNKS))
# What a value that does not match a field's pattern is told.
PATTERN_RULES = {
    "name": NAME_RULE,
    "split_max_size": "not a size: a number of bytes, or with K, M or G (e.g. 2G)",
    "target_size": "not a size: a number of bytes, or with K, M or G (e.g. 700M)",
    "dask_address": "not an address: e.g. tcp://scheduler-host:8786",
}

# llama-quantize's mixes (what --quant accepts), in llama.cpp's order.
QuantMix = Enum("QuantMix", {name: name for name in QUANT_TYPES}, type=str, module=__name__)
QuantMix.__doc__ = "A llama-quantize mix: the default type of the file and the rules that pick each tensor's type."
# Quantization engines: all write the same bytes (auto: torch on a GPU, else simd).
Engine = Enum("Engine", {name: name for name in ENGINES}, type=str, module=__name__)
Engine.__doc__ = "Quantization engine; every engine writes the same bytes (auto: torch on a GPU, else simd)."
# Tensor types an override may name (--output-tensor-type, --token-embedding-type), or none.
TensorType = Enum("TensorType", {"default": "default", **{t.name: t.name for t in SUPPORTED_TENSOR_TYPES}},
                  type=str, module=__name__)
TensorType.__doc__ = "A GGML tensor type so8t-gguf writes, or default: the mix's rules decide."
# Where the quantize tasks run (flows/runners.py).
Runner = Enum("Runner", {name: name for name in RUNNERS}, type=str, module=__name__)
Runner.__doc__ = "Where the per-tensor quantize tasks run: a thread pool, or a Dask cluster; same bytes."


@dataclass(frozen=True)
class Cli:
    """How a field is spelled on ``so8t-gguf convert``'s command line, where ``--field-name``
    will not do: another ``flag``, a ``positional`` argument, a list given with ``append``
    (the flag repeated) rather than several values after one flag."""

    flag: str | None = None
    metavar: str | None = None
    positional: bool = False
    append: bool = False
    help: str | None = None  # where the field's description would read wrong (a --no-… switch)


def upper_names(value: Any) -> Any:
    """Quant and type names are case-insensitive, as on the command line (q4_k_m = Q4_K_M)."""
    if isinstance(value, str):
        return value.upper()
    if isinstance(value, list):
        return [v.upper() if isinstance(v, str) else v for v in value]
    return value


def quant_names(value: Any) -> Any:
    """Quant mixes: any case, and llama-quantize's aliases (Q4_K = Q4_K_M), wherever they are given."""
    if isinstance(value, str):
        return quant_name(value)
    if isinstance(value, list):
        return [quant_name(v) if isinstance(v, str) else v for v in value]
    return value


def or_empty(pattern: str) -> str:
    """A text field's pattern that also takes the empty string: text fields are plain strings,
    empty when not given (a form field left alone), never None (a field the form would show as
    a type toggle)."""
    return f"^$|{pattern}"


class ConvertParams(BaseModel):
    """One conversion: a checkpoint in, one validated release per quant mix out."""

    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, Cli(positional=True, metavar="SOURCE")] = Field(
        "", title="Source checkpoint", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="Hugging Face checkpoint folder: a path, file:// or s3:// URL (empty: the embedded demo).")
    output: Annotated[str, Cli(metavar="DEST")] = Field(
        "./artifacts", title="Destination", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="Where releases are published, as DEST/NAME/FINGERPRINT/QUANT/ (default ./artifacts).")
    quants: Annotated[list[QuantMix], Cli(flag="--quant", metavar="TYPE")] = Field(
        [QuantMix.Q8_0], min_length=1, title="Quant mixes",
        description="llama-quantize mixes, one release each: " + " ".join(QUANT_TYPES) + " (default Q8_0).")
    target_bpw: Annotated[float, Cli(metavar="B")] = Field(
        0.0, ge=0, le=32, title="Target mix: bits per weight",
        description="Add a release AUTO-B: every 2-D weight gets the type that leaves the least measured damage "
                    "with the whole file at most B bits per weight (docs/cli.md; 0: none).")
    target_size: Annotated[str, Cli(metavar="SIZE")] = Field(
        "", pattern=or_empty(SIZE_PATTERN), title="Target mix: file size",
        description="Add a release AUTO-B whose file is at most SIZE, e.g. 700M (decimal units; B: the bits per "
                    "weight that makes; empty: none).")
    target_kld: Annotated[float, Cli(metavar="K")] = Field(
        0.0, ge=0, title="Target mix: mean KLD",
        description="Add a release AUTO-KLD-K: the smallest target mix whose mean KL divergence from the F32 model, "
                    "measured on the evaluation text, is at most K nats (a search over budgets, each candidate "
                    "quantized and evaluated; docs/cli.md; 0: none).")
    run_validation: Annotated[bool, Cli(flag="--no-validate", help="skip validation and its gates: the files are "
                                                                 "published unchecked")] = Field(
        True, title="Validate before publishing",
        description="Validate every file (read-back, tensor errors, llama.cpp logits, tokenizer) before anything "
                    "is published (off: the files are published unchecked).")
    name: Annotated[str, Cli(metavar="NAME")] = Field(
        "", pattern=or_empty(NAME_PATTERN), title="Model name",
        description="The release folder and the files' base name (empty: the source folder's name).")
    engine: Engine = Field(Engine.auto, title="Quantization engine",
                           description="auto: torch on a GPU, else simd; all write the same bytes.")
    max_memory_gb: Annotated[float, Cli(flag="--max-memory", metavar="GB")] = Field(
        0.0, ge=0, title="Memory cap (GB)",
        description="Cap peak memory by limiting how many tensors are in flight (0: no cap).")
    work_dir: Annotated[str, Cli(metavar="DIR")] = Field(
        "", title="Work folder", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="Staging folder (empty: ~/.cache/so8t-gguf/work); with a Dask scheduler, a path every worker "
                    "sees at the same place (e.g. NFS).")
    split_max_size: Annotated[str, Cli(metavar="SIZE")] = Field(
        "", pattern=or_empty(SIZE_PATTERN), title="Split: file size",
        description="Split each GGUF into files of at most this size, e.g. 2G (empty: no limit).")
    split_max_tensors: Annotated[int, Cli(metavar="N")] = Field(
        0, ge=0, title="Split: tensors per file",
        description="Split each GGUF into files of at most this many tensors (0: no limit).")
    tensor_types: Annotated[list[str], Cli(flag="--tensor-type", metavar="REGEX=TYPE", append=True)] = Field(
        [], title="Tensor type overrides",
        description="Tensors whose name matches REGEX get TYPE (first match wins), as in llama-quantize.")
    output_tensor_type: Annotated[TensorType, Cli(metavar="TYPE")] = Field(
        TensorType.default, title="Output tensor type", description="Type of output.weight (default: the mix's rules).")
    token_embedding_type: Annotated[TensorType, Cli(metavar="TYPE")] = Field(
        TensorType.default, title="Token embedding type",
        description="Type of token_embd.weight (default: the mix's rules).")
    pure: bool = Field(False, title="Pure (no mix rules)",
                       description="Every 2-D weight gets the mix's default type.")
    allow_tokenizer_mismatch: bool = Field(
        False, title="Allow tokenizer mismatch",
        description="Convert even when no llama.cpp pre-tokenizer reproduces the Hugging Face tokenizer's ids; "
                    "the model card and the manifest then say so.")
    imatrix: Annotated[str, Cli(metavar="FILE")] = Field(
        "", title="Importance matrix", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="A llama-imatrix GGUF or legacy .dat file: a path, file:// or s3:// URL (empty: none; takes "
                    "precedence over --calibration).")
    calibration: Annotated[list[str], Cli(metavar="URI")] = Field(
        [], title="Calibration text",
        json_schema_extra={"items": {"type": "string", "pattern": NO_CREDENTIALS_PATTERN}},
        description="Text to compute the run's importance matrix on, in llama.cpp as llama-imatrix does: plain "
                    "text, JSONL with a 'text' field, or JSONL chat records ('messages', rendered with the "
                    "checkpoint's chat template); any fsspec URL, or the word builtin for the text so8t-gguf ships "
                    "(prose, code, dialogue, Japanese and nine other languages). Every mix of the run is quantized "
                    "with it, and each release holds it as NAME.imatrix.gguf.")
    calibration_ctx: Annotated[int, Cli(metavar="N")] = Field(
        DEFAULT_CTX, ge=MIN_ROWS, title="Calibration context",
        description=f"Tokens per calibration chunk (llama-imatrix's -c; default {DEFAULT_CTX}).")
    calibration_chunks: Annotated[int, Cli(metavar="N")] = Field(
        0, ge=0, title="Calibration chunks",
        description="Compute on at most this many chunks of the calibration text (llama-imatrix's --chunks; "
                    "0: all).")
    eval_text: Annotated[str, Cli(metavar="URI")] = Field(
        BUILTIN_EVAL_TEXT, title="Evaluation text", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="Plain UTF-8 text every quant is evaluated on against the F32 model, as llama-perplexity "
                    "--kl-divergence does: any fsspec URL, or the word builtin for the text so8t-gguf ships "
                    "(docs/validation.md; none of it is calibration or validation text).")
    eval_ctx: Annotated[int, Cli(metavar="N")] = Field(
        DEFAULT_EVAL_CTX, ge=8, title="Evaluation context",
        description=f"Tokens per evaluation chunk (llama-perplexity's -c; default {DEFAULT_EVAL_CTX}); the "
                    "second half of each chunk is scored.")
    eval_chunks: Annotated[int, Cli(metavar="N")] = Field(
        EVAL_CHUNKS, ge=0, title="Evaluation chunks",
        description=f"Evaluate on the first N chunks of the evaluation text (default {EVAL_CHUNKS}: "
                    f"{EVAL_CHUNKS * DEFAULT_EVAL_CTX} tokens at the default context; a large N takes the whole "
                    "text; 0: no evaluation and no quality gates).")
    max_kld: Annotated[float, Cli(metavar="NATS")] = Field(
        DEFAULT_MAX_KLD, ge=0, title="Quality gate: mean KLD",
        description=f"A quant whose mean KL divergence from the F32 model on the evaluation text is above this "
                    f"is not published (default {DEFAULT_MAX_KLD:g} nats).")
    min_same_top: Annotated[float, Cli(metavar="FRACTION")] = Field(
        DEFAULT_MIN_SAME_TOP, ge=0, le=1, title="Quality gate: same top token",
        description=f"A quant whose top token agrees with the F32 model's on fewer than this fraction of the "
                    f"scored tokens is not published (default {DEFAULT_MIN_SAME_TOP:g}).")
    lora: Annotated[str, Cli(metavar="ADAPTER_URI")] = Field(
        "", title="LoRA adapter", json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN},
        description="PEFT LoRA/rsLoRA adapter folder merged into the weights before baking (empty: none).")
    runner: Runner = Field(Runner.threads, title="Task runner",
                           description="Where the per-tensor quantize tasks run: a thread pool, or Dask (a local "
                                       "multi-process cluster, or the one at the scheduler address).")
    dask_address: Annotated[str, Cli(metavar="tcp://HOST:PORT")] = Field(
        "", pattern=or_empty(ADDRESS_PATTERN), title="Dask scheduler address",
        json_schema_extra={"pattern": NO_CREDENTIALS_PATTERN + f"(?:{or_empty(ADDRESS_PATTERN)})"},
        description="With runner dask: an existing scheduler whose workers have this project and see the source "
                    "and the work folder at the same paths, docs/scaling.md (empty: a local cluster).")

    @field_validator("quants", mode="before")
    @classmethod
    def _quant_names(cls, value: Any) -> Any:
        return quant_names(value)

    @field_validator("output_tensor_type", "token_embedding_type", mode="before")
    @classmethod
    def _type_name(cls, value: Any) -> Any:
        if value is None or isinstance(value, str) and value.strip().lower() in ("", TensorType.default.value):
            return TensorType.default
        return upper_names(value)

    @field_validator("source", "name", "work_dir", "split_max_size", "target_size", "imatrix", "lora", "dask_address",
                     mode="before")
    @classmethod
    def _blank_is_empty(cls, value: Any) -> Any:
        return "" if value is None or isinstance(value, str) and not value.strip() else value  # a cleared field

    @field_validator("eval_text", mode="before")
    @classmethod
    def _blank_is_builtin(cls, value: Any) -> Any:
        return BUILTIN_EVAL_TEXT if value is None or isinstance(value, str) and not value.strip() else value

    @field_validator("max_memory_gb", "target_bpw", "target_kld", mode="before")
    @classmethod
    def _no_cap(cls, value: Any) -> Any:
        return 0 if value is None else value

    @field_validator(*URI_FIELDS, *URI_LIST_FIELDS)
    @classmethod
    def _no_credentials(cls, value: Any, info) -> Any:
        """Before any run exists: a flow run's parameters, task run names and events are stored."""
        for uri in value if isinstance(value, list) else [value]:
            if isinstance(uri, str) and "://" in uri:
                try:
                    refuse_credentials(uri)
                except So8tError as exc:
                    spelling = cli_spelling(info.field_name)
                    raise UnsupportedError(f"{spelling.flag or spelling.metavar} {redact_uri(uri)}", exc.problem,
                                           exc.hint) from None
        return value

    @property
    def computes_imatrix(self) -> bool:
        """Whether the run computes its importance matrix (calibration text, and no --imatrix)."""
        return bool(self.calibration) and not self.imatrix

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates every quant on the evaluation text (and applies the quality gates)."""
        return self.eval_chunks > 0

    @property
    def quant_names(self) -> list[str]:
        return list(dict.fromkeys(q.value for q in self.quants))

    @property
    def target_size_bytes(self) -> int:
        from so8t_core.gguf_file import parse_split_size

        return parse_split_size(self.target_size) if self.target_size else 0

    @property
    def split_max_bytes(self) -> int:
        from so8t_core.gguf_file import parse_split_size

        return parse_split_size(self.split_max_size) if self.split_max_size else 0


# --- The inputs, checked ----------------------------------------------------------------------

@dataclass(frozen=True)
class CheckedInputs:
    """What ``check_inputs`` resolved: the release name, the quant names, llama-quantize's
    overrides, the engine, and the importance matrix and LoRA adapter, read and checked."""

    name: str
    quants: list[str]
    options: Any  # so8t_core.quantize.mixes.MixOptions
    engine: str
    imatrix: Any  # so8t_core.quantize.imatrix.Imatrix | None
    adapter: Any  # so8t_core.source.lora.LoraAdapter | None
    eval_text_sha256: str | None = None  # of the evaluation text's bytes, read once here; None: no evaluation


def default_name(source: str) -> str:
    """A release's name when none is given: the source folder's."""
    return posixpath.basename(source.rstrip("/").replace("\\", "/")) or "model"


def release_name(params: ConvertParams) -> str:
    """The name the releases are published under (``<output>/<name>/…``, ``<name>-<quant>.gguf``):
    ``name``, else the source folder's name (the demo's without a source), held to the one name
    rule (storage.check_name) whichever it is: it becomes folders and files."""
    if params.name:
        return storage.check_name(params.name, "--name")
    if not params.source:
        from so8t_core.testing.demo import DEMO_NAME

        return DEMO_NAME
    folder = default_name(params.source)
    return storage.check_name(folder, "the source folder's name",
                              "releases are named after the source folder: pass --name, e.g. --name my-model")


def check_destination_name(output: str, name: str) -> None:
    """Refuse a name that differs only in letter case from a model already under ``output``: on
    case-insensitive storage (macOS, Windows, many shares) the two are one folder, and their
    releases and latest.json would overwrite each other."""
    try:
        existing = storage.list_names(output)
    except (OSError, So8tError):
        return  # not listable (yet): publishing says what is wrong with the destination
    clash = storage.same_but_case(existing, name)
    if clash is not None:
        raise UnsupportedError(f"--name {name}", f"{redact_uri(output)} already holds the model {clash}, a name that "
                               "differs only in letter case (one folder on case-insensitive storage)",
                               f"use --name {clash}, or another name")


def check_inputs(params: ConvertParams) -> CheckedInputs:
    """Refuse bad inputs before any work: the release name, quant names, overrides, engine,
    imatrix, adapter (the CLI calls this before Prefect starts; the flow again, since Python calls
    it directly). An importance matrix and an adapter are read and checked once here; tasks get
    their URI and sha256. (Credentials in a URI are refused when the parameters are made.)"""
    from so8t_core.quantize.engines import resolve_engine
    from so8t_core.quantize.imatrix import load_imatrix
    from so8t_core.quantize.mixes import MixOptions, parse_tensor_types
    from so8t_core.source.lora import load_adapter

    def tensor_type(value: TensorType, flag: str):
        return None if value is TensorType.default else ggml_type(value.value, flag)

    name = release_name(params)
    check_destination_name(params.output, name)
    if params.target_kld and not params.evaluates:
        raise UnsupportedError(f"--target-kld {params.target_kld:g}", "it is measured by the evaluation, which "
                               "--eval-chunks 0 turns off", "drop --eval-chunks 0 (or pass --eval-chunks N)")
    quants = [quant_type(q).name for q in params.quant_names]
    im = load_imatrix(params.imatrix) if params.imatrix else None
    options = MixOptions(
        tensor_types=parse_tensor_types(params.tensor_types), pure=params.pure,
        has_imatrix=im is not None or params.computes_imatrix,
        output_tensor_type=tensor_type(params.output_tensor_type, "--output-tensor-type"),
        token_embedding_type=tensor_type(params.token_embedding_type, "--token-embedding-type"))
    eval_sha = None
    if params.evaluates:
        from so8t_core.validate.perplexity import read_eval_text

        eval_sha = storage.sha256_bytes(read_eval_text(params.eval_text).encode("utf-8"))
    return CheckedInputs(name=name, quants=quants, options=options, engine=resolve_engine(params.engine.value),
                         imatrix=im, adapter=load_adapter(params.lora) if params.lora else None,
                         eval_text_sha256=eval_sha)


def imatrix_coverage(params: ConvertParams, imatrix: Any, plan: list) -> set[str] | None:
    """The weights the run's importance matrix has entries for: --imatrix's, or those the one
    computed on --calibration text will have (every weight of the blocks); None without one."""
    from so8t_core.quantize.calibration import measured_weights

    if imatrix is not None:
        return set(imatrix.entries)
    if params.computes_imatrix:
        return measured_weights([(p.gguf_name, p.shape) for p in plan])
    return None


def check_mixes(params: ConvertParams, inputs: CheckedInputs, spec: Any, plan: list, source: str) -> dict:
    """Each mix's tensor types on this model (``spec``, ``plan``: ``analysis.preflight``'s of
    ``source``), refused where llama-quantize refuses them: a very-low-bit mix without an importance
    matrix, a type with no fallback for the model's rows (the CLI calls this before Prefect starts;
    the flow's analyze stage computes the same types again). Returns them (quant → each tensor's type)."""
    from so8t_core.quantize.mixes import ModelShape, mix_types

    check_targets(params, plan, source, inputs.name)
    return mix_types(plan, inputs.quants, ModelShape.from_spec(spec), inputs.options,
              imatrix_coverage(params, inputs.imatrix, plan))


def check_targets(params: ConvertParams, plan: list, source: str, name: str) -> None:
    """Refuse a target mix no choice of types can meet on this model (every weight at its smallest
    candidate type is still over it), from the plan's shapes, and for --target-size the file's
    metadata (the F32 file's size from the checkpoint ``source``'s headers and tokenizer, and the
    release ``name``): the CLI calls this before Prefect starts, the flow's analyze stage again."""
    import math

    from so8t_core.constants import bits_per_weight
    from so8t_core.quantize.target import file_overhead, smallest_bytes

    shapes = [(p.gguf_name, p.shape) for p in plan]
    least = smallest_bytes(shapes)
    n_weights = sum(math.prod(s) for _, s in shapes)
    if params.target_bpw:
        floor = bits_per_weight(least, n_weights)
        if floor > params.target_bpw:
            raise UnsupportedError(f"--target-bpw {params.target_bpw:g}", f"the smallest types give this model "
                                   f"{floor:.2f} bits per weight",
                                   f"use --target-bpw {math.ceil(floor * 100) / 100:.2f} or more")
    if params.target_size:
        from so8t_core.assemble.model import f32_file_size
        from so8t_core.source.checkpoint import Checkpoint
        from so8t_core.storage import default_cache_dir

        f32 = f32_file_size(Checkpoint.open(source, cache_dir=default_cache_dir()), name, shapes,
                            params.allow_tokenizer_mismatch)
        least_file = least + file_overhead(n_weights, len(shapes), f32)
        if least_file > params.target_size_bytes:
            raise UnsupportedError(f"--target-size {params.target_size.strip()}", f"the smallest types give this "
                                   f"model a file of {least_file:,} bytes",
                                   f"use --target-size {math.ceil(least_file / 1000)}K or more")


def check_calibration(params: ConvertParams) -> None:
    """The calibration text read, rendered and tokenized as the run will, and refused when it is
    malformed or shorter than llama-imatrix's two chunks (the CLI calls this before Prefect starts;
    the flow's importance stage again, before the model is run)."""
    if not params.computes_imatrix or not params.source:
        return
    from so8t_core.quantize.calibration import calibration_tokens, check_enough_tokens
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir

    ckpt = Checkpoint.open(params.source, cache_dir=default_cache_dir())
    _, tokens = calibration_tokens(ckpt, params.calibration, params.allow_tokenizer_mismatch)
    check_enough_tokens(len(tokens), params.calibration_ctx, "--calibration " + " ".join(params.calibration))


# --- The command line, made from the fields ------------------------------------------------

def cli_spelling(field: str) -> Cli:
    """The Cli marker of a field (a plain ``--field-name`` when it has none)."""
    info = ConvertParams.model_fields[field]
    marker = next((m for m in info.metadata if isinstance(m, Cli)), Cli())
    if marker.flag is None and not marker.positional:
        marker = Cli(flag="--" + field.replace("_", "-"), metavar=marker.metavar, append=marker.append,
                     help=marker.help)
    return marker


def _choices(annotation: Any) -> list[str] | None:
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, Enum) and arg is not QuantMix and arg is not TensorType:
            return [e.value for e in arg]  # quant and tensor type names are checked case-insensitively later
    return None


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """Add one option (or the positional) per ConvertParams field, with the field's description as help."""
    for field, info in ConvertParams.model_fields.items():
        spelling = cli_spelling(field)
        kwargs: dict[str, Any] = {"help": spelling.help or info.description}
        if spelling.metavar:
            kwargs["metavar"] = spelling.metavar
        if info.annotation is bool:
            # A switch: --pure turns on what is off; --no-validate turns off what is on.
            kwargs.update(action="store_false" if info.default else "store_true", dest=field)
            kwargs.pop("metavar", None)
        elif get_origin(info.annotation) is list:
            kwargs.update(action="append" if spelling.append else "extend", dest=field, default=None)
            if not spelling.append:
                kwargs["nargs"] = "+"
        else:
            scalar = next((a for a in (info.annotation, *get_args(info.annotation)) if a in (int, float)), str)
            kwargs.update(type=scalar, default=None, choices=_choices(info.annotation))
            if not spelling.positional:
                kwargs["dest"] = field
        if spelling.positional:
            parser.add_argument(field, nargs="?", **kwargs)
        else:
            parser.add_argument(spelling.flag, **kwargs)


def _looks_like_a_path(word: str) -> bool:
    return "/" in word or "\\" in word or word.startswith((".", "~")) or os.path.exists(word)


def from_cli(args: argparse.Namespace) -> ConvertParams:
    """The ConvertParams of a parsed command line; a value the fields refuse is a one-line error
    naming the option."""
    given = {f: getattr(args, f) for f in ConvertParams.model_fields if getattr(args, f, None) is not None}
    quants = given.get("quants", [])
    for q in quants:
        if "source" not in given and q == quants[-1] and quant_name(q) not in QUANT_TYPES and _looks_like_a_path(q):
            # `convert --quant Q8_0 path/to/model`: --quant took the source as one more mix.
            raise UnsupportedError(f"--quant {q}", "not a quant mix; --quant takes every word after it, so SOURCE "
                                   "was read as one", f"put SOURCE before --quant: so8t-gguf convert {q} --quant "
                                   + (" ".join(quants[:-1]) or "Q8_0"))
        quant_type(q)  # the library's messages say more than the enum's ("Q8_K is not a file type ...")
    if given.get("target_kld") == 0:  # on the form and in Python 0 is "none"; asked for here, it is a mistake
        raise UnsupportedError("--target-kld 0", "must be greater than 0: a mean KLD in nats, e.g. 0.05",
                               "see so8t-gguf convert --help")
    for field in ("output_tensor_type", "token_embedding_type"):
        if given.get(field) and given[field].lower() != TensorType.default.value:
            ggml_type(given[field], cli_spelling(field).flag)
    try:
        return ConvertParams(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        spelling = cli_spelling(field) if field in ConvertParams.model_fields else Cli()
        where = spelling.metavar if spelling.positional else spelling.flag or field
        value = given.get(field)
        shown = " ".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else redact_uri(value) if isinstance(value, str) else value
        problem = PATTERN_RULES.get(field) if err["type"] == "string_pattern_mismatch" else None
        problem = problem or err["msg"][:1].lower() + err["msg"][1:]
        raise UnsupportedError(f"{where} {shown}".strip(), problem, "see so8t-gguf convert --help") from None
