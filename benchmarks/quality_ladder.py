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
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
N_CTX = 512
_STAT = re.compile(r"^(?P<name>[^:]+?)\s*:\s*(?P<value>-?\d+\.\d+)\s*%?(?:\s*±\s*(?P<unc>-?\d+\.\d+))?")


def llama_perplexity(binary: str, threads: int, *args: str) -> str:
    """Its stdout, run again while the summary is missing (the pinned build can lose its last lines)."""
    for _ in range(5):
        proc = subprocess.run([binary, "-c", str(N_CTX), "-b", str(N_CTX), "-fa", "off", "-t", str(threads), *args],
                              capture_output=True, text=True, check=True)
        if "--kl-divergence" not in args or "Same top p:" in proc.stdout:  # the summary's, not the table's
            return proc.stdout
    return proc.stdout


def printed(text: str) -> dict[str, float]:
    """Every figure of a printed summary by name; an uncertainty under the name followed by " ±"."""
    out = {}
    if "====== Perplexity statistics" in text:
        for line in text[text.index("====== Perplexity statistics"):].splitlines():
            if m := _STAT.match(line.strip()):
                out[m["name"]] = float(m["value"])
                if m["unc"] is not None:
                    out[f"{m['name']} ±"] = float(m["unc"])
    return out


