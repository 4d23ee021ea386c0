"""convert --target-kld: the budgets its search tried, their measured mean KLD, and what it costs.

    .venv/bin/python benchmarks/target_kld.py [--model fixture|demo] [--kld 0.2] [--mix Q4_K_M]
        [--calibration-chunks 4] [--eval-ctx 512] [--eval-chunks 16] [--work DIR]

Runs the real command, ``so8t-gguf convert SOURCE --quant MIX --target-kld K --calibration builtin``
(no validation: the evaluation is what the search uses), in a fresh work folder, and prints the
manifest's search as a Markdown table for docs/benchmarks.md, with the mix's own evaluation (same
imatrix, same evaluation text) beside it and the run's wall time. ``fixture``: the 256-hidden random
Llama of benchmarks/target_mix.py (8 layers, vocabulary 512); ``demo``: SmolLM2-135M SO8T.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIXTURE = dict(arch="llama", layers=8, hidden=256, heads=4, kv_heads=1, intermediate=512, vocab=512)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fixture", choices=("fixture", "demo"))
    ap.add_argument("--kld", type=float, default=0.2)
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--calibration-chunks", type=int, default=4)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()

    from so8t_core.quantize.target import kld_label

    work = args.work or tempfile.mkdtemp(prefix="target-kld-")
    if args.model == "demo":
        from flows.convert import demo_source

        src = demo_source()
    else:
        from so8t_core.testing.fixtures import FixtureSpec, build_fixture

        src = os.path.join(work, "fixture")
        if not os.path.exists(os.path.join(src, "config.json")):
            build_fixture(src, FixtureSpec(**FIXTURE))
    cli = os.path.join(os.path.dirname(sys.executable), "so8t-gguf")
    argv = [cli, "convert", src, "--name", "bench", "--output", os.path.join(work, "out"), "--work-dir",
            os.path.join(work, "work"), "--quant", args.mix, "--target-kld", str(args.kld), "--calibration", "builtin",
            "--calibration-chunks", str(args.calibration_chunks), "--eval-ctx", str(args.eval_ctx), "--eval-chunks",
            str(args.eval_chunks), "--no-validate", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(f"exit {proc.returncode} in {wall:.0f} s: {proc.stderr.strip()[-300:]}")
    label = kld_label(args.kld)

    def manifest(quant: str) -> dict | None:
        found = sorted(glob.glob(os.path.join(work, "out", "bench", "*", quant, "v-*", "manifest.json")))
        return json.load(open(found[-1])) if found else None

    mix = manifest(args.mix)
    auto = manifest(label)
    if mix:
        print(f"\n{args.mix}: {mix['bits_per_weight']:.3f} bits per weight, mean KLD "
              f"{mix['evaluation']['statistics']['kld_mean']:.4f}")
    if not auto:
        return
    search = auto["recipe"]["search"]
    print(f"{label}: {auto['bits_per_weight']:.3f} bits per weight, mean KLD "
          f"{auto['evaluation']['statistics']['kld_mean']:.4f}, base mix {auto['recipe']['base_mix']}\n")
    print("| try | bits per weight | tensor bytes | mean KLD | within |")
    print("|---|---|---|---|---|")
    for i, t in enumerate(search["trials"], 1):
        mark = " ← chosen" if t == search["chosen"] else " ← next smaller" if t == search["next_smaller"] else ""
        print(f"| {i} | {t['bits_per_weight']:.3f} | {t['tensor_bytes']:,} | {t['kld_mean']:.4f} | "
              f"{'yes' if t['within'] else 'no'}{mark} |")


if __name__ == "__main__":
    main()
