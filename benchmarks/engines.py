"""Quantization throughput: the simd engine (so8t_core.quantize.engines._kquants) against libggml's reference code.

    .venv/bin/python benchmarks/engines.py [--rows 4096] [--cols 4096] [--repeat 3] [--threads 1 2]
                                           [--types Q2_K Q4_K ...] [--isa avx2] [--imatrix]

Both engines quantize the same float32 matrix (N(0, 0.02²), 4096×4096 by default) with the
same number of threads (a thread pool over row chunks, the C code running without the GIL);
best of ``--repeat`` runs, in million weights per second. Every simd result is also checked
byte for byte against ggml's. Prints a Markdown table. Takes ~1-2 minutes on 2 cores.
``--imatrix``: with importance weights (one per column, skewed, as llama-quantize passes them),
for the types the simd engine also quantizes with them (``simd.WEIGHTED``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def best_of(fn, n: int) -> tuple[float, memoryview]:
    times, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    from gguf import GGMLQuantizationType

    from so8t_core.quantize.engines import ggml as ggml_engine
    from so8t_core.quantize.engines import simd as simd_engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=None, help="default: every type the simd engine supports")
    ap.add_argument("--isa", default=None, help=f"kernel set (usable here: {', '.join(simd_engine.ISAS)})")
    ap.add_argument("--imatrix", action="store_true", help="with importance weights (the types in simd.WEIGHTED)")
    args = ap.parse_args()

    if not simd_engine.available():
        sys.exit("so8t_core.quantize.engines._kquants is not built: run `pip install -e .`")
    types = ([GGMLQuantizationType[t] for t in args.types] if args.types
             else sorted(simd_engine.WEIGHTED if args.imatrix else simd_engine.SUPPORTED, key=lambda t: t.name))
    isa = args.isa or simd_engine.ISA
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    qw = (rng.random(args.cols) ** 3 * 50).astype(np.float32) if args.imatrix else None
    n = x.size

    print(f"{args.rows}×{args.cols} float32, N(0, 0.02²){', with importance weights' if args.imatrix else ''}; "
          f"best of {args.repeat}; {cpu_name()}, {os.cpu_count()} CPUs; simd kernels: {isa}", flush=True)
    print()
    header = "| type |"
    rule = "|---|"
    for t in args.threads:
        header += f" ggml {t}T | simd {t}T | speedup {t}T |"
        rule += "---|---|---|"
    print(header + " identical |")
    print(rule + "---|")
    for qtype in types:
        row = f"| {qtype.name} |"
        same = True
        for threads in args.threads:
            t_ggml, ref = best_of(lambda: ggml_engine.quantize_rows(x, qtype, n_threads=threads, imatrix=qw),
                                  args.repeat)
            t_fast, got = best_of(lambda: simd_engine._quantize(x, qtype, n_threads=threads, isa=isa, imatrix=qw),
                                  args.repeat)
            same &= bytes(ref) == bytes(got)
            row += f" {n / t_ggml / 1e6:.1f} | {n / t_fast / 1e6:.1f} | {t_ggml / t_fast:.1f}× |"
        print(row + (" yes |" if same else " **NO** |"), flush=True)
    print()
    print("M weights/s; speedup = ggml time / fast time at equal threads.")


if __name__ == "__main__":
    main()