def largest_difference(ours: dict[str, float], theirs: dict[str, float]) -> tuple[float, str]:
    """The largest difference over the figures both print, relative to llama-perplexity's value
    floored at 1e-3 (a 6-decimal figure near zero that differs in its last digit counts 1e-3), and
    the name of the figure it came from."""
    rel = {k: abs(ours[k] - v) / max(abs(v), 1e-3) for k, v in theirs.items() if k in ours}
    if not rel:
        return 0.0, ""
    name = max(rel, key=rel.get)
    return rel[name], name


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_results(path: str, results: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks of 512 tokens (default 16, the run's default)")
    ap.add_argument("--work", default=None, help="a folder to keep the files and results in (resumes from them)")
    ap.add_argument("--quants", default=",".join(LADDER),
                    help=f"comma-separated quants to evaluate (default all: {','.join(LADDER)})")
    ap.add_argument("--redo", action="store_true", help="evaluate the chosen quants again even when recorded")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    if unknown := [q for q in quants if q not in LADDER]:
        ap.error(f"--quants: {', '.join(unknown)} not in the ladder ({', '.join(LADDER)})")

    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.constants import bits_per_weight
    from so8t_core.gguf_file import read_gguf
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.testing.demo import build_demo_checkpoint
    from so8t_core.validate.perplexity import (
        BUILTIN_EVAL_PATH,
        BUILTIN_EVAL_TEXT,
        EVALUATION_VERSION,
        KlDivergenceStatistics,
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
    for q in ["F32", *quants]:
        files[q] = os.path.join(work, f"demo-{q}.gguf")
        if not os.path.exists(files[q]):
            convert_sequential(ckpt, q, files[q], os.path.join(work, "staging"), engine="simd")

    # Each base pass takes minutes: a base file already in the work folder is reused (delete it to
    # redo), ours while it was written by this EVALUATION_VERSION.
    results_path = os.path.join(work, f"ladder-{args.chunks}.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    base = os.path.join(work, f"base-{args.chunks}.kld")
    if not os.path.exists(base) or results.get("base_version") != EVALUATION_VERSION:
        start = time.perf_counter()
        write_evaluation_base(files["F32"], read_eval_text(BUILTIN_EVAL_TEXT), N_CTX, args.chunks, base + ".tmp")
        os.replace(base + ".tmp", base)
        results.update(base_seconds=round(time.perf_counter() - start, 1), base_version=EVALUATION_VERSION)
        save_results(results_path, results)
    binary = os.environ.get("SO8T_LLAMA_PERPLEXITY")
    theirs_base = os.path.join(work, f"theirs-{args.chunks}.kld")
    if binary and not os.path.exists(theirs_base):
        llama_perplexity(binary, args.threads, "-m", files["F32"], "-f", BUILTIN_EVAL_PATH, "--chunks",
                         str(args.chunks), "--kl-divergence-base", theirs_base + ".tmp")
        os.replace(theirs_base + ".tmp", theirs_base)

    # One record per quant, kept as soon as each side is measured: a later run measures again only
    # what is missing (ours: or of another EVALUATION_VERSION) while the file is the same.
    done = results.setdefault("quants", {})
    for q in quants:
        sha = file_sha256(files[q])
        record = done.get(q, {}) if not args.redo and done.get(q, {}).get("sha256") == sha else {}
        if not record:
            tensors = read_gguf(files[q]).tensors
            record = {"sha256": sha, "size": os.path.getsize(files[q]),
                      "bits_per_weight": bits_per_weight(sum(int(t.n_bytes) for t in tensors),
                                                         sum(int(t.n_elements) for t in tensors))}
        if record.get("evaluation_version") != EVALUATION_VERSION:
            start = time.perf_counter()
            record["ours"] = evaluate_file(files[q], base).as_record()
            record.update(ours_seconds=round(time.perf_counter() - start, 1), evaluation_version=EVALUATION_VERSION)
            done[q] = record
            save_results(results_path, results)
            print(f"{q}: ours measured ({record['ours_seconds']} s)", file=sys.stderr, flush=True)
        if binary and not record.get("theirs"):
            start = time.perf_counter()
            stdout = llama_perplexity(binary, args.threads, "-m", files[q], "--kl-divergence-base", theirs_base,
                                      "--kl-divergence")
            record["theirs_seconds"] = round(time.perf_counter() - start, 1)
            record["theirs"] = printed(stdout)
            with open(os.path.join(work, f"theirs-{q}-{args.chunks}.log"), "w") as f:
                f.write(stdout)
            done[q] = record
            save_results(results_path, results)
            print(f"{q}: llama-perplexity measured ({record['theirs_seconds']} s)", file=sys.stderr, flush=True)

    if binary:  # the two base passes' files, value by value (the same bytes when the passes agree)
        mine, theirs = (np.memmap(path, "<u2", "r") for path in (base, theirs_base))
        differ = int(np.count_nonzero(mine != theirs)) if mine.shape == theirs.shape else -1
        print(f"base files: {'identical' if differ == 0 else f'{differ} of {mine.size} 16-bit values differ'}",
              file=sys.stderr)
    base_seconds = results.get("base_seconds")
    print(f"Demo (SmolLM2-135M shape), built-in evaluation text, {args.chunks} chunks of {N_CTX} tokens; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
          + (f"; base pass {base_seconds:.1f} s" if base_seconds else "") + "\n")
    print("| quant | size | bits/weight | PPL ratio | mean KLD | same top p | ours (s) "
          "| max rel. diff vs llama-perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    worst = []
    for q in [q for q in LADDER if q in done]:
        record = done[q]
        stats = KlDivergenceStatistics(**record["ours"])
        diff = "-"
        if record.get("theirs"):
            rel, name = largest_difference(printed(render_kl_divergence(stats)), record["theirs"])
            diff = f"{rel:.1e}"
            worst.append((rel, q, name))
        print(f"| {q} | {record['size'] / 1e6:.1f} MB | {record['bits_per_weight']:.2f} | {stats.ppl_ratio:.4f} | "
              f"{stats.kld_mean:.4f} | {100 * stats.same_top_p:.2f}% | {record['ours_seconds']:.1f} | {diff} |")
    if worst:
        print()
        for rel, q, name in worst:
            ours = printed(render_kl_divergence(KlDivergenceStatistics(**done[q]["ours"])))
            if rel == 0:
                print(f"{q}: all {len(done[q]['theirs'])} printed figures identical")
            else:
                print(f"{q}: largest relative difference {rel:.1e} in {name!r}: "
                      f"ours {ours[name]:.6f}, llama-perplexity {done[q]['theirs'][name]:.6f}")


if __name__ == "__main__":
    main()
