"""Time each stage of converting the demo checkpoint, calling the library directly (no Prefect).

    .venv/bin/python benchmarks/demo_convert.py [--quant F32 Q8_0] [--work-dir DIR]

Stages run as the flow runs them, but sequentially and in-process, so the numbers are the
work itself, without orchestration overhead. A fresh work directory is used unless given,
so nothing is served from staging.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from flows.convert import demo_source
from so8t_core.analysis import checkpoint_model
from so8t_core.assemble.sequential import convert_sequential
from so8t_core.assemble.sidecar import assemble_heads_sidecar
from so8t_core.constants import quant_type
from so8t_core.source.checkpoint import Checkpoint
from so8t_core.source.fingerprint import fingerprint
from so8t_core.validate.checks import GATES, check_functional, validation_token_ids
from so8t_core.validate.reference import So8tReference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="+", default=["F32", "Q8_0"])
    ap.add_argument("--work-dir")
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="so8t-bench-")
    quants = [quant_type(q) for q in args.quant]
    times: list[tuple[str, float]] = []

    def timed(label, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        times.append((label, time.perf_counter() - t0))
        return out

    source = timed("build demo checkpoint (if missing)", demo_source)
    ckpt = timed("open checkpoint (headers)", Checkpoint.open, source)
    src = timed("fetch: sha256 of every tensor", fingerprint, ckpt)
    spec, structure, plan = timed("analyze: spec, structure, plan", checkpoint_model, ckpt)
    ggufs = {}
    for q in quants:
        result = timed(f"{q.name}: bake + quantize + stats + assemble, all tensors (sequential)",
                       lambda q=q: convert_sequential(ckpt, q.name, os.path.join(work, f"bench-{q.name}.gguf"),
                                                      os.path.join(work, "tensors"), "bench", source=src))
        ggufs[q.name] = result.files[0]
    timed("assemble sidecar", assemble_heads_sidecar, os.path.join(work, "bench.so8t-heads.gguf"), ckpt,
          structure, "bench", src.fingerprint)
    ids = validation_token_ids(ckpt)
    ref = timed("reference: build PyTorch model", So8tReference, ckpt)
    logits = timed(f"reference: logits ({len(ids)} tokens)", ref.logits, ids)
    for q, f in ggufs.items():
        report = timed(f"validate {q}: llama.cpp logits + agreement", check_functional, f.uri, logits, ids, GATES[q])
        print(f"{q}: mean KLD {report['mean_kld']:.3g}, top-1 {100 * report['top1_agreement']:.2f}%")

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}\n")
    print("| stage | seconds |\n|---|---|")
    for label, t in times:
        print(f"| {label} | {t:.2f} |")
    print(f"| **total** | {sum(t for _, t in times):.2f} |")


if __name__ == "__main__":
    main()
