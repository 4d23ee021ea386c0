"""Every mix issue 13 added, on the demo, against llama-quantize with the imatrix the run computed.

The test suite compares every mix with ``llama_model_quantize`` on small fixtures of each
architecture and, on the demo, IQ4_XS only (llama-quantize takes 20-50 s per demo mix here).
This runs the rest once: convert the demo (hidden 576: most rows fall back) into every new mix
with ``--calibration builtin``, then give llama_model_quantize our F32 GGUF and the published
``NAME.imatrix.gguf`` (normalized as llama-quantize's loader does) and compare every tensor's
type and bytes. A mix we refuse must be one llama_model_quantize refuses too.

    .venv/bin/python benchmarks/demo_mixes.py [--work DIR] [--chunks N] [--mixes Q2_0 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # llama.cpp as the oracle, as the tests use it

NEW_MIXES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL",
             "IQ4_XS", "Q2_K_S", "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q1_0", "Q2_0"]


def main() -> None:
    from collections import Counter

    from support.llama_cpp_oracle import assert_same_tensors, llama_quantize
    from support.published import gguf_path, release

    from flows.convert import convert, demo_source
    from flows.params import ConvertParams
    from so8t_core.analysis import checkpoint_model
    from so8t_core.constants import QUANT_TYPES
    from so8t_core.errors import UnsupportedError
    from so8t_core.quantize.calibration import measured_weights
    from so8t_core.quantize.imatrix import load_imatrix
    from so8t_core.quantize.mixes import MixOptions, ModelShape, mix_types
    from so8t_core.source.checkpoint import Checkpoint
    from so8t_core.testing.demo import DEMO_NAME

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--chunks", type=int, default=2, help="calibration chunks of 512 tokens (default 2)")
    ap.add_argument("--mixes", nargs="+", default=NEW_MIXES, help="default: every mix issue 13 added")
    args = ap.parse_args()
    out = args.work or tempfile.mkdtemp(prefix="so8t-demo-mixes-")

    spec, _, plan = checkpoint_model(Checkpoint.open(demo_source()))
    covered = measured_weights([(p.gguf_name, p.shape) for p in plan])  # what the computed imatrix holds
    refused = {}
    mixes = []
    for mix in args.mixes:
        if mix not in QUANT_TYPES:
            refused[mix] = "not a type so8t-gguf writes (gguf-py lacks it)"
            continue
        try:  # the preflight's rules, one mix at a time: what is refused, and why
            mix_types(plan, [mix], ModelShape.from_spec(spec), MixOptions(has_imatrix=True), covered)
            mixes.append(mix)
        except UnsupportedError as exc:
            refused[mix] = str(exc)
    t0 = time.perf_counter()
    convert(ConvertParams(source=None, output=out, quants=["F32", *mixes], run_validation=False, eval_chunks=0,
                          calibration=["builtin"], calibration_chunks=args.chunks))
    print(f"converted the demo into {len(mixes)} mixes in {time.perf_counter() - t0:.0f} s", flush=True)
    imatrix = load_imatrix(str(release(out, DEMO_NAME, "F32") / f"{DEMO_NAME}.imatrix.gguf"))
    f32 = str(gguf_path(out, DEMO_NAME, "F32"))
    print("| mix | tensors identical | types (weights) | llama_model_quantize s |\n|---|---|---|---|")
    failures = 0
    for mix in mixes:
        theirs = os.path.join(out, f"llama-{mix}.gguf")
        t0 = time.perf_counter()
        llama_quantize(f32, theirs, int(QUANT_TYPES[mix].file_type), imatrix=imatrix.entries)
        took = time.perf_counter() - t0
        try:
            types = assert_same_tensors(str(gguf_path(out, DEMO_NAME, mix)), theirs)
            counts = Counter(t for n, t in types.items() if n.endswith(".weight") and "norm" not in n)
            print(f"| {mix} | all {len(types)} | {', '.join(f'{t} {k}' for t, k in counts.most_common())} "
                  f"| {took:.0f} |", flush=True)
        except AssertionError as exc:
            failures += 1
            print(f"| {mix} | **differs**: {exc} | | {took:.0f} |", flush=True)
        os.remove(theirs)
    for mix, why in refused.items():
        if mix in QUANT_TYPES:  # a mix we refuse must be one llama_model_quantize refuses
            status = llama_quantize(f32, os.path.join(out, "refused.gguf"), int(QUANT_TYPES[mix].file_type),
                                    imatrix=imatrix.entries, check=False)
            failures += status == 0
            why += " (llama_model_quantize: " + ("writes it!)" if status == 0 else "refuses it too)")
        print(f"| {mix} | refused: {why} | | |")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
