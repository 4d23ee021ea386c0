"""The demo's quality ladder: each quant against the F32 model over the built-in evaluation text,
with so8t-gguf's evaluation (so8t_core/validate/perplexity.py) and with llama-perplexity
--kl-divergence built from the pinned llama.cpp, on the same files and the same text.

    SO8T_LLAMA_PERPLEXITY=~/.cache/so8t-gguf/llama.cpp-0.3.36-tools/bin/llama-perplexity \\
        .venv/bin/python benchmarks/quality_ladder.py [--chunks 16] [--work DIR]

Prints a Markdown table for docs/benchmarks.md (size, bits per weight, PPL ratio, mean KLD, same
top p, the time of each evaluation) and the largest relative difference from llama-perplexity's
printed figures. The GGUFs are made in-process (assemble.sequential: the pipeline's own bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
N_CTX = 512
_STAT = re.compile(r"^(?P<name>[^:]+?)\s*:\s*(?P<value>-?\d+\.\d+)")


def llama_perplexity(binary: str, threads: int, *args: str) -> str:
    """Its stdout, run again while the summary is missing (the pinned build can lose its last lines)."""
    for _ in range(5):
        proc = subprocess.run([binary, "-c", str(N_CTX), "-b", str(N_CTX), "-fa", "off", "-t", str(threads), *args],
                              capture_output=True, text=True, check=True)
        if "--kl-divergence" not in args or "Same top p" in proc.stdout:
            return proc.stdout
    return proc.stdout


def printed(text: str) -> dict[str, float]:
    out = {}
    if "====== Perplexity statistics" in text:
        for line in text[text.index("====== Perplexity statistics"):].splitlines():
            if m := _STAT.match(line.strip()):
                out[m["name"]] = float(m["value"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks of 512 tokens (default 16, the run's default)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.constants import bits_per_weight
    from so8t_core.gguf_file import read_gguf
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.testing.demo import build_demo_checkpoint
    from so8t_core.validate.perplexity import (
        BUILTIN_EVAL_PATH,
        BUILTIN_EVAL_TEXT,
        evaluate_file,
        read_eval_text,
        render_kl_divergence,
        write_evaluation_base,
    )

    work = args.work or tempfile.mkdtemp(prefix="so8t-ladder-")
    source = os.path.join(work, "demo")
    if not os.path.exists(os.path.join(source, "config.json")):
        build_demo_checkpoint(source)
    ckpt = Checkpoint.open(source)
    files = {}
    for q in ["F32", *LADDER]:
        files[q] = os.path.join(work, f"demo-{q}.gguf")
        if not os.path.exists(files[q]):
            convert_sequential(ckpt, q, files[q], os.path.join(work, "staging"), engine="simd")
    base = os.path.join(work, f"base-{args.chunks}.kld")
    start = time.perf_counter()
    write_evaluation_base(files["F32"], read_eval_text(BUILTIN_EVAL_TEXT), N_CTX, args.chunks, base)
    base_seconds = time.perf_counter() - start

    binary = os.environ.get("SO8T_LLAMA_PERPLEXITY")
    theirs_base = os.path.join(work, f"theirs-{args.chunks}.kld")
    if binary:
        llama_perplexity(binary, args.threads, "-m", files["F32"], "-f", BUILTIN_EVAL_PATH, "--chunks",
                         str(args.chunks), "--kl-divergence-base", theirs_base)

    print(f"Demo (SmolLM2-135M shape), built-in evaluation text, {args.chunks} chunks of {N_CTX} tokens; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; base pass {base_seconds:.1f} s\n")
    print("| quant | size | bits/weight | PPL ratio | mean KLD | same top p | ours (s) "
          "| max rel. diff vs llama-perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for q in LADDER:
        tensors = read_gguf(files[q]).tensors
        bpw = bits_per_weight(sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors))
        start = time.perf_counter()
        stats = evaluate_file(files[q], base)
        seconds = time.perf_counter() - start
        diff = "-"
        if binary:
            ref = printed(llama_perplexity(binary, args.threads, "-m", files[q], "--kl-divergence-base", theirs_base,
                                           "--kl-divergence"))
            ours = printed(render_kl_divergence(stats))
            rel = [abs(ours[k] - v) / max(abs(v), 1e-3) for k, v in ref.items() if k in ours]
            diff = f"{max(rel):.1e}" if rel else "-"
            worst = max(worst, max(rel, default=0.0))
        print(f"| {q} | {os.path.getsize(files[q]) / 1e6:.1f} MB | {bpw:.2f} | {stats.ppl_ratio:.4f} | "
              f"{stats.kld_mean:.4f} | {100 * stats.same_top_p:.2f}% | {seconds:.1f} | {diff} |")
    if binary:
        print(f"\nlargest relative difference from llama-perplexity's printed figures: {worst:.1e}")


if __name__ == "__main__":
    main()
