"""``so8t-gguf``: the command line. ``convert`` runs the Prefect flow in-process (no server
needed); the other commands call the library directly.

Any problem with the input ends in one line on stderr and exit status 2; a traceback
means a bug in so8t-gguf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from so8t_core import __version__
from so8t_core.errors import So8tError


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


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_convert(args: argparse.Namespace) -> int:
    # The temporary local API Prefect starts for the run can need more than Prefect's default 20 s
    # on a busy 2-core machine (Colab's free tier, CI); failing the conversion then would be spurious.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    _quiet_prefect(args.verbose)
    from so8t_core.analysis import preflight
    from so8t_core.constants import ggml_type, quant_type
    from so8t_core.gguf_file import parse_split_size
    from so8t_core.quantize.engines import resolve_engine
    from so8t_core.quantize.imatrix import load_imatrix
    from so8t_core.quantize.mixes import parse_tensor_types

    for q in args.quant or []:
        quant_type(q)
    split_bytes = parse_split_size(args.split_max_size) if args.split_max_size else 0
    parse_tensor_types(args.tensor_type or [])
    for flag, value in (("--output-tensor-type", args.output_tensor_type),
                        ("--token-embedding-type", args.token_embedding_type)):
        if value:
            ggml_type(value, flag)
    resolve_engine(args.engine)
    if args.imatrix:
        load_imatrix(args.imatrix)
    if args.lora and not args.source:
        from so8t_core.source.lora import load_adapter

        load_adapter(args.lora)
    if args.split_max_tensors < 0:
        raise So8tError("--split-max-tensors", "must be 0 (no limit) or positive", "")
    if args.source:
        preflight(args.source, args.lora)  # bad input fails here in a second, before the pipeline starts
    from flows import console
    from flows.runners import convert_with

    if not (args.quiet or args.json):
        console.enable()
    try:
        # A bad --dask-address fails here, before the run starts.
        result = convert_with(args.runner, args.dask_address, source=args.source, output=args.output,
                              quants=args.quant or ["Q8_0"], run_validation=not args.no_validate, name=args.name,
                              max_memory_gb=args.max_memory, work_dir=args.work_dir,
                              split_max_tensors=args.split_max_tensors, split_max_size=split_bytes,
                              tensor_types=args.tensor_type or [], output_tensor_type=args.output_tensor_type,
                              token_embedding_type=args.token_embedding_type, pure=args.pure, engine=args.engine,
                              imatrix=args.imatrix, lora=args.lora)
    finally:
        console.disable()
    if args.quiet:
        return 0
    if args.json:
        _print_json({k: v for k, v in result.items() if k != "analysis"})
        return 0
    print(f"converted {result['source']}")
    print(f"  fingerprint  {result['fingerprint']}")
    print(f"  bake error   {result['max_bake_error']:.2e} (max over gated layers)")
    if result.get("lora"):
        lo = result["lora"]
        print(f"  LoRA         {lo['uri']}: r={lo['r']}, alpha={lo['lora_alpha']:g}, scale {lo['scale']:.4g} "
              f"({lo['scaling']}), merged into {len(lo['merged_tensors'])} tensors "
              f"({', '.join(lo['effective_target_modules'])})")
    for quant, v in result["validation"].items():
        f = v.get("llama_cpp", {})
        print(f"  validated    {quant}: mean KLD {f.get('mean_kld', float('nan')):.3g}, "
              f"top-1 {100 * f.get('top1_agreement', float('nan')):.2f}% over {f.get('n_tokens')} tokens, "
              f"{'passed' if v['passed'] else 'FAILED'}")
    for quant, release in result["releases"].items():
        state = "already published, nothing uploaded" if release["uploaded"] == 0 else "published"
        print(f"{quant}: {release['uri']} ({state})")
        for name, ref in sorted(release["files"].items()):
            print(f"  {name:<48} {ref['size']:>12,} bytes")
        print(f"  {'manifest.json':<48} {release['manifest']['size']:>12,} bytes")
    print(f"latest: {result['latest']['uri']}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from so8t_core.analysis import analyze, render_text
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir

    report = analyze(Checkpoint.open(args.source, cache_dir=default_cache_dir()))
    _print_json(report) if args.json else print(render_text(report))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from so8t_core.validate.inspection import inspect_gguf, render_inspection

    report = inspect_gguf(args.gguf)
    _print_json(report) if args.json else print(render_inspection(report))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir
    from so8t_core.validate.checks import validate_file

    lora = None
    if args.lora or args.lora_reference:
        from so8t_core.source.lora import load_adapter

        if not (args.lora and args.lora_reference):
            raise So8tError("--lora", "needs both the adapter GGUF (--lora) and the PEFT adapter it was made from "
                                      "(--lora-reference)", "pass both, or neither")
        lora = (args.lora, load_adapter(args.lora_reference))
    report = validate_file(args.gguf, Checkpoint.open(args.reference, cache_dir=default_cache_dir()), lora=lora)
    if args.json:
        _print_json(report)
    else:
        f = report.get("llama_cpp", {})
        print(f"{args.gguf}: {report['quant']}")
        rb = report["readback"]
        print(f"  read-back      {'ok' if rb['ok'] else 'FAILED'} ({rb['tensors']} tensors)")
        print(f"  tensor errors  max relative RMSE {report['tensor_errors']['max_relative_rmse']:.3g} "
              f"({report['tensor_errors']['worst_tensor']}), {'ok' if report['tensor_errors']['ok'] else 'FAILED'}")
        print(f"  llama.cpp      mean KLD {f['mean_kld']:.3g}, top-1 {100 * f['top1_agreement']:.2f}% "
              f"over {f['n_tokens']} tokens, {'ok' if f['ok'] else 'FAILED'}")
        if "adapter" in report:
            a = report["adapter"]
            print(f"  LoRA adapter   {args.lora}: {a['pairs']} pairs, max |difference| from the PEFT pairs "
                  f"{a['max_abs_diff']:.3g}, {'ok' if a['ok'] else 'FAILED'}")
            for p in a["problems"]:
                print(f"  problem: {p}")
        if "tokenizer" in report:
            t = report["tokenizer"]
            where = "" if t["ok"] else f", first difference at token {t['first_mismatch']}"
            print(f"  tokenizer      {t['n_tokens']} tokens, {'identical ids' if t['ok'] else 'DIFFERENT'}{where}")
        for p in report["readback"]["problems"]:
            print(f"  problem: {p}")
        print("passed" if report["passed"] else "FAILED: " + ", ".join(report["failures"]))
    return 0 if report["passed"] else 1


def cmd_lora_gguf(args: argparse.Namespace) -> int:
    from so8t_core.assemble.lora_gguf import write_lora_gguf

    result = write_lora_gguf(args.adapter, args.base, args.output)
    if args.json:
        _print_json(result)
        return 0
    print(f"wrote {result['output']} ({result['size']:,} bytes, sha256 {result['sha256'][:16]}...)")
    print(f"  adapter      r={result['r']}, lora_alpha={result['lora_alpha']:g}, scale {result['scale']:.4g} "
          f"({result['scaling']}) -> adapter.lora.alpha {result['gguf_lora_alpha']:g}")
    print(f"  tensors      {result['tensors']} ({len(result['merged_tensors'])} pairs on "
          f"{', '.join(result['effective_target_modules'])}; "
          + ", ".join(f"{n} {t}" for t, n in result["transforms"].items()) + ")")
    print(f"  base         {result['arch']}, fingerprint {result['base_fingerprint'][:16]}")
    print(f"run: llama-cli -m BASE.gguf --lora {result['output']}")
    return 0


def cmd_onnx(args: argparse.Namespace) -> int:
    from so8t_core.analysis import preflight
    from so8t_core.export.onnx import export_onnx, local_output_path, require_onnx
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.storage import default_cache_dir

    require_onnx()
    local_output_path(args.output)
    preflight(args.source, args.lora)  # bad input fails here in a second, before any model is built
    adapter = None
    if args.lora:
        from so8t_core.source.lora import load_adapter

        adapter = load_adapter(args.lora)
    result = export_onnx(Checkpoint.open(args.source, cache_dir=default_cache_dir()), args.output, adapter)
    if args.json:
        _print_json(result)
        return 0
    c = result["check"]
    print(f"exported {result['path']} ({result['size']:,} bytes, sha256 {result['sha256'][:16]}…)")
    if result["external_data"]:
        d = result["external_data"]
        print(f"  weights      {d['path']} ({d['size']:,} bytes; keep it beside the .onnx file)")
    print(f"  graph        input_ids, attention_mask [batch, sequence] int64 -> logits [batch, sequence, "
          f"{result['outputs']['logits'][2]}] float32; opset {result['opset']}; no KV cache; "
          "triality heads not included")
    print(f"  onnxruntime  max |Δlogit| {c['max_abs_diff_vs_baked_torch']:.2e} vs the baked PyTorch model, "
          f"{c['max_abs_diff_vs_so8t_reference']:.2e} vs the SO8T reference, over {c['n_tokens']} tokens "
          f"(tolerance {c['tolerance']:.2e}): ok")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from so8t_core.publish.release import model_gguf
    from so8t_core.validate.llama_runtime import LlamaCppModel

    with LlamaCppModel(model_gguf(args.gguf, args.quant), n_ctx=1024) as model:
        print(model.generate_chat(args.message, max_tokens=args.max_tokens))
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from so8t_core.validate.heads import render_heads, run_heads

    result = run_heads(args.gguf, args.sidecar, args.text)
    _print_json(result) if args.json else print(render_heads(result))
    return 0


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from so8t_core.testing.demo import build_demo_checkpoint

    print(build_demo_checkpoint(args.dest))
    return 0


def cmd_fixture(args: argparse.Namespace) -> int:
    from so8t_core.testing.fixtures import FixtureSpec, build_fixture

    gated = tuple(int(x) for x in args.gated_layers.split(",")) if args.gated_layers else None
    spec = FixtureSpec(arch=args.arch, layers=args.layers, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                       tokenizer_vocab=args.tokenizer_vocab, head_dim=args.head_dim, tied=args.tied,
                       so8t=not args.no_so8t, seed=args.seed, shards=args.shards, rotation=args.rotation,
                       position=args.position, gated_layers=gated, attention_bias=args.attention_bias,
                       longrope=args.longrope, tokenizer=args.tokenizer)
    print(build_fixture(args.dest, spec))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="so8t-gguf", description="Convert SO8T checkpoints into validated GGUF files.")
    p.add_argument("--version", action="version", version=f"so8t-gguf {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint (default: the embedded demo) into GGUF files")
    c.add_argument("source", nargs="?", help="checkpoint folder: path, file:// or s3:// (default: demo)")
    c.add_argument("--output", default="./artifacts", help="where to publish (default ./artifacts)")
    c.add_argument("--quant", action="extend", nargs="+", metavar="TYPE",
                   help="llama-quantize mixes: F32 F16 BF16 Q8_0 Q6_K Q5_K_M Q5_K_S Q5_1 Q5_0 Q4_K_M Q4_K_S "
                        "Q4_1 Q4_0 Q3_K_L Q3_K_M Q3_K_S Q2_K (default Q8_0)")
    c.add_argument("--tensor-type", action="append", metavar="REGEX=TYPE",
                   help="override the type of tensors whose name matches REGEX (first match wins)")
    c.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    c.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    c.add_argument("--pure", action="store_true", help="no mix rules: every 2-D weight gets the default type")
    c.add_argument("--imatrix", metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy .dat)")
    c.add_argument("--lora", metavar="ADAPTER_URI", help="merge a PEFT LoRA/rsLoRA adapter folder into the weights "
                   "before baking")
    c.add_argument("--engine", default="auto", choices=["auto", "simd", "ggml", "torch"],
                   help="quantization engine (auto: torch on a GPU, else simd); all write the same bytes")
    c.add_argument("--no-validate", action="store_true", help="skip validation (and its gates)")
    c.add_argument("--max-memory", type=float, metavar="GB", help="cap peak memory by limiting tensors in flight")
    c.add_argument("--name", help="base name of the output files (default: the source folder name)")
    c.add_argument("--split-max-size", metavar="SIZE", help="split each GGUF into files of at most SIZE (e.g. 2G)")
    c.add_argument("--split-max-tensors", type=int, default=0, metavar="N",
                   help="split each GGUF into files of at most N tensors")
    c.add_argument("--work-dir", help="staging directory (default ~/.cache/so8t-gguf/work); with --dask-address, "
                   "a path every worker sees (e.g. NFS) at the same place")
    c.add_argument("--runner", default="threads", choices=["threads", "dask"],
                   help="where the per-tensor quantize tasks run: a thread pool (default) or Dask (a local "
                        "multi-process cluster, or the one at --dask-address)")
    c.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                   help="with --runner dask: an existing Dask scheduler; its workers need this project installed "
                        "and the source and --work-dir at the same paths (see docs/scaling.md)")
    c.add_argument("--json", action="store_true", help="print a machine-readable summary (no progress)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary: the exit status "
                   "says how it went (errors still print one line)")
    c.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    c.set_defaults(func=cmd_convert)

    a = sub.add_parser("analyze", help="report the structure of a checkpoint")
    a.add_argument("source")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_analyze)

    i = sub.add_parser("inspect", help="show a GGUF's metadata, tensors and SO8T provenance")
    i.add_argument("gguf")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("validate", help="validate a GGUF against its source checkpoint in llama.cpp")
    v.add_argument("gguf")
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
    ch.add_argument("gguf", metavar="MODEL", help="a .gguf file, a release folder, or a model folder with "
                    "latest.json (then --quant picks the release)")
    ch.add_argument("message")
    ch.add_argument("--quant", help="with a model folder: which quant's latest release")
    ch.add_argument("--max-tokens", type=int, default=48)
    ch.set_defaults(func=cmd_chat)

    hd = sub.add_parser("heads", help="run the triality heads on a text (llama.cpp computes the hidden state)")
    hd.add_argument("gguf", help="the model GGUF")
    hd.add_argument("sidecar", help="its <name>.so8t-heads.gguf")
    hd.add_argument("text")
    hd.add_argument("--json", action="store_true")
    hd.set_defaults(func=cmd_heads)

    d = sub.add_parser("demo-checkpoint", help="write the embedded demo SO8T checkpoint")
    d.add_argument("dest")
    d.set_defaults(func=cmd_demo_checkpoint)

    f = sub.add_parser("fixture", help="write a tiny random SO8T checkpoint (for tests)")
    f.add_argument("dest")
    f.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "phi3"])
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
    f.add_argument("--tokenizer", choices=["bpe", "spm"],
                   help="byte-level BPE or SentencePiece (Llama 2 / Phi-3 style); default: spm for phi3, else bpe")
    f.set_defaults(func=cmd_fixture)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except So8tError as exc:
        print(f"so8t-gguf: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("so8t-gguf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`so8t-gguf inspect … | head`): stop quietly, as a shell tool
        # killed by SIGPIPE would, and keep Python's exit-time flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
