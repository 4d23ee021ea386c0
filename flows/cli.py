"""``so8t-gguf``: the command line. ``convert`` runs the Prefect flow in-process, against
``PREFECT_API_URL`` or, without one, a local Prefect API it keeps in the background
(``flows/local_api.py``); the other commands call the library directly.

Any problem with the input ends in one line on stderr and exit status 2; a traceback
means a bug in so8t-gguf. Ctrl-C and SIGTERM end it with one line and status 130 or 143
(``flows/interrupts.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from flows.params import add_cli_options
from so8t_core import __version__
from so8t_core.errors import So8tError, UnsupportedError


def _quiet_prefect(verbose: bool) -> None:
    # Before prefect is imported: no telemetry, and only warnings unless asked.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        # Failures reach the user as our one-line error; Prefect's copy (with its
        # traceback) stays in the run's logs on a server, and shows here with -v.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # --runner dask: the cluster's own logs


def quiet_libraries(verbose: bool) -> None:
    """Libraries' own notices stay off the console unless -v: transformers' advice on configs
    (e.g. on rope parameters, read when validating) and the S3 client's INFO lines ("Found
    credentials in ..."). Their errors still reach the user, as our one line. With -v they show,
    through a handler of their own: the inputs are checked (and the S3 client made) before
    Prefect configures logging."""
    from so8t_core.storage import WIRE_LOGGERS  # importing storage pins them at INFO (never DEBUG)

    if verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s", "%H:%M:%S"))
        for name in WIRE_LOGGERS:
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).propagate = False  # shown once, not again by Prefect's handler
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_convert(args: argparse.Namespace) -> int:
    _quiet_prefect(args.verbose)
    from flows import console

    if not (args.quiet or args.json):
        console.enable()
    console.stage("checking the inputs")  # at once: Prefect is not even imported yet
    if args.dry_run:
        return _dry_run(args)
    try:
        result = _convert(args)
    finally:
        console.disable()
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "analysis"})
    elif not args.quiet:
        from so8t_core.publish.report import render_conversion

        print(render_conversion(result))
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """Each mix's per-tensor types and size, from the checked inputs and the preflight's plan:
    nothing is quantized, fetched whole or written (llama-quantize's --dry-run)."""
    from flows import console
    from flows.params import check_inputs, check_mixes, from_cli
    from so8t_core.analysis import preflight
    from so8t_core.quantize.dry_run import dry_run_report, render_dry_run

    try:
        params = from_cli(args)
        if params.target_kld:  # before the inputs are read: nothing a dry run does could answer it
            from so8t_core.errors import UnsupportedError

            raise UnsupportedError("--dry-run", "not with --target-kld: its types are found by quantizing and "
                                   "evaluating candidate files, which a dry run does not", "run without --dry-run")
        inputs = check_inputs(params)
        source = params.source
        if not source:
            from flows.convert import demo_source

            source = demo_source()
        spec, plan = preflight(source, params.lora, params.allow_tokenizer_mismatch)
        types = check_mixes(params, inputs, spec, plan, source)
        mixes = {q: q for q in types}  # what each file is written as
        notes = {}
        if params.target_bpw or params.target_size:
            targets, notes = _dry_run_target(params, inputs, spec, plan, source)
            for label, (mix, target_types) in targets.items():
                mixes[label], types[label] = mix, target_types
        report = dry_run_report(plan, types, notes, _dry_run_file_sizes(params, inputs, plan, source, mixes, types))
    finally:
        console.disable()
    if args.json:
        _print_json(report)
    elif not args.quiet:
        print(render_dry_run(report))
    return 0


def _dry_run_file_sizes(params, inputs, plan: list, source: str, mixes: dict[str, str], types: dict) -> dict[str, int]:
    """Each file's size, from its types and its metadata (assemble.model.model_file_size); none where
    the run alone knows the metadata (a computed importance matrix's keys, a merged LoRA's) or cuts
    the model into several files."""
    import posixpath

    from so8t_core.assemble.model import model_file_size
    from so8t_core.constants import quant_type
    from so8t_core.quantize.imatrix import imatrix_kvs
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir

    if params.computes_imatrix or params.lora or params.split_max_bytes or params.split_max_tensors:
        return {}
    ckpt = Checkpoint.open(source, cache_dir=default_cache_dir())
    extra = imatrix_kvs(inputs.imatrix, posixpath.basename(params.imatrix.rstrip("/"))) if inputs.imatrix else ()
    return {q: model_file_size(ckpt, quant_type(mixes[q]), inputs.name,
                               [(p.gguf_name, tuple(p.shape), t) for p, t in zip(plan, qtypes, strict=True)], extra,
                               params.allow_tokenizer_mismatch)
            for q, qtypes in types.items()}


def _dry_run_target(params, inputs, spec, plan: list, source: str) -> tuple[dict, dict]:
    """The --target-bpw and --target-size releases' types, measured in memory (the size's budget from
    the F32 file's size, known from the plan and the metadata without writing it), with the class
    gains an earlier run measured (the run measures them with probes in llama.cpp when it evaluates;
    without them the types can differ, and the report says so). An importance matrix from
    --calibration is the run's computation, and a LoRA adapter the run's merge: refused."""
    import os

    from so8t_core.assemble.model import f32_file_size
    from so8t_core.errors import UnsupportedError
    from so8t_core.quantize.dry_run import target_dry_run
    from so8t_core.quantize.mixes import ModelShape
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.source.fingerprint import fingerprint
    from so8t_core.storage import default_cache_dir
    from so8t_core.validate.gains import gains_file, read_gains

    for given, why in ((params.computes_imatrix, "the importance matrix is computed from --calibration by the run"),
                       (params.lora, "the LoRA adapter is merged by the run")):
        if given:
            raise UnsupportedError("--dry-run", f"not with this target yet: {why}",
                                   "use --imatrix FILE (or none), or run without --dry-run")
    work_dir = params.work_dir or os.path.join(default_cache_dir(), "work")
    ckpt = Checkpoint.open(source, cache_dir=default_cache_dir())
    source_fingerprint = fingerprint(ckpt, cache_dir=work_dir).fingerprint
    gains = None
    if params.evaluates:
        gains = read_gains(gains_file(work_dir, source_fingerprint, inputs.imatrix.sha256 if inputs.imatrix else None,
                                      inputs.eval_text_sha256, params.eval_ctx))
    f32_size = 0
    if params.target_size:
        f32_size = f32_file_size(ckpt, inputs.name, [(p.gguf_name, p.shape) for p in plan],
                                 params.allow_tokenizer_mismatch)
    targets = target_dry_run(ckpt, plan, ModelShape.from_spec(spec), params.target_bpw, params.target_size_bytes,
                             f32_size, inputs.imatrix, os.path.join(work_dir, "damage"), gains)
    note = None
    if params.evaluates and gains is None:
        note = ("chosen by the measured damage alone: a run first measures each tensor class's KLD gain with probes "
                "in llama.cpp, which can change these types (a dry run after it uses them)")
    return targets, {label: note for label in targets} if note else {}


def _convert(args: argparse.Namespace) -> dict:
    from flows import console, local_api
    from flows.params import check_calibration, check_inputs, check_mixes, from_cli
    from so8t_core.analysis import preflight
    from so8t_core.storage import check_writable

    params = from_cli(args)
    inputs = check_inputs(params)  # bad input fails here in a second, before Prefect starts
    check_writable(params.output)  # and a destination that cannot be written, before anything is fetched
    if params.source:
        spec, plan = preflight(params.source, params.lora, params.allow_tokenizer_mismatch,
                               max_memory_gb=params.max_memory_gb or None)  # 0: no cap
        check_mixes(params, inputs, spec, plan, params.source)  # what llama-quantize refuses on this model
        check_calibration(params)  # malformed or too short calibration text
    # With no PREFECT_API_URL, the local API (flows/local_api.py): reused, or started in the
    # background while the flow's modules are imported.
    api = local_api.start_unless_configured()
    if api is not None and api.started:
        console.stage(f"starting a local Prefect API in the background (later runs reuse it; it stops after "
                      f"{local_api.idle_seconds() / 60:g} idle minutes)")
    from flows.runners import convert_with

    with local_api.using(api):
        return convert_with(params)  # a bad --dask-address fails here, before the run starts


def cmd_analyze(args: argparse.Namespace) -> int:
    from so8t_core.analysis import analyze, render_text
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir, redact_uri

    report = analyze(Checkpoint.open(args.source, cache_dir=default_cache_dir()))
    _print_json({"source": redact_uri(args.source), **report}) if args.json else \
        print(render_text(report, redact_uri(args.source)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from so8t_core.publish.retrieve import model_gguf
    from so8t_core.validate.inspection import inspect_gguf, render_inspection

    report = inspect_gguf(model_gguf(args.gguf, args.quant))
    _print_json(report) if args.json else print(render_inspection(report))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from so8t_core.publish.retrieve import local_gguf, model_gguf
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir
    from so8t_core.validate.checks import render_validation, validate_file

    lora = None
    if args.lora or args.lora_reference:
        from so8t_core.source.lora import load_adapter

        if not (args.lora and args.lora_reference):
            raise So8tError("--lora", "needs both the adapter GGUF (--lora) and the PEFT adapter it was made from "
                                      "(--lora-reference)", "pass both, or neither")
        lora = (local_gguf(args.lora), load_adapter(args.lora_reference))
    gguf = model_gguf(args.gguf, args.quant)
    report = validate_file(gguf, Checkpoint.open(args.reference, cache_dir=default_cache_dir()), lora=lora)
    _print_json(report) if args.json else print(render_validation(report, args.gguf, args.lora))
    return 0 if report["passed"] else 1


def cmd_lora_gguf(args: argparse.Namespace) -> int:
    from so8t_core.assemble.lora_gguf import render_lora_gguf, write_lora_gguf

    result = write_lora_gguf(args.adapter, args.base, args.output)
    _print_json(result) if args.json else print(render_lora_gguf(result))
    return 0


def cmd_onnx(args: argparse.Namespace) -> int:
    from so8t_core.analysis import preflight
    from so8t_core.export.onnx import export_onnx, local_output_path, render_export, require_onnx
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir

    require_onnx()
    local_output_path(args.output)
    preflight(args.source, args.lora, tokenizer=False)  # bad input fails here in a second, before any model is built
    adapter = None
    if args.lora:
        from so8t_core.source.lora import load_adapter

        adapter = load_adapter(args.lora)
    result = export_onnx(Checkpoint.open(args.source, cache_dir=default_cache_dir()), args.output, adapter)
    _print_json(result) if args.json else print(render_export(result))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from so8t_core.llama_runtime import LlamaCppModel
    from so8t_core.publish.retrieve import model_gguf

    if args.max_tokens < 1:
        raise UnsupportedError(f"--max-tokens {args.max_tokens}", "must be at least 1", "e.g. --max-tokens 48")
    with LlamaCppModel(model_gguf(args.gguf, args.quant), n_ctx=1024) as model:
        reply, cut = model.chat_reply(args.message, max_tokens=args.max_tokens)
    print(reply + (" […]" if cut else ""))
    if cut:
        print(f"so8t-gguf: the reply was cut at {args.max_tokens} tokens (--max-tokens)", file=sys.stderr)
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from so8t_core.publish.retrieve import local_gguf, model_gguf
    from so8t_core.validate.heads import render_heads, run_heads

    result = run_heads(model_gguf(args.gguf, args.quant), local_gguf(args.sidecar), args.text)
    _print_json(result) if args.json else print(render_heads(result))
    return 0


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from so8t_core.storage import new_folder
    from so8t_core.testing.demo import build_demo_checkpoint

    new_folder(args.dest, args.force)
    print(build_demo_checkpoint(args.dest))
    return 0


def cmd_fixture(args: argparse.Namespace) -> int:
    from so8t_core.storage import new_folder
    from so8t_core.testing.fixtures import FixtureSpec, build_fixture

    gated = tuple(int(x) for x in args.gated_layers.split(",")) if args.gated_layers else None
    spec = FixtureSpec(arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                       tokenizer_vocab=args.tokenizer_vocab, head_dim=args.head_dim, tied=args.tied,
                       so8t=not args.no_so8t, seed=args.seed, shards=args.shards, rotation=args.rotation,
                       position=args.position, gated_layers=gated, attention_bias=args.attention_bias,
                       longrope=args.longrope, tokenizer=args.tokenizer, experts=args.experts,
                       experts_used=args.experts_used, expert_intermediate=args.expert_intermediate)
    new_folder(args.dest, args.force)
    print(build_fixture(args.dest, spec))
    return 0


MODEL_HELP = ("a .gguf file, a release folder, or a model folder with latest.json (then --quant picks the "
              "release): a path, file:// or s3://")
QUANT_HELP = "with a model folder: which quant's latest release (any case; Q4_K means Q4_K_M, as in llama-quantize)"


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (a value that is not a number, a choice not offered, an unknown
    option) as one line like every other error, not the whole usage text first."""

    def error(self, message: str):
        self.exit(2, f"so8t-gguf: error: {message} (hint: see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="so8t-gguf", description="Convert SO8T checkpoints into validated GGUF files.")
    p.add_argument("--version", action="version", version=f"so8t-gguf {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint (default: the embedded demo) into GGUF files")
    add_cli_options(c)  # one option per ConvertParams field (flows/params.py)
    shown = c.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print a machine-readable summary (no progress)")
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary: the exit status "
                       "says how it went (errors still print one line)")
    c.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    c.add_argument("--dry-run", action="store_true", help="print each tensor's type and each file's size for "
                   "the mixes, without quantizing or writing anything (as llama-quantize --dry-run)")
    c.set_defaults(func=cmd_convert)

    a = sub.add_parser("analyze", help="report the structure of a checkpoint")
    a.add_argument("source")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_analyze)

    i = sub.add_parser("inspect", help="show a GGUF's metadata, tensors and SO8T provenance")
    i.add_argument("gguf", metavar="MODEL", help=MODEL_HELP + "; or a heads sidecar")
    i.add_argument("--quant", help=QUANT_HELP)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("validate", help="validate a GGUF against its source checkpoint in llama.cpp")
    v.add_argument("gguf", metavar="MODEL", help=MODEL_HELP)
    v.add_argument("--quant", help=QUANT_HELP)
    v.add_argument("--reference", required=True, metavar="SOURCE", help="the checkpoint it was converted from")
    v.add_argument("--lora", metavar="ADAPTER.gguf", help="run the model with this LoRA adapter GGUF (from lora-gguf)")
    v.add_argument("--lora-reference", metavar="ADAPTER_URI",
                   help="the PEFT adapter folder --lora was made from; the reference merges it")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)

    lg = sub.add_parser("lora-gguf", help="write a PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF for the "
                        "model converted from --base")
    lg.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder: path, file:// or s3://")
    lg.add_argument("--base", required=True, metavar="SOURCE", help="the checkpoint the base GGUF is converted from")
    lg.add_argument("--output", required=True, metavar="OUT.gguf", help="where to write the adapter GGUF (local)")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_lora_gguf)

    o = sub.add_parser("onnx", help="export the baked model to ONNX and check it with onnxruntime against PyTorch")
    o.add_argument("source", metavar="SOURCE", help="checkpoint folder: path, file:// or s3://")
    o.add_argument("--output", required=True, metavar="FILE.onnx", help="where to write the ONNX file (local path)")
    o.add_argument("--lora", metavar="ADAPTER_URI", help="merge a PEFT LoRA/rsLoRA adapter folder into the weights "
                   "before baking")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_onnx)

    ch = sub.add_parser("chat", help="generate a reply with llama.cpp (greedy)")
    ch.add_argument("gguf", metavar="MODEL", help=MODEL_HELP)
    ch.add_argument("message")
    ch.add_argument("--quant", help=QUANT_HELP)
    ch.add_argument("--max-tokens", type=int, default=48, help="stop after this many tokens (a cut reply ends "
                    "with […])")
    ch.set_defaults(func=cmd_chat)

    hd = sub.add_parser("heads", help="run the triality heads on a text (llama.cpp computes the hidden state)")
    hd.add_argument("gguf", metavar="MODEL", help=MODEL_HELP)
    hd.add_argument("sidecar", help="its <name>.so8t-heads.gguf: a path, file:// or s3://")
    hd.add_argument("--quant", help=QUANT_HELP)
    hd.add_argument("text")
    hd.add_argument("--json", action="store_true")
    hd.set_defaults(func=cmd_heads)

    force_help = "write into DEST even if it is not empty: what is in it is removed first"
    d = sub.add_parser("demo-checkpoint", help="write the embedded demo SO8T checkpoint")
    d.add_argument("dest", metavar="DEST", help="a new or empty folder: a path, file:// or s3://")
    d.add_argument("--force", action="store_true", help=force_help)
    d.set_defaults(func=cmd_demo_checkpoint)

    f = sub.add_parser("fixture", help="write a tiny random SO8T checkpoint (for tests)")
    f.add_argument("dest", metavar="DEST", help="a new or empty folder: a path, file:// or s3://")
    f.add_argument("--force", action="store_true", help=force_help)
    f.add_argument("--arch", default="llama",
                   choices=["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen2moe",
                            "qwen3moe"])
    f.add_argument("--layers", type=int, default=2)
    f.add_argument("--hidden", type=int, default=64)
    f.add_argument("--heads", type=int, default=4)
    f.add_argument("--kv-heads", type=int, default=2)
    f.add_argument("--intermediate", type=int, default=128)
    f.add_argument("--vocab", type=int, default=384, help="embedding rows (config vocab_size)")
    f.add_argument("--tokenizer-vocab", type=int, help="real tokens, fewer than --vocab for padding rows")
    f.add_argument("--head-dim", type=int, help="explicit head_dim (attention width != hidden)")
    f.add_argument("--tied", action="store_true")
    f.add_argument("--no-so8t", action="store_true")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--shards", type=int, default=1)
    f.add_argument("--rotation", default="cayley", choices=["cayley", "expm"])
    f.add_argument("--position", default="pre_o_proj", choices=["pre_o_proj", "post_o_proj"])
    f.add_argument("--gated-layers", help="comma-separated layer indices (default: all)")
    f.add_argument("--attention-bias", action="store_true")
    f.add_argument("--longrope", action="store_true", help="phi3: LongRoPE scaling with factor tensors")
    f.add_argument("--experts", type=int, default=4, help="mixtral/qwen2moe/qwen3moe: routed experts per layer")
    f.add_argument("--experts-used", type=int, default=2, help="experts each token is routed to")
    f.add_argument("--expert-intermediate", type=int, help="qwen MoE: one expert's FFN width (default --intermediate)")
    f.add_argument("--tokenizer", choices=["bpe", "spm"],
                   help="byte-level BPE or SentencePiece (Llama 2 / Phi-3 / Gemma style); "
                        "default: spm for phi3 and gemma, else bpe")
    f.set_defaults(func=cmd_fixture)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries(getattr(args, "verbose", False))
    from flows import interrupts

    restore_signals = interrupts.install()  # Ctrl-C and SIGTERM: one line, 130/143, within 2 s
    try:
        return args.func(args)
    except So8tError as exc:
        print(f"so8t-gguf: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`so8t-gguf inspect … | head`): stop quietly, as a shell tool
        # killed by SIGPIPE would, and keep Python's exit-time flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BaseException as exc:
        signum = interrupts.signal_of(exc)
        if signum is None:
            raise
        interrupts.leave(signum)
    finally:
        restore_signals()


if __name__ == "__main__":
    sys.exit(main())
