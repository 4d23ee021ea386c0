"""Target mixes (AUTO) against llama.cpp's fixed mixes at the same bits per weight.

    .venv/bin/python benchmarks/target_mix.py [--model demo|fixture] [--mixes Q3_K_M,Q4_K_M,Q5_K_M]
        [--chunks N] [--threads N] [--work DIR]

For each model: its F32 GGUF (baked, as convert writes it), an importance matrix computed on the
built-in calibration text (``collect_activations``, as llama-imatrix does; ``--chunks`` chunks of 512),
and the base log-probabilities of the F32 file on the built-in evaluation text (n_ctx 512, as
llama-perplexity ``--kl-divergence-base``). Then for each mix: the mix with that imatrix, and AUTO at
the mix's own bits per weight (its tensors' bytes, constants.bits_per_weight) with the same imatrix;
mean KLD of each against the F32 base (so8t_core.validate.perplexity, llama-perplexity's statistics).

``demo``: SmolLM2-135M with SO8T gates (hidden 576: only ffn_down's rows of 1536 take the K types, the
rest choose among Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q8_0). ``fixture``: a random Llama of hidden 256
(every 256-block type fits), 8 layers, vocabulary 512 (so8t_core.testing.fixtures).

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N_CTX = 512
FIXTURE = dict(arch="llama", layers=8, hidden=256, heads=4, kv_heads=1, intermediate=512, vocab=512)


def source(model: str, work: str) -> str:
    if model == "demo":
        from flows.convert import demo_source

        return demo_source()
    from so8t_core.testing.fixtures import FixtureSpec, build_fixture

    path = os.path.join(work, "fixture")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_fixture(path, FixtureSpec(**FIXTURE))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", choices=("demo", "fixture"))
    ap.add_argument("--mixes", default="Q3_K_M,Q4_K_M,Q5_K_M")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--eval-chunks", type=int, default=None, help="at most this many chunks of the evaluation text")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-chunks", type=int, default=0,
                    help="measure a KLD gain per tensor class with probes over this many chunks (0: no gains)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()

    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.llama_runtime import LlamaCppModel
    from so8t_core.quantize import target
    from so8t_core.quantize.calibration import BUILTIN, calibration_tokens, collect_activations
    from so8t_core.quantize.imatrix import load_imatrix, write_imatrix
    from so8t_core.quantize.mixes import MixOptions
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.validate.gains import class_gains
    from so8t_core.validate.perplexity import (
        BUILTIN_EVAL_TEXT,
        base_log_probs,
        evaluation_tokens,
        kl_divergence,
        read_eval_text,
    )

    work = args.work or tempfile.mkdtemp(prefix=f"so8t-target-{args.model}-")
    os.makedirs(work, exist_ok=True)
    src = source(args.model, work)
    ckpt = Checkpoint.open(src)
    staging = os.path.join(work, "staging")
    f32 = os.path.join(work, "F32.gguf")
    if not os.path.exists(f32):
        convert_sequential(ckpt, "F32", f32, staging)
    im_path = os.path.join(work, "imatrix.gguf")
    if not os.path.exists(im_path):
        calibration, tokens = calibration_tokens(ckpt, [BUILTIN])
        sums = collect_activations(f32, tokens, N_CTX, args.chunks, n_threads=args.threads)
        write_imatrix(im_path, sums.sums, sums.counts, calibration.datasets, sums.chunk_count, sums.chunk_size)
    imatrix = load_imatrix(im_path)

    with LlamaCppModel(f32, n_ctx=N_CTX, n_threads=args.threads) as model:
        eval_tokens = evaluation_tokens(model, read_eval_text(BUILTIN_EVAL_TEXT), N_CTX, args.eval_chunks)
        base = base_log_probs(model, eval_tokens, N_CTX)

    def base_log_probs_for(path: str, tokens) -> object:
        with LlamaCppModel(path, n_ctx=N_CTX, n_threads=args.threads) as m:
            return base_log_probs(m, tokens, N_CTX)

    def kld(path: str) -> float:
        with LlamaCppModel(path, n_ctx=N_CTX, n_threads=args.threads) as m:
            return kl_divergence(m, base).kld_mean

    t0 = time.perf_counter()
    tensors = target.measure_gguf(f32, imatrix, cache_dir=os.path.join(work, "damage"), n_threads=args.threads)
    measure_s = time.perf_counter() - t0
    gains = {}
    if args.probe_chunks:
        t0 = time.perf_counter()
        probe_base = base_log_probs_for(f32, eval_tokens[:args.probe_chunks * N_CTX])
        gains = class_gains(f32, tensors, probe_base, os.path.join(work, "probes"), imatrix, n_threads=args.threads)
        print("gains", gains, f"in {time.perf_counter() - t0:.0f} s", flush=True)
        tensors = target.with_gains(tensors, gains)
    rows = []
    for mix in args.mixes.split(","):
        mix_file = os.path.join(work, f"{mix}.gguf")
        convert_sequential(ckpt, mix, mix_file, staging, options=MixOptions(has_imatrix=True), imatrix=imatrix)
        from so8t_core.gguf_file import read_gguf

        mix_types = {t.name: t.tensor_type for t in read_gguf(mix_file).tensors}
        bpw = target.bits_per_weight(tensors, mix_types)
        types = target.target_types(tensors, bpw=bpw)
        recipe = target.parse_tensor_type_file(target.tensor_type_file(tensors, types))
        auto_file = os.path.join(work, f"AUTO-{mix}.gguf")
        convert_sequential(ckpt, target.base_mix(tensors, types), auto_file, staging,
                           options=MixOptions(tensor_types=recipe, has_imatrix=True), imatrix=imatrix)
        mix_kld, auto_kld = kld(mix_file), kld(auto_file)
        rows.append((mix, bpw, target.bits_per_weight(tensors, types), target.predicted_damage(tensors, mix_types),
                     target.predicted_damage(tensors, types), mix_kld, auto_kld,
                     os.path.getsize(mix_file), os.path.getsize(auto_file)))
        print(rows[-1], flush=True)
    print(f"\n{args.model}: {len(eval_tokens)} evaluation tokens (n_ctx {N_CTX}), imatrix on {args.chunks} chunks "
          f"of the built-in calibration text; damage measured in {measure_s:.1f} s ({args.threads} threads); "
          f"class gains from probes on {args.probe_chunks} chunks: "
          f"{ {k: round(v, 3) for k, v in gains.items()} or 'none'}\n")
    print("| mix | bpw (mix / AUTO) | damage (mix / AUTO) | mean KLD mix | mean KLD AUTO | AUTO / mix | "
          "file bytes (mix / AUTO) |")
    print("|---|---|---|---|---|---|---|")
    for mix, bpw, abpw, dmix, dauto, kmix, kauto, smix, sauto in rows:
        print(f"| {mix} | {bpw:.3f} / {abpw:.3f} | {dmix:.4f} / {dauto:.4f} | {kmix:.5f} | {kauto:.5f} | "
              f"{kauto / kmix:.2f}× | {smix:,} / {sauto:,} |")


if __name__ == "__main__":
    main()
