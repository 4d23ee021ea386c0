"""The importance-matrix stage against llama-imatrix, and what its matrix buys, on the demo.

    SO8T_LLAMA_IMATRIX=.../llama-imatrix .venv/bin/python benchmarks/imatrix.py [--threads N] [--chunks N]
        [--skip-throughput] [--skip-kld] [--skip-chat] [--work DIR]

(a) Throughput: the demo's baked F32 GGUF (SmolLM2-135M with SO8T gates) over the built-in
    calibration text (``--calibration builtin``), ``--chunks`` chunks of 512 tokens, at equal
    threads: so8t-gguf's ``collect_activations`` (model load included) against the llama-imatrix
    process (``--no-ppl``; load and tokenization included), best of two; and whether the two
    files agree (largest relative difference over every entry).
(b) Quality: ``convert`` of the demo to Q4_K_M and IQ4_XS, without an importance matrix and with
    the one computed on the built-in text; mean KLD and top-1 agreement of llama.cpp's logits
    against the PyTorch reference, from each release's validation report (the validation text,
    which is not in the calibration text).
(c) Chat: the demo in IQ2_M, IQ3_M and IQ4_XS with the importance matrix computed on the built-in
    text, validated, each loaded in llama.cpp (``LlamaCppModel``, the GGUF's chat template) and
    asked one question; the greedy replies.

Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def f32_demo(work: str) -> str:
    from flows.convert import demo_source
    from so8t_core.assemble.sequential import convert_sequential
    from so8t_core.source.checkpoint import Checkpoint

    path = os.path.join(work, "demo-F32.gguf")
    if not os.path.exists(path):
        convert_sequential(Checkpoint.open(demo_source()), "F32", path, os.path.join(work, "staging"))
    return path


def throughput(work: str, threads: int, chunks: int) -> None:
    from flows.convert import demo_source
    from so8t_core.gguf_file import read_gguf
    from so8t_core.quantize.calibration import BUILTIN, calibration_tokens, collect_activations
    from so8t_core.quantize.imatrix import write_imatrix
    from so8t_core.source.checkpoint import Checkpoint

    model = f32_demo(work)
    calibration, tokens = calibration_tokens(Checkpoint.open(demo_source()), [BUILTIN])
    text = os.path.join(work, "calibration.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write(calibration.text)
    n_tokens = chunks * 512
    ours_s, theirs_s = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        sums = collect_activations(model, tokens, 512, chunks, n_threads=threads)
        ours_s.append(time.perf_counter() - t0)
        ours = os.path.join(work, "ours.gguf")
        write_imatrix(ours, sums.sums, sums.counts, calibration.datasets, sums.chunk_count, sums.chunk_size)
        theirs = os.path.join(work, "theirs.gguf")
        t0 = time.perf_counter()
        subprocess.run([os.environ["SO8T_LLAMA_IMATRIX"], "-m", model, "-f", text, "-o", theirs, "-c", "512",
                        "--chunks", str(chunks), "-t", str(threads), "--no-ppl"], check=True, capture_output=True)
        theirs_s.append(time.perf_counter() - t0)
    a = {t.name: np.asarray(t.data, np.float64) for t in read_gguf(ours).tensors}
    b = {t.name: np.asarray(t.data, np.float64) for t in read_gguf(theirs).tensors}
    worst = max(float((np.abs(a[n] - b[n]) / np.maximum(np.abs(b[n]), 1e-30)).max()) for n in b)
    print(f"\n(a) importance matrix of the demo (F32, {len(tokens)} calibration tokens; {chunks} chunks of 512 = "
          f"{n_tokens} tokens evaluated), {threads} threads, {platform.processor() or platform.machine()}\n")
    print("| | wall (s), best of 2 | tokens/s | vs llama-imatrix |")
    print("|---|---|---|---|")
    print(f"| llama-imatrix (process) | {min(theirs_s):.1f} | {n_tokens / min(theirs_s):.0f} | 1.00× |")
    print(f"| so8t-gguf `collect_activations` | {min(ours_s):.1f} | {n_tokens / min(ours_s):.0f} | "
          f"{min(theirs_s) / min(ours_s):.2f}× |")
    print(f"\nlargest relative difference over {len(b)} tensors: {worst:.3g}")


def quality(work: str) -> None:
    from flows.convert import convert
    from flows.params import ConvertParams
    from so8t_core.quantize.calibration import BUILTIN

    rows = {}
    for label, calibration in (("without", []), ("with the computed imatrix", [BUILTIN])):
        out = os.path.join(work, "out-" + ("with" if calibration else "without"))
        result = convert(ConvertParams(output=out, quants=["Q4_K_M", "IQ4_XS"], calibration=calibration,
                                       work_dir=os.path.join(work, "w"), name="demo"))
        for q, release in result["releases"].items():
            manifest = json.loads(open(release["manifest"]["uri"]).read())
            f = manifest["validation"]["llama_cpp"]
            rows[(q, label)] = (f["mean_kld"], f["top1_agreement"])
    print("\n(b) the demo, mean KLD and top-1 agreement against the PyTorch reference on the validation text\n")
    print("| mix | imatrix | mean KLD | top-1 |")
    print("|---|---|---|---|")
    for (q, label), (kld, top1) in rows.items():
        print(f"| {q} | {label} | {kld:.5f} | {100 * top1:.2f}% |")


def chat(work: str) -> None:
    from flows.convert import convert
    from flows.params import ConvertParams
    from so8t_core.llama_runtime import LlamaCppModel
    from so8t_core.quantize.calibration import BUILTIN

    mixes = ["IQ2_M", "IQ3_M", "IQ4_XS"]
    result = convert(ConvertParams(output=os.path.join(work, "out-chat"), quants=mixes, calibration=[BUILTIN],
                                   work_dir=os.path.join(work, "w"), name="demo"))
    print("\n(c) the demo with the computed importance matrix, chatting in llama.cpp (greedy, 40 tokens)\n")
    print("| mix | size (MB) | mean KLD | reply to \"What is the capital of France?\" |")
    print("|---|---|---|---|")
    for q in mixes:
        release = result["releases"][q]
        gguf = next(f for n, f in release["files"].items() if n.endswith(f"-{q}.gguf"))
        manifest = json.loads(open(release["manifest"]["uri"]).read())
        with LlamaCppModel(gguf["uri"], n_ctx=512) as model:
            reply, cut = model.chat_reply("What is the capital of France?", max_tokens=40)
        shown = " ".join(reply.split()).replace("|", "\\|") + (" […]" if cut else "")
        print(f"| {q} | {gguf['size'] / 1e6:.1f} | {manifest['validation']['llama_cpp']['mean_kld']:.4f} | {shown} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-kld", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--work")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="so8t-imatrix-bench-")
    os.makedirs(work, exist_ok=True)
    if not args.skip_throughput:
        throughput(work, args.threads, args.chunks)
    if not args.skip_kld:
        quality(work)
    if not args.skip_chat:
        chat(work)


if __name__ == "__main__":
    main()
