"""Quantization throughput of every tensor type: our engines against llama-quantize, at equal threads.

    .venv/bin/python benchmarks/quant_types.py [--threads 2] [--repeat 2] [--types IQ4_XS Q4_K ...] [--work DIR]

The weights of one F32 GGUF (a 1-layer llama with rows of 1024 and 2048, ~11M weights) are
quantized to one type: by llama.cpp's ``llama_model_quantize`` (``pure``: every weight gets the
type; the mix whose default type it is), i.e. llama-quantize reading and writing files; and by
each of our engines (``simd`` where it has the type, ``ggml``) on the same tensors read from the
same memory-mapped file, written to one output file, as the pipeline's quantize stage calls them
(``quantize.engines.quantize``). Types whose quantizer reads an importance matrix are measured
with one too (the same synthetic weights on both sides, for every weight; the IQ1/IQ2_XXS/IQ2_XS
types only with one, as llama-quantize refuses them without). Every output is checked byte for
byte against llama.cpp's. Best of ``--repeat``; prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vs_llama_cpp import best_of, wide_f32  # noqa: E402  (benchmarks/ is the script's folder)


def llama_quantize(src: str, dst: str, ftype: int, threads: int, imatrix: dict | None) -> None:
    import llama_cpp

    from so8t_core.llama_runtime import captured_llama_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, threads, True
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            keep.append(values)
            entries[i].name, entries[i].size = name.encode(), values.size
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with captured_llama_log():  # llama-quantize's per-tensor log lines
        status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    assert status == 0, f"llama_model_quantize failed ({status})"


def main() -> None:
    import llama_cpp
    from gguf import GGMLQuantizationType

    from so8t_core.constants import QUANT_TYPES, SUPPORTED_TENSOR_TYPES
    from so8t_core.gguf_file import read_gguf
    from so8t_core.quantize.engines import quantize
    from so8t_core.quantize.engines import simd as simd_engine
    from so8t_core.quantize.staging import IMATRIX_TYPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=None, help="default: every quantized type so8t-gguf writes")
    ap.add_argument("--work", default=None, help="where the fixture and its F32 GGUF go (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="so8t-quant-types-")
    os.makedirs(work, exist_ok=True)

    f32 = wide_f32(work, layers=1, hidden=1024, heads=8, kv_heads=8, intermediate=2048, vocab=512)
    g = read_gguf(f32)
    weights = [(t.name, np.asarray(t.data).reshape(g.numpy_shape(t))) for t in g.tensors if len(t.shape) == 2]
    n_weights = sum(x.size for _, x in weights)
    rng = np.random.default_rng(0)
    importance = {name: (rng.random(x.shape[1]) ** 3 * 50).astype(np.float32) for name, x in weights}
    llama_cpp.llama_backend_init()

    mix_for = {}
    for mix in QUANT_TYPES.values():
        mix_for.setdefault(mix.default_type, mix)
    types = [GGMLQuantizationType[t] for t in args.types] if args.types else \
        [t for t in SUPPORTED_TENSOR_TYPES if t != GGMLQuantizationType.F32]
    needs_imatrix = {GGMLQuantizationType[t] for t in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "IQ3_XXS")}

    print(f"{n_weights / 1e6:.1f}M weights (rows of 1024 and 2048), {args.threads} threads, best of {args.repeat}; "
          f"simd kernels: {simd_engine.ISA}")
    print("| type | imatrix | llama.cpp s | simd s | llama.cpp / simd | ggml s | llama.cpp / ggml | "
          "best, M weights/s |")
    print("|---|---|---|---|---|---|---|---|")
    for qtype in types:
        variants = [v for v in (False, True)
                    if (not v and qtype not in needs_imatrix) or (v and qtype in IMATRIX_TYPES)]
        for with_imatrix in variants:
            im = importance if with_imatrix else None
            theirs = os.path.join(work, "theirs.gguf")
            ref = best_of(lambda: llama_quantize(f32, theirs, int(mix_for[qtype].file_type), args.threads, im),
                          args.repeat)
            expected = {t.name: np.ascontiguousarray(t.data).tobytes() for t in read_gguf(theirs).tensors}
            row = [qtype.name, "yes" if with_imatrix else "no", f"{ref:.3f}"]
            best = None
            for engine in ("simd", "ggml"):
                has = qtype in (simd_engine.WEIGHTED if with_imatrix else simd_engine.SUPPORTED)
                if engine == "simd" and not has:
                    row += ["—", "—"]
                    continue

                for name, x in weights:  # first, untimed: the same bytes
                    raw = quantize(x, qtype, engine, im[name] if im else None, n_threads=args.threads)
                    assert bytes(raw) == expected[name], f"{qtype.name} {engine} {name}: not llama.cpp's bytes"

                def ours(engine=engine):
                    with open(os.path.join(work, "ours.bin"), "wb") as out:
                        for name, x in weights:
                            out.write(quantize(x, qtype, engine, im[name] if im else None, n_threads=args.threads))
                took = best_of(ours, args.repeat)
                best = took if best is None else min(best, took)
                row += [f"{took:.3f}", f"{ref / took:.2f}"]
            row.append(f"{n_weights / best / 1e6:.0f}")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
